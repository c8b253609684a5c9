"""Callbacks that drive and watch quantization-aware training.

`QATControl` tells every `BitLinear` the current step before each optimizer step, which is
what makes progressive quantization, bit-width stages and quantization noise run (the Trainer
itself knows nothing about quantization). `TernaryDiagnostics` measures, at every log step,
how the quantized weights look and move: the share of -1 / 0 / +1, the flip rate, the
relative quantization error.
"""

from __future__ import annotations

import torch

from ..nn.bitlinear import BitLinear
from ..quant.fake_quant import quantize
from ..quant.functional import dequantize
from .callbacks import Callback


def _bitlinears(model: torch.nn.Module) -> list[tuple[str, BitLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinear)]


class QATControl(Callback):
    """Before every optimizer step (and after a resume), calls `BitLinear.set_progress(step)`
    on each quantized layer, so lambda, the bit stage and noise follow the step. Adds the
    current `qat_weight_lambda`, `qat_activation_lambda` and `qat_weight_bits` to the logs.
    Its checkpoint state records them; since they are pure functions of the step, a resumed
    run continues exactly."""

    def __init__(self):
        self.layers: list[tuple[str, BitLinear]] = []
        self.trainer = None

    def setup(self, trainer):
        self.layers, self.trainer = _bitlinears(trainer.model), trainer

    def _apply(self, trainer) -> None:
        for _, m in self.layers:
            m.set_progress(trainer.state.step, trainer.steps_per_epoch)

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

    def state_dict(self):
        return {"step": self.trainer.state.step if self.trainer else 0, **self.current()}

    def load_state_dict(self, state):
        pass  # everything follows from the restored step


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
