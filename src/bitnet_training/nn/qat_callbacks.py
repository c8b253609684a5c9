"""Callbacks that drive and watch quantization-aware training.

`QATControl` tells every `BitLinear` the current step before each optimizer step, which is
what makes progressive quantization, bit-width stages and quantization noise run (the Trainer
itself knows nothing about quantization). `LatentClipping` and `LinearWeightDecay` carry the
optimizer side of a `QATConfig`. Every `BitLinear` declares these three (`trainer_callbacks`),
so a plain `Trainer(model, ...).train()` runs them without being told. `TernaryDiagnostics`
measures, at every log step, how the quantized weights look and move: the share of -1 / 0 /
+1, the flip rate, the relative quantization error; `MultiStage` and `QuantizationTuner`
are what the recipe adds for staged runs.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, field_validator
from torch import nn

from ..callback import Callback
from ..errors import BitNetError, ConfigError
from ..quant.config import QATConfig
from ..quant.fake_quant import quantize
from ..quant.functional import Quantized, dequantize
from ..settings import Refused, Section, unknown_key

if TYPE_CHECKING:
    from .bitlinear import BitLinear

log = logging.getLogger(__name__)


def _bitlinears(model: torch.nn.Module) -> list[tuple[str, BitLinear]]:
    # BitLinear imports this module (its layers declare these callbacks), so the layers are
    # recognised by their interface rather than their class. Named as inside a DDP wrapper
    # (no `module.` prefix), so every layout logs the same names.
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return [
        (n, m)
        for n, m in model.named_modules()
        if hasattr(m, "set_progress") and hasattr(m, "weight_spec") and hasattr(m, "config")
    ]


class QATControl(Callback):
    """Before every optimizer step (and after a resume), calls `BitLinear.set_progress(step)`
    on each quantized layer, so lambda, the bit stage and noise follow the step. Adds the
    current `qat_weight_lambda`, `qat_activation_lambda` and `qat_weight_bits` to the logs.
    Its checkpoint state records them; since they are pure functions of the step, a resumed
    run continues exactly."""

    def __init__(self):
        self.layers: list[tuple[str, BitLinear]] = []
        self.trainer = None
        self.held_steps = 0  # steps a QuantizationTuner held the schedule for

    def setup(self, trainer):
        self.layers, self.trainer = _bitlinears(trainer.model), trainer

    def schedule_step(self, trainer) -> int:
        """The step the quantization schedules read: the training step minus held steps."""
        return max(0, trainer.state.step - self.held_steps)

    def tightening(self, trainer) -> bool:
        """Whether quantization still changes after the current schedule step (a lambda
        below 1 now, or a schedule or bit stage that has not finished)."""
        t = self.schedule_step(trainer)
        for _, m in self.layers:
            c = m.config
            ends = [st.step for st in c.weight_bit_stages]
            for sch in (c.weight_schedule, c.activation_schedule):
                if sch is not None:
                    ends.append(sch.resolve(trainer.steps_per_epoch).end_step)
            if m.weight_blend < 1 or m.activation_blend < 1 or any(t < e for e in ends):
                return True
        return False

    def _apply(self, trainer) -> None:
        step = self.schedule_step(trainer)
        for _, m in self.layers:
            m.set_progress(step, trainer.steps_per_epoch)

    def on_train_begin(self, trainer):
        self._apply(trainer)

    def on_step_begin(self, trainer):
        self._apply(trainer)

    def current(self) -> dict:
        if not self.layers:
            return {}
        m = self.layers[0][1]
        spec = m.weight_spec()
        return {
            "qat_weight_lambda": m.weight_blend,
            "qat_activation_lambda": m.activation_blend,
            "qat_weight_bits": spec.bits if spec is not None else None,
        }

    def on_log(self, trainer, logs):
        logs.update(self.current())

    def on_train_end(self, trainer, result):
        if self.tightening(trainer) and not result.interrupted:
            log.warning(
                "quantization had not finished its schedule when training ended (weight lambda "
                "%.2f, schedule step %d of a longer schedule): the saved model is not fully "
                "quantized",
                self.current().get("qat_weight_lambda", 1.0),
                self.schedule_step(trainer),
            )

    def state_dict(self):
        step = self.trainer.state.step if self.trainer else 0
        return {"step": step, "held_steps": self.held_steps, **self.current()}

    def load_state_dict(self, state):
        # lambda, stages and noise follow from the restored step and the held steps.
        self.held_steps = int(state.get("held_steps", 0))


class LatentClipping(Callback):
    """After every optimizer step, clamps each `BitLinear`'s latent weight to +-`latent_clip`
    (its config's) times its quantization scale (per tensor, channel or group, as the layer
    quantizes). Layers whose config has no `latent_clip` are left alone."""

    def __init__(self):
        self.layers: list[BitLinear] = []

    def setup(self, trainer):
        self.layers = [m for _, m in _bitlinears(trainer.model)]

    @torch.no_grad()
    def on_optimizer_step(self, trainer):
        for m in self.layers:
            factor, spec = m.config.latent_clip, m.weight_spec()
            if factor is None or spec is None:
                continue
            q = quantize(m.weight.detach(), spec)
            bound = dequantize(Quantized(torch.ones_like(q.codes), q.scale, None), torch.float32)
            bound = (factor * bound).reshape(m.weight.shape).to(m.weight.dtype)
            torch.minimum(m.weight, bound, out=m.weight)
            torch.maximum(m.weight, -bound, out=m.weight)


class LinearWeightDecay(Callback):
    """`weight_decay_on: linear`: weight decay only on the weights of linear layers
    (`nn.Linear`, `BitLinear`), none on embeddings, norms, biases or quantizer scales. A
    weight tied to an embedding counts as an embedding. Rewrites the optimizer's groups."""

    def configure_param_groups(self, model, groups):
        linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        decayed = linear - embeddings
        decay = max((g.get("weight_decay", 0.0) for g in groups), default=0.0)
        params = [p for g in groups for p in g["params"]]
        out = [
            {"params": [p for p in params if id(p) in decayed], "weight_decay": decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
        ]
        return [g for g in out if g["params"]]


def declared_callbacks(layer: BitLinear) -> list[Callback]:
    """What a `BitLinear` asks of the training loop: the step clock always (lambda, bit
    stages, noise and calibration follow the step; it also logs the bits in force), latent
    clipping when its config sets `latent_clip`, linear-only weight decay when it sets
    `weight_decay_on: linear`."""
    out: list[Callback] = [QATControl()]
    if layer.config.latent_clip is not None:
        out.append(LatentClipping())
    if layer.config.weight_decay_on == "linear":
        out.append(LinearWeightDecay())
    return out


class QuantizationTuner(Callback):
    """Validation-based tuning of progressive quantization: after each evaluation, while
    quantization is still tightening, if `metric` (a loss) is worse than the best seen by more
    than `threshold` (relative), the schedule is held (the `QATControl` clock stops) until an
    evaluation is back within the threshold. Each decision goes to the log and, as
    `qat_tuner_hold` (1 holding, 0 not), into the evaluation metrics. Needs a `QATControl`
    among the callbacks."""

    def __init__(self, threshold: float = 0.05, metric: str = "val_loss"):
        if not threshold >= 0:
            raise ConfigError("qat_tuner.threshold", threshold, "a number >= 0")
        self.threshold, self.metric = threshold, metric
        self.best: float | None = None
        self.holding = False
        self.control: QATControl | None = None
        self.decisions: list[dict] = []

    def setup(self, trainer):
        found = [cb for cb in trainer.callbacks if isinstance(cb, QATControl)]
        if not found:
            raise BitNetError("QuantizationTuner needs a QATControl callback in the same run")
        self.control = found[0]

    def on_step_end(self, trainer):
        if self.holding:
            self.control.held_steps += 1

    def on_evaluate(self, trainer, metrics):
        if self.metric not in metrics:
            return
        value = float(metrics[self.metric])
        limit = None if self.best is None else self.best * (1 + self.threshold)
        if limit is not None and value > limit and self.control.tightening(trainer):
            decision = "hold" if not self.holding else "keep holding"
            self.holding = True
        elif self.holding and (limit is None or value <= limit):
            decision, self.holding = "release", False
        else:
            decision = "continue"
        if self.best is None or value < self.best:
            self.best = value
        record = {
            "step": trainer.state.step,
            "decision": decision,
            self.metric: value,
            "best": self.best,
            "schedule_step": self.control.schedule_step(trainer),
        }
        self.decisions.append(record)
        if decision != "continue":
            log.info(
                "quantization tuner at step %d: %s (%s %.4f, best %.4f, threshold %.0f%%)",
                trainer.state.step,
                decision,
                self.metric,
                value,
                self.best,
                100 * self.threshold,
            )
        metrics["qat_tuner_hold"] = int(self.holding)

    def state_dict(self):
        return {"best": self.best, "holding": self.holding}

    def load_state_dict(self, state):
        self.best, self.holding = state["best"], bool(state["holding"])


class TernaryDiagnostics(Callback):
    """At every log step, for each `BitLinear` and in total (weighted by size): the share of
    quantized weights at -1, 0 and +1 (`w_neg`, `w_zero`, `w_pos`, in units of the scale for
    wider grids: the share of zero codes is `w_zero`), the `flip_rate` (share of weights whose
    code changed since the previous log step) and the relative quantization error
    `quant_error` = ||W - Q(W)|| / ||W||, and, for statically quantized activations, the
    `act_clip_rate` (share of activations outside the range). Per-layer values are logged as
    `<stat>/<layer name>` when `per_layer` is True. Costs one quantization of each weight per
    log step (see benchmarks/diagnostics_cost.py)."""

    def __init__(self, per_layer: bool = True):
        self.per_layer = per_layer
        self.layers: list[tuple[str, BitLinear]] = []
        self.previous: dict[str, torch.Tensor] = {}

    def setup(self, trainer):
        self.layers = _bitlinears(trainer.model)

    @torch.no_grad()
    def measure(self) -> dict:
        out: dict = {}
        totals = {"w_neg": 0.0, "w_zero": 0.0, "w_pos": 0.0, "flip_rate": 0.0}
        n_all = n_flip = 0
        err_num = err_den = 0.0
        for name, m in self.layers:
            spec = m.weight_spec()
            if spec is None:
                continue
            w = m.weight.detach().float()
            q = quantize(w, spec)
            codes = q.codes if q.zero_point is None else q.codes - q.zero_point
            codes = codes.reshape(-1)
            n = codes.numel()
            stats = {
                "w_neg": float((codes < 0).sum()) / n,
                "w_zero": float((codes == 0).sum()) / n,
                "w_pos": float((codes > 0).sum()) / n,
            }
            codes8 = codes.to(torch.int16)
            prev = self.previous.get(name)
            if prev is not None and prev.shape == codes8.shape:
                flips = int((prev != codes8).sum())
                stats["flip_rate"] = flips / n
                n_flip += n
                totals["flip_rate"] += flips
            self.previous[name] = codes8
            diff = float((w - dequantize(q, torch.float32).reshape(w.shape)).norm())
            wn = float(w.norm())
            stats["quant_error"] = diff / max(wn, 1e-12)
            err_num += diff**2
            err_den += wn**2
            for k in ("w_neg", "w_zero", "w_pos"):
                totals[k] += stats[k] * n
            n_all += n
            if self.per_layer:
                out.update({f"{k}/{name}": v for k, v in stats.items()})
        if n_all:
            for k in ("w_neg", "w_zero", "w_pos"):
                out[k] = totals[k] / n_all
            out["quant_error"] = (err_num / max(err_den, 1e-24)) ** 0.5
            if n_flip:
                out["flip_rate"] = totals["flip_rate"] / n_flip
        return out

    def on_step_begin(self, trainer):
        # The activation clipping rate is measured in the forward: only in steps that log.
        nxt = trainer.state.step + 1
        log_now = nxt % trainer.config.log_every == 0 or nxt == trainer.total_steps
        for _, m in self.layers:
            m.track_clipping = log_now and m.act_observer is not None

    def clipping(self) -> dict:
        """`act_clip_rate`: the share of activations outside the static quantization range in
        the last tracked forward (layers with an observer only: BitNet's dynamic per-token
        absmax never clips)."""
        out, rates = {}, []
        for name, m in self.layers:
            if m.last_clip_rate is not None:
                rate = float(m.last_clip_rate)
                rates.append(rate)
                if self.per_layer:
                    out[f"act_clip_rate/{name}"] = rate
                m.last_clip_rate, m.track_clipping = None, False
        if rates:
            out["act_clip_rate"] = sum(rates) / len(rates)
        return out

    def on_log(self, trainer, logs):
        logs.update(self.measure())
        logs.update(self.clipping())


class TrainingStage(Section):
    """One stage of a multi-stage run: `steps` optimizer steps (the last stage runs on to
    the end), its own QAT settings and a learning-rate factor applied on top of the
    schedule."""

    _path = "stages"
    _as_list = True

    steps: int = Field(gt=0, description="optimizer steps (the last stage runs to the end)")
    name: str = Field("", description="shown in the logs")
    lr_factor: float = Field(1.0, gt=0, description="multiplies the scheduled LR")
    qat: dict[str, Any] = Field(
        default_factory=dict, description="qat keys overriding the run's for this stage"
    )

    @field_validator("qat")
    @classmethod
    def _settings_only(cls, qat):
        for key in qat:
            if key not in QATConfig.model_fields:
                raise Refused(key, unknown_key(QATConfig, key))
        bad = sorted(STRUCTURAL_QAT_FIELDS & set(qat))
        if bad:
            raise ConfigError(
                bad[0],
                qat[bad[0]],
                "the run's value: it is fixed for the whole run (layers or optimizer)",
            )
        return qat


# Fields that decide which buffers and parameters a BitLinear has: fixed for a whole run.
STRUCTURAL_QAT_FIELDS = {
    "norm_placement",
    "activation_observer",
    "activation_per_channel",
    "learnable_scales",
    # These shape the optimizer (its groups, a post-step clamp), built once for the run.
    "latent_clip",
    "weight_decay_on",
}


class MultiStage(Callback):
    """Moves a run through `stages`: at each stage's first step every `BitLinear` gets the
    stage's QAT settings (`base` with the stage's overrides; `base` defaults to the layers'
    config at setup), and the learning rate of each step is multiplied by the stage's
    `lr_factor`. The current stage is logged (`stage`) and saved in checkpoints; it follows
    from the step, so a resumed run continues in the same stage."""

    order = -10  # before the LR schedule (which it wraps) and QATControl (which reads configs)

    def __init__(self, stages: list[TrainingStage], base: QATConfig | None = None):
        if not stages:
            raise ConfigError("stages", stages, "at least one stage")
        self.stages, self.base = list(stages), base
        self.configs: list[QATConfig] = []
        self.current: int | None = None
        self.layers: list[tuple[str, BitLinear]] = []
        self._lr_before: list[float] | None = None

    def setup(self, trainer):
        self.layers = _bitlinears(trainer.model)
        base = self.base or (self.layers[0][1].config if self.layers else QATConfig())
        self.configs = []
        for i, st in enumerate(self.stages):
            try:
                self.configs.append(base.replace(**st.qat))
            except (ConfigError, TypeError) as e:
                raise BitNetError(f"stages[{i}].qat: {e}") from None
        self.ends = list(itertools.accumulate(st.steps for st in self.stages))

    def stage_at(self, step: int) -> int:
        return next((i for i, end in enumerate(self.ends) if step < end), len(self.stages) - 1)

    def _enter(self, trainer) -> None:
        i = self.stage_at(trainer.state.step)
        if i != self.current:
            for _, m in self.layers:
                m.config = self.configs[i]
            if self.current is not None:
                log.info(
                    "step %d: stage %d (%s) begins",
                    trainer.state.step,
                    i,
                    self.stages[i].name or f"#{i}",
                )
            self.current = i

    def on_train_begin(self, trainer):
        self._enter(trainer)

    def on_step_begin(self, trainer):
        self._enter(trainer)
        factor = self.stages[self.current].lr_factor
        groups = trainer.optimizer.param_groups
        self._lr_before = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] *= factor

    def on_step_end(self, trainer):
        if self._lr_before is not None:  # undo, so the schedule's next value is unscaled
            for g, lr in zip(trainer.optimizer.param_groups, self._lr_before, strict=True):
                g["lr"] = lr
            self._lr_before = None

    def on_log(self, trainer, logs):
        logs["stage"] = self.current
        logs["lr_factor"] = self.stages[self.current].lr_factor

    def state_dict(self):
        return {
            "stage": self.current,
            "name": self.stages[self.current].name if self.current is not None else None,
        }

    def load_state_dict(self, state):
        pass  # the stage follows from the restored step
