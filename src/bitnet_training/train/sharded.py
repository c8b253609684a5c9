"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP), and loading either format
into either layout.

A sharded checkpoint is laid out as the single-file one (`checkpoint.py`), with the model
and optimizer tensors in a DCP directory `sharded/` instead of `model.safetensors` and
`optimizer.pt`: every rank writes its own shards (`__<rank>_0.distcp`) and rank 0 the index
(`.metadata`), under tensor names (`model.<parameter>`, `optimizer.state.<parameter>.<key>`),
not layouts. So a checkpoint saved by FSDP over 2 ranks loads into 1 rank or 4, into a plain
module in a single process (evaluation, generation, export) or into DDP: DCP reads the slices
each rank needs. Rank 0 creates the temporary directory and renames it into place once every
rank has written, as the single-file save does.

Loading a single-file checkpoint into an FSDP-sharded model goes the other way: the full
tensors are split into this rank's shards (`set_model_state_dict` / `set_optimizer_state_dict`
with `full_state_dict`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import BitNetError
from .checkpoint import (
    MODEL_FILE,
    commit_checkpoint,
    new_temp_dir,
    refuse_mismatch,
    trainable_state,
    write_trainer_files,
)

SHARDED_DIR = "sharded"


def _flat():
    """Optimizer state keyed by parameter name, hyperparameters too (`state.<name>.exp_avg`,
    `param_groups.<name>.lr`): what each rank saves is then its own parameters' entries, so
    any layout (FSDP shards, pipeline stages holding different parameters) saves and loads
    them by name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


@contextlib.contextmanager
def _quiet():
    """DCP warns that it loads in a single process when no process group exists: that is
    what a single-process reader (eval, consolidate) means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_sharded(ckpt: str) -> bool:
    """Whether checkpoint directory `ckpt` holds DCP shards rather than single files."""
    return os.path.isfile(os.path.join(ckpt, SHARDED_DIR, ".metadata"))


def is_dtensor_model(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are DTensors (FSDP2 / tensor-parallel shards)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def _model_state(model: torch.nn.Module, trainable_only: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model)
    if trainable_only:
        keep = set(trainable_state(model))
        sd = {k: v for k, v in sd.items() if k in keep}
    return sd


def save_sharded_checkpoint(
    output_dir: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
    rng: dict[str, torch.Tensor],
    metadata: dict | None = None,
    before_commit=None,
    trainable_only: bool = False,
) -> str:
    """Write checkpoint `step` with every rank's shards (a collective: all ranks call it);
    rank 0 writes the trainer files and commits. Returns the final path on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dist, rank = _dist(), torch.distributed.get_rank() if _dist() else 0
    tmp = [None]
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        tmp = [new_temp_dir(output_dir)]
    if dist:
        torch.distributed.broadcast_object_list(tmp, src=0)
    tmp = tmp[0]
    tensors = {"model": _model_state(model, trainable_only)}
    if optimizer is not None:
        tensors["optimizer"] = get_optimizer_state_dict(model, optimizer, options=_flat())
    try:
        with _quiet():
            dcp.save(tensors, checkpoint_id=os.path.join(tmp, SHARDED_DIR), no_dist=not dist)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    outcome = [("ok", "")]
    if rank == 0:
        try:
            write = lambda d: write_trainer_files(d, state, rng, metadata)  # noqa: E731
            outcome = [("ok", commit_checkpoint(output_dir, step, write, tmp, before_commit))]
        except BaseException as e:
            if dist:  # the other ranks wait for the outcome: tell them, then raise here
                failed = [("error", f"{type(e).__name__}: {e}")]
                torch.distributed.broadcast_object_list(failed, src=0)
            raise
    if dist:
        torch.distributed.broadcast_object_list(outcome, src=0)
    kind, what = outcome[0]
    if kind != "ok":
        raise BitNetError(f"rank 0 failed to write checkpoint {step}: {what}")
    return what


def _stored_keys(ckpt: str, prefix: str) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(os.path.join(ckpt, SHARDED_DIR)).read_metadata()
    except Exception as e:  # a truncated or foreign .metadata
        raise BitNetError(f"checkpoint {ckpt!r}: unreadable {SHARDED_DIR}/.metadata: {e}") from None
    return {k[len(prefix) :] for k in meta.state_dict_metadata if k.startswith(prefix)}


def _check_keys(
    ckpt: str, want: set[str], stored: set[str], may_miss=None, stage: bool = False
) -> None:
    missing = [k for k in want - stored if may_miss is None or not may_miss(k)]
    refuse_mismatch(ckpt, missing, stored - (whole_model_keys(want) if stage else want))


def whole_model_keys(own: set[str]) -> set[str]:
    """The names of every pipeline stage's tensors (a collective: each stage passes its own),
    so a stage's load refuses only what no stage has."""
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, sorted(own))
    return {k for part in parts for k in part}


def _last_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[-1].strip() if text else type(e).__name__


def load_sharded_model(
    model: torch.nn.Module,
    ckpt: str,
    trainable_only: bool = False,
    may_miss=None,
    stage: bool = False,
) -> None:
    """Load the model tensors of sharded checkpoint `ckpt` into `model`, whatever its layout
    (plain, DDP's replica, FSDP shards); the names must match as for a single-file load.
    Under a process group every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    sd = _model_state(model, trainable_only)
    stored = _stored_keys(ckpt, "model.")
    _check_keys(ckpt, set(sd), stored, may_miss, stage)
    sd = {k: v for k, v in sd.items() if k in stored}
    try:
        with _quiet():
            dcp.load(
                {"model": sd}, checkpoint_id=os.path.join(ckpt, SHARDED_DIR), no_dist=not _dist()
            )
    except Exception as e:
        raise BitNetError(f"checkpoint {ckpt!r} does not fit this model: {_last_line(e)}") from None
    set_model_state_dict(model, sd, options=StateDictOptions(strict=False))


def load_sharded_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: str
) -> bool:
    """Load the optimizer state of sharded checkpoint `ckpt` into `optimizer` (over
    `model`'s parameters, any layout); False when the checkpoint has none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    if not _stored_keys(ckpt, "optimizer."):
        return False
    osd = get_optimizer_state_dict(model, optimizer, options=_flat())
    try:
        with _quiet():
            path = os.path.join(ckpt, SHARDED_DIR)
            dcp.load({"optimizer": osd}, checkpoint_id=path, no_dist=not _dist())
    except Exception as e:
        raise BitNetError(f"optimizer state does not fit: {_last_line(e)}") from None
    set_optimizer_state_dict(model, optimizer, osd, options=_flat())
    return True


def load_full_into_sharded(
    model: torch.nn.Module, ckpt: str, trainable_only: bool = False, may_miss=None
) -> None:
    """Load `model.safetensors` of single-file checkpoint `ckpt` into DTensor-sharded
    `model` (each rank keeps its shards), names checked as for a plain load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    path = os.path.join(ckpt, MODEL_FILE)
    if not os.path.isfile(path):
        raise BitNetError(f"checkpoint {ckpt!r} has no {MODEL_FILE}")
    try:
        sd = load_file(path)
    except (SafetensorError, OSError) as e:
        raise BitNetError(f"checkpoint {ckpt!r}: unreadable {MODEL_FILE}: {e}") from None
    ours = model.state_dict()
    want = set(trainable_state(model)) if trainable_only else set(ours)
    aliases: dict[int, list[str]] = {}  # a tied weight is stored once, under one name
    for name, t in ours.items():
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.numel():
            aliases.setdefault(local.data_ptr(), []).append(name)
    tied = {n for names in aliases.values() if any(n in sd for n in names) for n in names} - set(sd)
    _check_keys(ckpt, want - tied, set(sd), may_miss)
    try:
        set_model_state_dict(
            model, sd, options=StateDictOptions(full_state_dict=True, strict=False)
        )
    except RuntimeError as e:  # shape mismatch
        raise BitNetError(f"checkpoint {ckpt!r} does not fit this model: {_last_line(e)}") from None


def load_full_optimizer_into_sharded(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, osd: dict
) -> None:
    """Load a single-file checkpoint's optimizer state (`optimizer.state_dict()`: keyed by
    parameter index) into `optimizer` over DTensor-sharded `model`, through the parameter
    names both share."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {p: n for n, p in model.named_parameters()}
    ours = [p for g in optimizer.param_groups for p in g["params"]]
    saved = [i for g in osd["param_groups"] for i in g["params"]]
    if len(saved) != len(ours):
        raise BitNetError(
            f"optimizer state does not fit: {len(saved)} parameters saved, {len(ours)} here"
        )
    fqn = {i: names[p] for i, p in zip(saved, ours, strict=True)}
    by_name = {
        "state": {fqn[i]: v for i, v in osd["state"].items()},
        "param_groups": [
            {**g, "params": [fqn[i] for i in g["params"]]} for g in osd["param_groups"]
        ],
    }
    set_optimizer_state_dict(
        model, optimizer, by_name, options=StateDictOptions(full_state_dict=True)
    )
