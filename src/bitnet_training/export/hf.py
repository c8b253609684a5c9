"""Export to Hugging Face `transformers`: a directory that
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads offline, with a `bitnet`
`quantization_config`, and that `pipeline("text-generation", model=DIR)` runs.

Two forms:

* `offline` (default): each quantized layer's ternary codes packed 4 per byte in
  `transformers.integrations.bitnet.pack_weights`' layout (uint8, ceil(out/4) rows), beside a
  `weight_scale` in the convention of the declared `linear_class`: `bitlinear` stores the
  *inverse* absmean scale 1/gamma (its forward divides by it), `autobitlinear` stores gamma
  (its forward multiplies). The two are opposite, a known source of broken conversions;
  both are written and tested. Scales are stored in float32.
* `online` (`autobitlinear` only): the latent weights, which `transformers` quantizes in
  every forward (absmean ternary, 8-bit tokens): for further training elsewhere.

A `BitNetLM` becomes `BitNetForCausalLM` (`model_type: bitnet`); a quantized model of another
`transformers` architecture (a Llama converted with `model.pretrained`) keeps its own class,
with the same `quantization_config` (transformers' bitnet quantizer is architecture-agnostic:
it replaces every `nn.Linear` not listed in `modules_to_not_convert`, which names the layers
left full precision, the output head among them).

What these formats cannot hold is refused in one line naming the setting: other weight bit
widths or scale granularities, activations other than 8-bit per-token absmax, static
observers, LSQ, the FAQ's in-layer norm, an unfinished lambda schedule, and (offline) layers
whose out_features is not a multiple of 4.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..errors import BitNetError
from ..models.bitnet import BitNetLM
from ..models.export_targets import check_exportable, check_four_rows
from ..nn.bitlinear import BitLinear
from ..quant.packing import pack_ternary_transformers

LINEAR_CLASSES = ("bitlinear", "autobitlinear")
MODES = ("offline", "online")


def hf_config(model: nn.Module, quantization: dict, dtype: torch.dtype) -> dict:
    """config.json for `model`: BitNetConfig's fields for a BitNetLM, the model's own config
    for a `transformers` model; with `quantization` as its `quantization_config`."""
    if isinstance(model, BitNetLM):
        c = model.config
        d = {
            "architectures": ["BitNetForCausalLM"],
            "model_type": "bitnet",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "hidden_act": c.hidden_act,
            "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "initializer_range": c.initializer_range,
            "tie_word_embeddings": c.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id,
            "use_cache": True,
        }
    elif hasattr(model, "config") and hasattr(model.config, "to_dict"):
        d = model.config.to_dict()
        d.pop("quantization_config", None)
    else:
        raise BitNetError(
            f"export: a {type(model).__name__} is neither a BitNetLM nor a transformers model"
        )
    d["torch_dtype"] = str(dtype).removeprefix("torch.")
    d["quantization_config"] = quantization
    return d


def hf_state_dict(
    model: nn.Module,
    layers: list[tuple[str, BitLinear]],
    linear_class: str,
    mode: str,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint: quantized layers packed with their scales (offline) or
    latent (online), everything else in `dtype`; a tied head is stored once."""
    quantized = {f"{n}.weight": m for n, m in layers}
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        layer = quantized.get(name)
        if layer is None or mode == "online":
            out[name] = t.detach().to(dtype).contiguous()
            continue
        q = layer.quantized_weight()
        gamma = q.scale.float().reshape(1)
        out[name] = pack_ternary_transformers(q.codes)
        out[f"{name}_scale"] = 1.0 / gamma if linear_class == "bitlinear" else gamma
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


def quantization_config(
    model: nn.Module, layers: list[tuple[str, BitLinear]], linear_class: str, mode: str
) -> dict:
    """The `bitnet` quantization_config: the layers left full precision are named (every
    plain nn.Linear, the output head among them), since transformers converts all others."""
    if linear_class not in LINEAR_CLASSES:
        raise BitNetError(
            f"--linear-class {linear_class!r} is invalid: expected bitlinear or autobitlinear"
        )
    if mode not in MODES:
        raise BitNetError(f"--mode {mode!r} is invalid: expected offline or online")
    if mode == "online" and linear_class != "autobitlinear":
        raise BitNetError(
            "--mode online needs --linear-class autobitlinear (transformers' BitLinear holds "
            "packed weights only)"
        )
    if mode == "offline":
        check_four_rows(layers, "export", " (use --mode online)")
    quantized = {n for n, _ in layers}
    keep = sorted(
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized
    )
    return {
        "quant_method": "bitnet",
        "linear_class": linear_class,
        "quantization_mode": mode,
        "modules_to_not_convert": keep,
        "use_rms_norm": False,
        "rms_norm_eps": 1e-6,
    }


def generation_config(model: nn.Module) -> dict:
    c = getattr(model, "config", None)
    ids = {k: getattr(c, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}}


def write_hf(
    model: nn.Module,
    directory: str,
    linear_class: str = "bitlinear",
    mode: str = "offline",
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Write `model` (quantized) into the existing, empty `directory` as a `transformers`
    checkpoint: config.json, generation_config.json, model.safetensors."""
    from safetensors.torch import save_file

    layers = check_exportable(model)
    quant = quantization_config(model, layers, linear_class, mode)
    tensors = hf_state_dict(model, layers, linear_class, mode, dtype)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    for name, obj in (
        ("config.json", hf_config(model, quant, dtype)),
        ("generation_config.json", generation_config(model)),
    ):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
