"""The callback interface: how anything (the recipe, a user, a model transform) takes part in
the training loop without the loop knowing what it is.

It sits at the bottom of the import graph (it imports nothing of the package), so a transform
such as `quantize_model` can supply callbacks without importing the `Trainer`. A module
declares the callbacks its training needs with a `trainer_callbacks()` method; the `Trainer`
collects them by walking `model.modules()`, which also finds modules inside DDP, FSDP or peft
wrappers. Callbacks of the same `key` are one callback: the first one found is kept, and a
callback the caller passes replaces a collected or default one of the same key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


class Callback:
    """Base class: every hook does nothing. Override the ones you need.

    Hooks run in ascending `order` (ties: the order of the list). `trainer` is the running
    `Trainer`; the hooks may read `trainer.state` (step, tokens, best metric), the model, the
    optimizer, and set `trainer.state.should_stop` / `should_save`.
    """

    order = 0

    @property
    def key(self) -> str:
        """Identity of this callback: its entry in a checkpoint, and what deduplicates it."""
        return type(self).__name__

    # ------------------------------------------------------------------ the loop's events
    def setup(self, trainer) -> None:
        """Once, after the optimizer and the data plan exist, before any checkpoint is read."""

    def on_train_begin(self, trainer) -> None:
        """Once, after a resume (if any), before the first step."""

    def on_step_begin(self, trainer) -> None:
        """Before each optimizer step's forward passes."""

    def on_after_backward(self, trainer) -> None:
        """After every micro-batch's backward (gradients present, unscaled), before clipping."""

    def on_optimizer_step(self, trainer) -> None:
        """Right after `optimizer.step()`, before the gradients are cleared."""

    def on_step_end(self, trainer) -> None:
        """After each optimizer step; `trainer.state.step` already counts it."""

    def on_log(self, trainer, logs: dict) -> None:
        """A log record is being written; callbacks may add entries to `logs`."""

    def on_evaluate(self, trainer, metrics: dict) -> None:
        """An evaluation finished; callbacks may add entries to `metrics`."""

    def on_save(self, trainer, path: str) -> None:
        """A checkpoint was written at `path`."""

    def on_train_loop_end(self, trainer) -> None:
        """The loop stopped (done, stopped early, or a signal); before the final checkpoint."""

    def on_train_end(self, trainer, result) -> None:
        """Once, with the `TrainResult`."""

    # ------------------------------------------------ pieces a transform may contribute
    def configure_param_groups(self, model: nn.Module, groups: list[dict]) -> list[dict]:
        """Rewrite the optimizer's parameter groups of `model` (e.g. weight decay per kind
        of weight); called when the optimizer is built from a config."""
        return groups

    def aux_loss(self, trainer) -> torch.Tensor | None:
        """A loss term added to every optimizer step's loss (None: nothing)."""
        return None

    # ------------------------------------------------------------------------- state
    def state_dict(self) -> dict | None:
        """JSON-serializable state saved in checkpoints (None: nothing to save)."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def state_tensors(self) -> dict[str, torch.Tensor] | None:
        """Tensors saved in checkpoints beside `state_dict` (safetensors, exact), for state
        too large for JSON (e.g. per-parameter statistics); None: nothing to save."""
        return None

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `state_tensors` returned (on the CPU; move them where they belong)."""


def collect_callbacks(model: nn.Module) -> list[Callback]:
    """The callbacks that the modules of `model` declare through `trainer_callbacks()`, one
    per key (the first found wins), in module order."""
    found: dict[str, Callback] = {}
    for module in model.modules():
        declare: Any = getattr(module, "trainer_callbacks", None)
        if callable(declare):
            for cb in declare():
                found.setdefault(cb.key, cb)
    return list(found.values())


def merge_callbacks(*lists: list[Callback]) -> list[Callback]:
    """One list from several, where a later list's callback replaces an earlier one of the
    same key; sorted by `order` (stable)."""
    merged: dict[str, Callback] = {}
    for callbacks in lists:
        for cb in callbacks:
            merged.pop(cb.key, None)
            merged[cb.key] = cb
    return sorted(merged.values(), key=lambda cb: cb.order)
