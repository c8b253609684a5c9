"""Out to the tools that run ternary models: `bitnet-train export RUN -o DIR --format ...`.

`export_run` loads a run or checkpoint as evaluation does (sharded checkpoints are read
whole) and writes it, all or nothing, as a `transformers` checkpoint (`hf.py`) or our compact
base-3 format (`ternary.py`), with the tokenizer `AutoTokenizer` loads (`tokenizer.py`).
"""

from __future__ import annotations

import os

import torch

from ..atomic import atomic_directory
from ..errors import BitNetError

FORMATS = ("hf", "ternary", "gguf")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_run(
    path: str,
    out: str,
    format: str = "hf",
    linear_class: str = "bitlinear",
    mode: str = "offline",
    dtype: str | None = None,
    gguf_type: str = "tq2_0",
) -> str:
    """Write run or checkpoint `path` to directory `out` (absent or empty) in `format`;
    returns the checkpoint exported. `linear_class` / `mode`: the `hf` format's
    `quantization_config`; `dtype`: the full-precision tensors' (and online weights';
    default bfloat16; not for gguf, whose types come from `gguf_type`);
    `gguf_type`: the `gguf` format's projection type (the file is `DIR/model-<type>.gguf`)."""
    from ..recipe import load_run
    from .gguf import check_gguf, write_gguf
    from .hf import write_hf
    from .ternary import write_ternary
    from .tokenizer import write_tokenizer

    if format not in FORMATS:
        raise BitNetError(f"--format {format!r} is invalid: expected {' or '.join(FORMATS)}")
    if format == "gguf" and dtype is not None:
        raise BitNetError("--dtype describes the hf and ternary formats; gguf's is --gguf-type")
    dtype = dtype or "bfloat16"
    if dtype not in DTYPES:
        raise BitNetError(f"--dtype {dtype!r} is invalid: expected {', '.join(DTYPES)}")
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise BitNetError(f"export output {out!r} cannot be created: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise BitNetError(f"export output {out!r} cannot be created: {parent!r} is not writable")
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
        what = "is a file" if os.path.isfile(out) else "exists and is not empty"
        raise BitNetError(f"export output {out!r} {what}: choose another directory")
    cfg, model, tokenizer, ckpt = load_run(path)
    if cfg.peft.method != "none":
        raise BitNetError(
            f"{ckpt!r} is a PEFT run ({cfg.peft.method}): merge its adapters first "
            "(bitnet-train merge RUN -o MERGED), then export MERGED"
        )
    if not cfg.quantize:
        raise BitNetError(
            f"{ckpt!r} trained full-precision weights (quantize=false): there are no ternary "
            "weights to export"
        )
    model = model.float().eval()
    if format != "hf" and (linear_class, mode) != ("bitlinear", "offline"):
        raise BitNetError("--linear-class and --mode describe the hf format only")
    if format != "gguf" and gguf_type != "tq2_0":
        raise BitNetError("--gguf-type describes the gguf format only")
    if format == "gguf":
        check_gguf(model, gguf_type)  # before anything is written
    with atomic_directory(out) as tmp:  # all or nothing
        if format == "hf":
            write_hf(model, tmp, linear_class, mode, DTYPES[dtype])
        elif format == "ternary":
            write_ternary(model, tokenizer, tmp, DTYPES[dtype])
        else:
            write_gguf(model, tokenizer, os.path.join(tmp, f"model-{gguf_type}.gguf"), gguf_type)
        write_tokenizer(tokenizer, tmp)
    return ckpt
