"""llama.cpp's `bitnet` GGUF architecture read as a `BitNetLM` (`transformers`' GGUF loader
has no `bitnet`): `load_pretrained` takes such files through `read_gguf`, and
`export --format gguf` writes them with the same tensor names."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import BitNetError
from .bitnet import BitNetLM
from .config import ModelConfig

PROJ = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
NORMS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.attn_sub_norm": "attn_sub_norm",
    "mlp.ffn_sub_norm": "ffn_sub_norm",
}


def read_gguf(path: str, dtype: torch.dtype = torch.float32) -> tuple[BitNetLM, dict]:
    """A `bitnet` GGUF as a full-precision `BitNetLM` in `dtype` (each projection's latent
    weight codes * gamma / mean|codes|, whose absmean ternary quantization gives back the
    stored codes and gamma), and its metadata as a config dict."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # truncated, not GGUF
        raise BitNetError(f"{path!r} is not a readable GGUF file: {e}") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "bitnet":
        raise BitNetError(f"{path!r}: GGUF architecture {arch!r}, expected 'bitnet'")
    tensors = {t.name: t for t in reader.tensors}
    k = "bitnet."
    config = dict(
        vocab_size=int(field(k + "vocab_size", tensors["token_embd.weight"].shape[-1])),
        hidden_size=int(field(k + "embedding_length")),
        intermediate_size=int(field(k + "feed_forward_length")),
        num_hidden_layers=int(field(k + "block_count")),
        num_attention_heads=int(field(k + "attention.head_count")),
        num_key_value_heads=int(field(k + "attention.head_count_kv")),
        head_dim=int(field(k + "rope.dimension_count")),
        max_position_embeddings=int(field(k + "context_length")),
        rms_norm_eps=float(field(k + "attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(k + "rope.freq_base", 10000.0)),
        tie_word_embeddings=True,
        hidden_act="silu",
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
        pad_token_id=field("tokenizer.ggml.padding_token_id"),
    )
    model = BitNetLM(ModelConfig(**config)).to(dtype)

    def array(name) -> torch.Tensor:
        t = tensors.get(name)
        if t is None:
            raise BitNetError(f"{path!r} has no tensor {name}")
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float64))

    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(array("token_embd.weight"))
        model.model.norm.weight.copy_(array("output_norm.weight"))
        for i, layer in enumerate(model.model.layers):
            for ours, theirs in NORMS.items():
                layer.get_submodule(ours).weight.copy_(array(f"blk.{i}.{theirs}.weight"))
            for ours, theirs in PROJ.items():
                codes = array(f"blk.{i}.{theirs}.weight")
                gamma = array(f"blk.{i}.{theirs}.scale").reshape(())
                frac = (codes != 0).double().mean().clamp_min(1e-12)
                layer.get_submodule(ours).weight.copy_(codes * gamma / frac)
    return model, {"model_type": "bitnet", "gguf_architecture": "bitnet", **config}
