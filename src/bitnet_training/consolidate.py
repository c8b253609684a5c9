"""`bitnet-train consolidate`: a sharded checkpoint (FSDP's DCP shards) turned into the
single-file format (`model.safetensors` + `optimizer.pt`), for tools that read only files.

The run's model and optimizer are rebuilt in this one process as the run built them, the
shards are read into them (DCP gathers the slices), and a checkpoint of the same step is
written, trainer state, RNG and metadata included: resuming it in one process continues
the run as resuming the shards would."""

from __future__ import annotations

import os
import shutil

from .atomic import atomic_directory
from .errors import BitNetError
from .optim import build_optimizer
from .recipe import load_run
from .train import checkpoint as ckpt_io
from .train.sharded import is_sharded


def consolidate_checkpoint(path: str, out: str) -> str:
    """Write sharded checkpoint `path` (or a run's latest) to run directory `out` (absent or
    empty) in the single-file format; returns the checkpoint written. The run's `base/`
    copy comes along, so eval, generate and `--resume` take `out` as they take the run."""
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
        what = "is a file" if os.path.isfile(out) else "exists and is not empty"
        raise BitNetError(f"consolidate output {out!r} {what}: choose another directory")
    ckpt = ckpt_io.resolve_checkpoint(path)
    if not is_sharded(ckpt):
        raise BitNetError(f"{ckpt!r} is already a single-file checkpoint: nothing to consolidate")
    cfg, model, _, ckpt = load_run(ckpt)
    peft = cfg.peft.method != "none"
    optimizer = build_optimizer(model, cfg.training.optimizer, cfg.training.learning_rate)
    from .train import CheckpointIO

    has_optimizer = CheckpointIO(trainable_only=peft).load_optimizer(ckpt, model, optimizer)
    state, meta = ckpt_io.read_state(ckpt), ckpt_io.read_metadata(ckpt)
    state.pop("format_version", None)
    meta["consolidated_from"] = os.path.abspath(ckpt)
    with atomic_directory(out) as tmp:  # all or nothing
        base = os.path.join(os.path.dirname(ckpt), "base")
        if os.path.isdir(base):
            shutil.copytree(base, os.path.join(tmp, "base"))
        written = ckpt_io.save_checkpoint(
            tmp, int(state["step"]), model, optimizer if has_optimizer else None, state,
            ckpt_io.load_rng(ckpt), meta, trainable_only=peft,
        )  # fmt: skip
        ckpt_io.write_pointer(tmp, "latest", os.path.basename(written))
    return os.path.join(out, os.path.basename(written))
