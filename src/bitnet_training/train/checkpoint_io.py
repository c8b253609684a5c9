"""`CheckpointIO`: how the `Trainer` reads and writes checkpoints, in either format (one
file per kind, `checkpoint.py`; or DCP shards, `sharded.py`), into either layout (a plain
or DDP-wrapped module, or FSDP's DTensor shards). Readers accept both formats."""

from __future__ import annotations

import os

import torch

from ..errors import BitNetError
from .checkpoint import (
    load_model_weights,
    load_optimizer_state,
    load_rng,
    load_trainable_weights,
    prune_checkpoints,
    read_metadata,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
    write_pointer,
)
from .sharded import (
    is_dtensor_model,
    is_sharded,
    load_full_into_sharded,
    load_full_optimizer_into_sharded,
    load_sharded_model,
    load_sharded_optimizer,
    save_sharded_checkpoint,
    whole_model_keys,
)


def _is_stage(model: torch.nn.Module) -> bool:
    return getattr(model, "pipeline", None) is not None


class CheckpointIO:
    """One directory per step. `sharded`: every rank writes its shards with
    `torch.distributed.checkpoint` (FSDP's layout; all ranks call `save`), else rank 0 writes
    single files. Reading takes either format into any layout.

    `trainable_only`: the checkpoint holds only the parameters that train (and the buffers),
    as parameter-efficient fine-tuning wants: adapters of a few MB beside a frozen base that
    is rebuilt from its source. Loading then checks that every trainable parameter is in the
    checkpoint and fills only those."""

    def __init__(self, trainable_only: bool = False, sharded: bool = False):
        self.trainable_only, self.sharded = trainable_only, sharded

    def save(self, output_dir, step, model, optimizer, state, rng, metadata, before_commit=None):
        """Write checkpoint `step` atomically; returns its path."""
        if _is_stage(model) and not self.sharded:
            raise BitNetError(
                "a pipeline stage holds part of the model: its checkpoints are sharded "
                "(CheckpointIO(sharded=True)); rank 0 alone would write stage 0's part"
            )
        save = save_sharded_checkpoint if self.sharded else save_checkpoint
        return save(
            output_dir, step, model, optimizer, state, rng, metadata, before_commit,
            trainable_only=self.trainable_only,
        )  # fmt: skip

    def resolve(self, path: str) -> str:
        return resolve_checkpoint(path)

    def read_state(self, ckpt: str) -> dict:
        return read_state(ckpt)

    def read_metadata(self, ckpt: str) -> dict:
        return read_metadata(ckpt)

    def load_model(self, model: torch.nn.Module, ckpt: str, may_miss=None) -> None:
        """The model tensors of `ckpt` into `model` (names checked: a checkpoint of another
        architecture is a one-line `BitNetError`)."""
        stage = _is_stage(model)  # a pipeline stage holds some of the model's tensors
        if is_sharded(ckpt):
            load_sharded_model(model, ckpt, self.trainable_only, may_miss, stage)
            return
        if stage:  # the other stages' tensors are not unexpected
            others = whole_model_keys(set(model.state_dict()))
            load_model_weights(model, ckpt, may_miss, others=others)
        elif is_dtensor_model(model):  # full tensors into FSDP shards
            load_full_into_sharded(model, ckpt, self.trainable_only, may_miss)
        elif self.trainable_only:
            load_trainable_weights(model, ckpt)
        else:
            load_model_weights(model, ckpt, may_miss)

    def load_optimizer(self, ckpt: str, model: torch.nn.Module, optimizer) -> bool:
        """The optimizer state of `ckpt` into `optimizer` (over `model`'s parameters); False
        when the checkpoint has none."""
        if is_sharded(ckpt):
            return load_sharded_optimizer(model, optimizer, ckpt)
        osd = load_optimizer_state(ckpt)
        if osd is None:
            return False
        if _is_stage(model):
            raise BitNetError(
                f"checkpoint {ckpt!r} is a single-file one, whose optimizer state is ordered by "
                "the whole model's parameters: a pipeline stage resumes from sharded "
                "checkpoints (saved under fsdp, tp or pp); use init_from for the weights alone"
            )
        try:
            if is_dtensor_model(model):
                load_full_optimizer_into_sharded(model, optimizer, osd)
            else:
                optimizer.load_state_dict(osd)
        except (ValueError, KeyError) as e:
            raise BitNetError(f"optimizer state does not fit: {e}") from None
        return True

    def load_rng(self, ckpt: str) -> dict[str, torch.Tensor]:
        return load_rng(ckpt)

    def point(self, output_dir: str, name: str, ckpt: str) -> None:
        """Move pointer `name` (`latest`, `best`) to checkpoint `ckpt`."""
        write_pointer(output_dir, name, os.path.basename(ckpt))

    def prune(self, output_dir: str, keep: int | None, protect: set[str]) -> list[str]:
        return prune_checkpoints(output_dir, keep, protect)
