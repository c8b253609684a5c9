"""Our compact format (`--format ternary`): every quantized layer's ternary codes packed in
base 3, 5 per byte (1.6 bits per weight, against 2.0 for `transformers`' packing and 1.69
for llama.cpp's TQ1_0), with its absmean scale(s); the other tensors (embeddings, norms,
head) as they are. Files: `model.safetensors` (the state dict of the model whose `BitLinear`
layers became `PackedTernaryLinear`: `<layer>.qweight` uint8, `<layer>.weight_scale`
float32) and `ternary.json` (format, version, the `ModelConfig`, the layers' `QATConfig`, the
packing, the tokenizer kind).

`load_ternary(DIR)` rebuilds the `BitNetLM` with those packed layers: its logits equal the
exported model's in eval mode exactly (the packed layer computes what `BitLinear.eval()`
does from the same codes and scales; tested). Per-channel and per-group scales pack too.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..data.tokenizer import ByteTokenizer, HFTokenizer
from ..errors import BitNetError
from ..models.bitnet import BitNetLM
from ..models.config import ModelConfig
from ..nn.bitlinear import BitLinear
from ..nn.convert import quantize_model
from ..peft.packed import pack_model
from ..quant.config import QATConfig

FORMAT, VERSION, META = "bitnet-training-ternary", 1, "ternary.json"


def _one_config(model: nn.Module) -> QATConfig:
    configs = {m.config.model_dump_json() for m in model.modules() if isinstance(m, BitLinear)}
    if not configs:
        raise BitNetError(
            "export --format ternary: the model has no quantized layers (a full-precision "
            "run): train with quantize=true"
        )
    if len(configs) > 1:
        raise BitNetError(
            "export --format ternary: the quantized layers use different QAT settings, which "
            "one ternary.json cannot describe"
        )
    return next(m.config for m in model.modules() if isinstance(m, BitLinear))


def write_ternary(model: nn.Module, tokenizer, directory: str, dtype=torch.float32) -> None:
    """Write BitNetLM `model` (quantized; unchanged) into the existing, empty `directory`."""
    import copy

    from safetensors.torch import save_file

    if not isinstance(model, BitNetLM):
        raise BitNetError(
            f"export --format ternary writes a BitNetLM; this model is a {type(model).__name__} "
            "(use --format hf)"
        )
    qat = _one_config(model)
    packed = copy.deepcopy(model).eval()
    pack_model(packed, "base3")  # refuses layers that are not ternary now, naming why
    tensors = {}
    for name, t in packed.state_dict().items():
        keep = name.endswith((".qweight", ".weight_scale")) or not t.is_floating_point()
        tensors[name] = (t if keep else t.to(dtype)).detach().contiguous()
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "packing": "base3",
        "model_config": model.config.model_dump(mode="json"),
        "qat": qat.model_dump(mode="json"),
        "tokenizer": "bytes" if isinstance(tokenizer, ByteTokenizer) else "tokenizer.json",
    }
    with open(os.path.join(directory, META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def load_ternary(directory: str) -> tuple[BitNetLM, object]:
    """The model (eval mode, packed ternary layers) and tokenizer of a `--format ternary`
    export."""
    from safetensors.torch import load_file

    path = os.path.join(directory, META)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise BitNetError(f"{directory!r} is not a ternary export: {META}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BitNetError(f"{directory!r}: {META} is not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise BitNetError(f"{directory!r}: {FORMAT} version {meta.get('version')} unsupported")
    model = BitNetLM(ModelConfig(**meta["model_config"]))
    quantize_model(model, QATConfig(**meta["qat"]))
    pack_model(model, meta.get("packing", "base3"))
    try:
        tensors = load_file(os.path.join(directory, "model.safetensors"))
    except Exception as e:  # missing file, not safetensors
        raise BitNetError(f"{directory!r}: unreadable model.safetensors: {e}") from None
    ours = model.state_dict()
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing, unexpected = set(ours) - set(tensors) - tied, set(tensors) - set(ours)
    if missing or unexpected:
        raise BitNetError(
            f"{directory!r}: model.safetensors does not match ternary.json: missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    with torch.no_grad():
        for k, t in tensors.items():
            if ours[k].shape != t.shape:
                want = tuple(ours[k].shape)
                raise BitNetError(f"{directory!r}: {k} has shape {tuple(t.shape)}, expected {want}")
            ours[k].copy_(t)
    tokenizer = (
        ByteTokenizer()
        if meta.get("tokenizer") == "bytes"
        else HFTokenizer(os.path.join(directory, "tokenizer.json"))
    )
    return model.eval(), tokenizer
