"""Distillation from a frozen teacher, and the Trainer's language-modelling `loss_fn`.

Terms (each weighted by `DistillConfig`):

* logits KL: KL(softmax(t / T) || softmax(s / T)) * T^2 per predicted token (Hinton et al.;
  the T^2 keeps its gradient's scale independent of T);
* hidden MSE: mean squared difference of the last hidden states (the output head's inputs);
* attention relations (MiniLM-v2, as BitDistill, arXiv 2510.13998, uses them): on one layer,
  each of Q, K and V (the projections' outputs, (batch, seq, width)) is split into A relation
  heads of width d; R = softmax(X X^T / sqrt(d)) over all positions; the term is
  KL(R_teacher || R_student) averaged over rows, summed over Q, K and V. Relations are
  seq x seq, so teacher and student may differ in width (not in A). The relations use every
  position of the sequence, as MiniLM's do: a training signal only, nothing reaches
  inference.

The student's cross-entropy is `causal_lm_loss` (label smoothing, z-loss). In evaluation
(`model.training` false) a loss is the plain cross-entropy, so validation loss, perplexity
and bits per byte mean the same whatever the objective.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitNetError
from ..nn.convert import output_head
from .config import DistillConfig, LossConfig
from .lm import causal_lm_loss, chunked_causal_lm_loss


def _head(model: nn.Module) -> nn.Module | None:
    return output_head(getattr(model, "module", model))  # inside DistributedDataParallel


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if logits is None and isinstance(out, tuple | list) and out:
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise BitNetError("the model returned no logits (an output with .logits is needed)")
    return logits


class _Capture(nn.Module):
    """Stands in for the output head for one forward: returns its input (the last hidden
    states), so the model's "logits" are the hidden states and no logits are computed."""

    def forward(self, x):
        return x


@contextlib.contextmanager
def _head_swapped(model: nn.Module, head: nn.Module):
    names = [n for n, m in model.named_modules() if m is head]
    if not names:
        raise BitNetError("the model's output head is not one of its modules")
    for n in names:
        model.set_submodule(n, _Capture())
    try:
        yield
    finally:
        for n in names:
            model.set_submodule(n, head)


class LMLoss:
    """`loss_fn(model, batch)`: next-token cross-entropy of `model(**inputs)` against
    `batch["labels"]` with `config`'s label smoothing and z-loss (training only); with
    `config.chunk_size` the chunked form, from the last hidden states and the output head
    (which must be a plain `nn.Linear`)."""

    def __init__(self, config: LossConfig | None = None):
        self.config = config or LossConfig()

    def summed_from_logits(
        self, logits: torch.Tensor, labels: torch.Tensor, training: bool
    ) -> torch.Tensor:
        """The loss summed over the targets, from the logits alone (what a pipeline's last
        stage has); None-valued where the loss needs more of the model (see `pipeline_loss`)."""
        c = self.config
        kw = dict(label_smoothing=c.label_smoothing, z_loss=c.z_loss) if training else {}
        return causal_lm_loss(logits, labels, reduction="sum", **kw)

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        c = self.config
        kw = {}
        if model.training:
            kw = dict(label_smoothing=c.label_smoothing, z_loss=c.z_loss)
        if c.chunk_size is None:
            return causal_lm_loss(_logits(model(**inputs)), labels, **kw)
        head = _head(model)
        if head is None:
            raise BitNetError(
                "loss.chunk_size needs the model's output head, which this model does not "
                "expose (a prefix / P-tuning wrapper?): set loss.chunk_size=null"
            )
        if type(head) is not nn.Linear:
            kind = f"{type(head).__module__}.{type(head).__name__}"
            raise BitNetError(
                f"loss.chunk_size needs a plain nn.Linear output head; this model's is {kind} "
                "(an adapted or quantized head): set loss.chunk_size=null"
            )
        with _head_swapped(model, head):
            hidden = _logits(model(**inputs))
        return chunked_causal_lm_loss(
            hidden, head.weight, labels, bias=head.bias, chunk_size=c.chunk_size, **kw
        )


def relation_kl(teacher: torch.Tensor, student: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLM-v2's relation loss for one of Q / K / V: (batch, seq, width) tensors of the
    teacher and the student, each split into `heads` relation heads; KL(R_t || R_s) of the
    scaled dot-product relations, mean over (batch, head, query) rows, in float32."""
    if teacher.shape[:2] != student.shape[:2]:
        raise BitNetError(
            f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} relations need "
            "the same (batch, seq)"
        )

    def log_relations(x):
        b, t, w = x.shape
        if w % heads:
            raise BitNetError(
                f"a width of {w} does not split into {heads} relation heads: set "
                "loss.distill.relation_heads to a divisor of the Q / K / V widths"
            )
        x = x.float().view(b, t, heads, w // heads).transpose(1, 2)
        return torch.log_softmax(x @ x.transpose(-1, -2) / math.sqrt(w // heads), dim=-1)

    # In float32 even under autocast: the term is weighted by up to 1e5, and bf16 relations
    # would leave it with bf16's rounding (tested).
    with torch.autocast(teacher.device.type, enabled=False):
        lt, ls = log_relations(teacher), log_relations(student)
        return (lt.exp() * (lt - ls)).sum(-1).mean()


def _attention_projections(model: nn.Module, layer: int) -> list[nn.Module]:
    """The q_proj, k_proj, v_proj modules of attention layer `layer` (python indexing over
    the model's attention layers), outermost module of each name (an adapter's wrapper)."""
    found: dict[str, dict[str, nn.Module]] = {}
    for name, m in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if leaf in ("q_proj", "k_proj", "v_proj"):
            found.setdefault(parent, {}).setdefault(leaf, m)
    layers = [v for v in found.values() if len(v) == 3]
    if not layers:
        raise BitNetError(
            "attention-relation distillation needs q_proj / k_proj / v_proj modules; this "
            "model has none (set loss.distill.relation_weight=0)"
        )
    if not -len(layers) <= layer < len(layers):
        raise BitNetError(
            f"loss.distill.relation_layer={layer} is out of range: the model has "
            f"{len(layers)} attention layers"
        )
    chosen = layers[layer]
    return [chosen["q_proj"], chosen["k_proj"], chosen["v_proj"]]


@contextlib.contextmanager
def _recording(modules: list[nn.Module], store: list):
    handles = [m.register_forward_hook(lambda _m, _a, out: store.append(out)) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _head_dim(model: nn.Module) -> int | None:
    """The attention head width of `model`'s config (`head_dim`, else hidden / heads)."""
    for m in (model, getattr(model, "base_model", None), getattr(model, "model", None)):
        cfg = getattr(m, "config", None)
        heads = getattr(cfg, "num_attention_heads", None)
        if isinstance(heads, int):
            dim = getattr(cfg, "head_dim", None)
            return dim if isinstance(dim, int) and dim > 0 else cfg.hidden_size // heads
    return None


def _vocab(model: nn.Module) -> int | None:
    head = _head(model)
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None


class DistillLoss(LMLoss):
    """`loss_fn(model, batch)` of distillation: the student's cross-entropy (`LMLoss`,
    weighted by `ce_weight`) plus the `DistillConfig` terms against `teacher`, which is
    frozen here (no gradient, eval mode) and run on the same batch in the same step (moved to
    the batch's device at the first call). The teacher must have the student's vocabulary.
    In evaluation only the plain cross-entropy is computed (the teacher does not run)."""

    # The teacher's terms need the student's inner states beside the logits: no pipeline.
    summed_from_logits = None

    def __init__(self, teacher: nn.Module, config: LossConfig | None = None):
        super().__init__(config)
        d: DistillConfig = self.config.distill
        if self.config.chunk_size is not None and (d.logit_weight or d.hidden_weight):
            raise BitNetError(
                "loss.chunk_size cannot apply with logits or hidden-state distillation: the "
                "KL needs every logit (set loss.chunk_size=null)"
            )
        self.teacher = teacher.eval().requires_grad_(False)
        # Relation heads: as many as the teacher has attention heads in each of Q, K and V
        # (its width over its head width: fewer for K / V under grouped-query attention),
        # unless set; the student's projection is split into as many.
        self.heads = d.relation_heads
        self.head_dim = _head_dim(teacher)
        if d.relation_weight and self.heads is None and self.head_dim is None:
            raise BitNetError(
                "the teacher's attention head width is unknown: set loss.distill.relation_heads"
            )
        self._teacher_proj = (
            _attention_projections(teacher, d.relation_layer) if d.relation_weight else []
        )

    def check_student(self, model: nn.Module) -> None:
        """Refuse a student of another vocabulary than the teacher's (one line)."""
        ours, theirs = _vocab(model), _vocab(self.teacher)
        if ours is not None and theirs is not None and ours != theirs:
            raise BitNetError(
                f"the teacher's vocabulary has {theirs} tokens, the student's {ours}: "
                "distillation needs the same tokenizer"
            )

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        if not model.training:
            return super().__call__(model, batch)
        d, c = self.config.distill, self.config
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        device = labels.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        s_rel, t_rel, s_hidden, t_hidden = [], [], [], []
        s_proj = _attention_projections(model, d.relation_layer) if d.relation_weight else []
        s_head, t_head = _head(model), _head(self.teacher)
        pre = [(s_head, s_hidden), (t_head, t_hidden)] if d.hidden_weight else []
        hooks = [h.register_forward_pre_hook(lambda _m, a, st=st: st.append(a[0])) for h, st in pre]
        try:
            with _recording(s_proj, s_rel):
                s_logits = _logits(model(**inputs))
            with torch.no_grad(), _recording(self._teacher_proj, t_rel):
                t_logits = _logits(self.teacher(**inputs))
        finally:
            for h in hooks:
                h.remove()
        if t_logits.shape[-1] != s_logits.shape[-1]:
            raise BitNetError(
                f"the teacher's vocabulary has {t_logits.shape[-1]} tokens, the student's "
                f"{s_logits.shape[-1]}: distillation needs the same tokenizer"
            )
        keep = labels[:, 1:] != -100  # the predicted positions
        total = s_logits.new_zeros((), dtype=torch.float32)
        if d.ce_weight:
            ce = causal_lm_loss(
                s_logits, labels, label_smoothing=c.label_smoothing, z_loss=c.z_loss
            )
            total = total + d.ce_weight * ce
        if d.logit_weight:
            T = d.temperature
            s = torch.log_softmax(s_logits[:, :-1][keep].float() / T, dim=-1)
            t = torch.log_softmax(t_logits[:, :-1][keep].float() / T, dim=-1)
            kl = (t.exp() * (t - s)).sum(-1).mean() if keep.any() else total * 0
            total = total + d.logit_weight * kl * T * T
        if d.hidden_weight:
            hs, ht = s_hidden[-1], t_hidden[-1]
            if hs.shape[-1] != ht.shape[-1]:
                raise BitNetError(
                    f"hidden-state distillation needs the same width: teacher {ht.shape[-1]}, "
                    f"student {hs.shape[-1]} (set loss.distill.hidden_weight=0)"
                )
            mse = F.mse_loss(hs[:, :-1][keep].float(), ht[:, :-1][keep].float())
            total = total + d.hidden_weight * mse
        if d.relation_weight:
            rel = sum(
                relation_kl(t, s, self.heads or max(1, t.shape[-1] // self.head_dim))
                for t, s in zip(t_rel, s_rel, strict=True)
            )
            total = total + d.relation_weight * rel
        return total
