"""GGUF for llama.cpp (`--format gguf`, `--gguf-type tq1_0 | tq2_0 | f16 | f32`), written with
the `gguf` package directly in llama.cpp's `bitnet` architecture layout, and read back.

Layout: `token_embd`, `output_norm`, and per block `blk.N.{attn_norm, attn_sub_norm, ffn_norm,
ffn_sub_norm, attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down}.weight`, each
quantized projection stored as its ternary codes (exactly: TQ2_0 / TQ1_0 blocks of 256 codes
with block scale 1, or f16 / f32 values in {-1, 0, 1}) beside `blk.N.<proj>.scale`, the
absmean gamma (F32, shape [1]) that llama.cpp multiplies each matmul's result by. Not routed
through llama.cpp's `convert_hf_to_gguf.py`: its BitNet path re-ternarizes already ternary
weights (not idempotent: measured x0.69 shrink) and drops the sub-norms.

What llama.cpp's `bitnet` graph runs, checked before anything is written (one line naming
the setting): a SiLU gated FFN (`model.hidden_act=silu`; the 2B4T's squared ReLU is not
read by it), tied embeddings (`model.tie_word_embeddings=true`: it always uses `token_embd`
as the output layer), and for the ternary types every quantized layer's in_features a
multiple of 256 (their block size). llama.cpp quantizes activations per 256-value block
(Q8_K) with ternary types, not per token, so its logits agree with ours to ~1e-3, not
exactly; with f32 / f16 weights it does not quantize activations at all.

`models.gguf_bitnet.read_gguf(path)` loads such a file back (`model.pretrained=FILE.gguf`).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from ..errors import BitNetError
from ..models.bitnet import BitNetLM
from ..models.export_targets import check_gguf
from ..models.gguf_bitnet import NORMS, PROJ


def _tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int], dict, list[str]]:
    """The token list, types and special ids for `tokenizer.ggml.*` (a `gpt2` byte-level
    vocabulary: our byte tokenizer's ids, or a tokenizer.json's), padded to `vocab_size`."""
    import gguf

    from ..data.tokenizer import SPECIAL_TOKENS, ByteTokenizer, HFTokenizer
    from .tokenizer import byte_symbols

    if isinstance(tokenizer, ByteTokenizer):
        sym = byte_symbols()
        tokens = [sym[b] for b in range(256)] + list(SPECIAL_TOKENS)
        special = {"bos": 256, "eos": 257, "pad": 258}
        # Each byte is a token: no merges. llama.cpp's gpt2 vocabulary requires the key and
        # gguf cannot write an empty array, so it holds one merge that never applies (special
        # tokens are split off before BPE, so they are never adjacent symbols).
        merges = [f"{SPECIAL_TOKENS[0]} {SPECIAL_TOKENS[1]}"]
    elif isinstance(tokenizer, HFTokenizer):
        model = json.loads(tokenizer.tok.to_str())["model"]
        if model.get("type") != "BPE":
            raise BitNetError(
                f"export --format gguf: a {model.get('type')} tokenizer.json has no llama.cpp "
                "gpt2 vocabulary (BPE only)"
            )
        tokens = [tokenizer.tok.id_to_token(i) or f"<|unused_{i}|>" for i in range(len(tokenizer))]
        special = {"eos": tokenizer.eos_token_id}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    else:
        raise BitNetError(
            f"export --format gguf: cannot write a {type(tokenizer).__name__} tokenizer into GGUF"
        )
    if len(tokens) > vocab_size:
        raise BitNetError(f"the tokenizer has {len(tokens)} tokens, the model {vocab_size}")
    T = gguf.TokenType
    types = [T.NORMAL] * len(tokens)
    for i in special.values():
        types[i] = T.CONTROL
    n = len(tokens)
    tokens += [f"<|unused_{i}|>" for i in range(n, vocab_size)]
    types += [T.UNUSED] * (vocab_size - n)
    return tokens, [int(t) for t in types], special, merges


def write_gguf(model: BitNetLM, tokenizer, path: str, gguf_type: str = "tq2_0") -> None:
    """Write `model` to GGUF file `path` (the caller makes it atomic) as `gguf_type`."""
    import gguf

    check_gguf(model, gguf_type)
    c = model.config
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its per-file progress lines
    qtype = {
        "tq1_0": gguf.GGMLQuantizationType.TQ1_0,
        "tq2_0": gguf.GGMLQuantizationType.TQ2_0,
        "f16": gguf.GGMLQuantizationType.F16,
        "f32": gguf.GGMLQuantizationType.F32,
    }[gguf_type]
    w = gguf.GGUFWriter(path, "bitnet")
    w.add_name("bitnet-training export")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(
        {
            "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
            "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "f32": gguf.LlamaFileType.ALL_F32,
        }[gguf_type]
    )
    tokens, types, special, merges = _tokens(tokenizer, c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for kind, i in special.items():
        getattr(w, f"add_{kind}_token_id")(i)
    w.add_add_bos_token(False)

    Q = gguf.GGMLQuantizationType
    F32, F16 = Q.F32, Q.F16

    def put(name, t: torch.Tensor, ty):
        data = t.detach().float().cpu().numpy()
        if ty in (Q.TQ1_0, Q.TQ2_0):
            w.add_tensor(name, gguf.quants.quantize(data, ty), raw_dtype=ty)  # bytes per row
        else:
            w.add_tensor(
                name, data.astype(np.float16 if ty == gguf.GGMLQuantizationType.F16 else np.float32)
            )

    put("token_embd.weight", model.model.embed_tokens.weight, F32 if gguf_type == "f32" else F16)
    put("output_norm.weight", model.model.norm.weight, F32)  # llama.cpp wants F32 norms
    for i, layer in enumerate(model.model.layers):
        for ours, theirs in NORMS.items():
            put(
                f"blk.{i}.{theirs}.weight",
                layer.get_submodule(ours).weight,
                gguf.GGMLQuantizationType.F32,
            )
        for ours, theirs in PROJ.items():
            q = layer.get_submodule(ours).quantized_weight()
            put(f"blk.{i}.{theirs}.weight", q.codes, qtype)  # exactly {-1, 0, 1}
            put(
                f"blk.{i}.{theirs}.scale", q.scale.float().reshape(1), gguf.GGMLQuantizationType.F32
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
