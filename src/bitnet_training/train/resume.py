"""What a checkpoint holds of a Trainer besides weights and optimizer state, and putting it
back: step, data position, schedule and callback states, grad scaler, RNG, best metric."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from ..errors import BitNetError
from . import checkpoint as ckpt_io
from .rng import restore_rng

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)


def snapshot(trainer: Trainer, rng_json: dict) -> dict:
    """The JSON-serializable state of `trainer` for `trainer_state.json` (`rng_json`: the
    NumPy and Python generator states from `capture_rng`)."""
    c, s, data = trainer.config, trainer.state, trainer.train_data
    return {
        "step": s.step,
        "tokens_seen": s.tokens_seen,
        "total_steps": trainer.total_steps,
        "best_metric": s.best_metric,
        "best_step": s.best_step,
        "best_checkpoint": s.best_checkpoint and os.path.basename(s.best_checkpoint),
        "data": {
            **trainer.sampler.state_dict(),
            "num_items": trainer.sampler.num_items,
            "fingerprint": getattr(data, "fingerprint", None),
            "dataset": data.state_dict() if hasattr(data, "state_dict") else None,
        },
        "callbacks": {
            k: v
            for k, v in ((cb.key, cb.state_dict()) for cb in trainer.callbacks)
            if v is not None
        },
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "rng": rng_json,
        "precision": trainer.precision,
        "optimizer": type(trainer.optimizer).__name__,
        "config": c.to_dict(),
    }


def restore(trainer: Trainer, ckpt: str, st: dict) -> str:
    """Put checkpoint `ckpt` (its parsed `trainer_state.json` is `st`) back into `trainer`:
    weights, optimizer, callbacks, scaler, data position, step and RNG. Data of another size
    or fingerprint is refused. Returns `ckpt`."""
    data = st["data"]
    if data["num_items"] != trainer.sampler.num_items:
        raise BitNetError(
            f"checkpoint {ckpt!r} was trained on {data['num_items']} sequences, this "
            f"run has {trainer.sampler.num_items}: resuming needs the same data and seq_len"
        )
    ours = getattr(trainer.train_data, "fingerprint", None)
    if data.get("fingerprint") and ours and data["fingerprint"] != ours:
        raise BitNetError(
            f"checkpoint {ckpt!r} was trained on other data (fingerprint "
            f"{data['fingerprint']}, this run's is {ours}): resuming needs the same data"
        )
    saved_opt, ours_opt = st.get("optimizer"), type(trainer.optimizer).__name__
    if saved_opt is not None and saved_opt != ours_opt:
        raise BitNetError(
            f"checkpoint {ckpt!r} was trained with {saved_opt}, this run uses {ours_opt}: "
            "resuming needs the same optimizer"
        )
    ckpt_io.load_model_weights(trainer.model, ckpt)
    opt = ckpt_io.load_optimizer_state(ckpt)
    if opt is not None:
        try:
            trainer.optimizer.load_state_dict(opt)
        except (ValueError, KeyError) as e:
            raise BitNetError(f"checkpoint {ckpt!r}: optimizer state does not fit: {e}") from None
    for cb in trainer.callbacks:
        if cb.key in st.get("callbacks", {}):
            cb.load_state_dict(st["callbacks"][cb.key])
    if trainer.scaler is not None and st.get("scaler"):
        trainer.scaler.load_state_dict(st["scaler"])
    trainer.sampler.load_state_dict(data)
    if data.get("dataset") is not None and hasattr(trainer.train_data, "load_state_dict"):
        trainer.train_data.load_state_dict(data["dataset"])
    planned = st.get("total_steps")
    if planned is not None and planned != trainer.total_steps:
        log.warning(
            "the checkpoint's run was planned for %d steps, this one for %d: the "
            "learning-rate schedule keeps its original shape, so steps past %d run at its "
            "final learning rate (0 for schedules that decay to eta_min=0)",
            planned,
            trainer.total_steps,
            planned,
        )
    s = trainer.state
    s.step, s.tokens_seen = int(st["step"]), int(st["tokens_seen"])
    s.best_metric, s.best_step = st.get("best_metric"), st.get("best_step")
    best = st.get("best_checkpoint")  # a sibling of the checkpoint we resume from
    best = os.path.join(os.path.dirname(os.path.abspath(ckpt)), best) if best else None
    s.best_checkpoint = best if best and os.path.isdir(best) else None
    s.last_checkpoint = ckpt
    restore_rng(ckpt_io.load_rng(ckpt), st.get("rng", {}))
    log.info("resumed from %s at step %d", ckpt, s.step)
    return ckpt
