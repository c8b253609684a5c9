"""Merging LoRA adapters into their base, and what it costs on a ternary base.

Into a full-precision base a merge is exact up to float rounding: W' = W + (alpha / r) B A,
and unmerging subtracts the same product (peft's `merge_and_unload`). Into a ternary base it
is not: the layer computes gamma * Q(W) + B A before the merge, and after it Q(W + B A) with a
new absmean scale, so most codes and every scale change. Two ways to merge are measured on
held-out data, and the better is kept:

* `requantize`: the latent weights W + B A, quantized as training quantizes them;
* `refit`: the codes of W + B A, with the one scale that best fits (least squares) the
  effective weight gamma * Q(W) + B A the adapters were trained against; the latent weights
  are set so that absmean quantization gives back exactly those codes and that scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import BitNetError
from ..nn.bitlinear import BitLinear
from ..quant.functional import dequantize


@dataclass
class MergeReport:
    """What `merge_lora` did: the method kept, the layers merged, and per method the loss
    and the largest logit difference against the unmerged model (adapters separate) on the
    held-out batches."""

    method: str
    layers: int
    measured: dict[str, dict[str, float]] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [
            f"{m}: loss {v['loss']:.4f} (unmerged {v['unmerged_loss']:.4f}), "
            f"max logit diff {v['max_logit_diff']:.2e}"
            for m, v in self.measured.items()
        ]
        return f"merged {self.layers} layers by {self.method}; " + "; ".join(parts)


def _effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """For each LoRA layer over a `BitLinear`: gamma * Q(W) + delta, the weight the adapted
    layer computes with (float64)."""
    out = {}
    for name, m in model.named_modules():
        base = getattr(m, "base_layer", None)
        if isinstance(base, BitLinear) and hasattr(m, "get_delta_weight"):
            spec = base.weight_spec()
            q = dequantize(base.quantized_weight(), torch.float64).reshape(base.weight.shape)
            if spec is None:
                q = base.weight.detach().double()
            delta = sum(m.get_delta_weight(a).double() for a in m.active_adapters)
            out[name.replace("base_model.model.", "")] = q + delta
    return out


@torch.no_grad()
def _refit(model: nn.Module, effective: dict[str, torch.Tensor]) -> None:
    """Give each merged ternary layer the codes of its merged latent weight and the least
    squares scale against `effective` (per tensor): s = <E, c> / <c, c>."""
    for name, m in model.named_modules():
        if name not in effective or not isinstance(m, BitLinear) or m.weight_spec() is None:
            continue
        codes = m.quantized_weight().codes.double().reshape(m.weight.shape)
        e = effective[name]
        nz = (codes != 0).double().mean().clamp_min(1e-12)
        scale = (e * codes).sum() / (codes * codes).sum().clamp_min(1e-12)
        # absmean of codes * scale / mean|codes| is scale: quantizing gives back (codes, scale)
        m.weight.copy_((codes * scale / nz).to(m.weight.dtype))
        m._cache = None


def _measure(model: nn.Module, batches: list[dict], reference: list[torch.Tensor]) -> dict:
    model.eval()
    nats, n, diff = 0.0, 0, 0.0
    with torch.no_grad():
        for batch, ref in zip(batches, reference, strict=True):
            out = model(**batch)
            t = int((batch["labels"][:, 1:] != -100).sum())
            nats += float(out.loss) * t
            n += t
            diff = max(diff, float((out.logits.double() - ref).abs().max()))
    return {"loss": nats / max(n, 1), "max_logit_diff": diff}


def merge_lora(
    model: nn.Module, build_again, batches: list[dict], method: str = "auto"
) -> tuple[nn.Module, MergeReport]:
    """Merge the LoRA adapters of `model` (a `peft` model) into its base and return the merged
    plain model and a report. `build_again()` returns a fresh copy of the same adapted model
    (each merge method starts from one); `batches` are held-out batches (dicts with
    `input_ids` and `labels`) on which the merge is measured against the unmerged model.
    `method`: `requantize`, `refit`, or `auto` (the one with the lower held-out loss; on a
    full-precision base the merge is exact and `requantize` is used)."""
    if not hasattr(model, "merge_and_unload"):
        raise BitNetError(
            "only LoRA adapters merge into the weights: prefix / P-tuning adapters live in the "
            "attention cache and BitFit adds biases the base architecture has not got"
        )
    if method not in ("auto", "requantize", "refit"):
        raise BitNetError(f"merge method {method!r} is invalid: expected auto, requantize or refit")
    model.eval()
    with torch.no_grad():
        reference = [model(**b).logits.double() for b in batches]
    unmerged = _measure(model, batches, reference)["loss"]
    ternary = any(isinstance(m, BitLinear) for m in model.modules())
    if method == "refit" and not ternary:
        raise BitNetError(
            "merge method refit re-fits a ternary layer's scale; this base is full precision, "
            "where the merge is exact (use auto or requantize)"
        )
    methods = ["requantize", "refit"] if method == "auto" and ternary else [method]
    if not ternary and method == "auto":
        methods = ["requantize"]
    results, merged = {}, {}
    for i, how in enumerate(methods):
        candidate = model if i == 0 else build_again()
        effective = _effective_weights(candidate)
        layers = len(effective) or sum(1 for m in candidate.modules() if hasattr(m, "lora_A"))
        plain = candidate.merge_and_unload()
        for m in plain.modules():
            if isinstance(m, BitLinear):
                m._cache = None  # the latent weights changed under the cache
        if how == "refit":
            _refit(plain, effective)
        results[how] = {**_measure(plain, batches, reference), "unmerged_loss": unmerged}
        merged[how] = (plain, layers)
    best = min(results, key=lambda k: results[k]["loss"])
    plain, layers = merged[best]
    return plain, MergeReport(best, layers, results)
