"""`LossConfig`: the training objective, the `loss:` section of a run config (and the
`teacher:` section that distillation reads)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..errors import ConfigError
from ..settings import Section


class DistillConfig(Section):
    """Distillation from a frozen teacher (`teacher.pretrained`), added to the student's
    cross-entropy: logits KL at `temperature` (scaled by T^2), hidden-state MSE, and
    BitDistill's attention relations (arXiv 2510.13998: MiniLM-v2 Q-Q / K-K / V-V relation
    KL on one layer). Defaults are BitDistill's: logit weight 10, temperature 5, relation
    weight 1e5 on one late layer (-1: the last)."""

    _path = "loss.distill"

    ce_weight: float = Field(1.0, ge=0, description="weight of the student's own cross-entropy")
    logit_weight: float = Field(10.0, ge=0, description="weight of the logits KL (BitDistill: 10)")
    temperature: float = Field(5.0, gt=0, description="softmax temperature T of the logits KL")
    hidden_weight: float = Field(
        0.0, ge=0, description="weight of the last hidden states' MSE (same width needed)"
    )
    relation_weight: float = Field(
        1e5, ge=0, description="weight of the attention-relation KL (BitDistill: 1e5)"
    )
    relation_layer: int = Field(
        -1, description="the layer whose Q / K / V relations are distilled (-1: the last)"
    )
    relation_heads: int | None = Field(
        None,
        gt=0,
        description="relation heads each of Q / K / V is split into (None: the teacher's "
        "attention heads in it)",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.ce_weight + self.logit_weight + self.hidden_weight + self.relation_weight == 0:
            raise ConfigError("ce_weight", self.ce_weight, "> 0 when every other weight is 0")
        return self


class LossConfig(Section):
    """The training objective: next-token cross-entropy with optional label smoothing and
    z-loss, optionally chunked over tokens so the float32 logits never exist at once, plus
    distillation terms when `teacher.pretrained` is set. Evaluation always reports the plain
    cross-entropy, so validation figures stay comparable across objectives."""

    _path = "loss"

    objective: Literal["lm", "contrastive"] = Field(
        "lm",
        description="lm: next-token cross-entropy; contrastive: InfoNCE over pooled hidden "
        "states of data.source=pairs",
    )
    temperature: float = Field(0.05, gt=0, description="contrastive: the InfoNCE temperature")
    pooling: Literal["mean", "last"] = Field(
        "mean", description="contrastive: mean of a text's hidden states, or its last token's"
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="cross-entropy label smoothing (training only)"
    )
    z_loss: float = Field(
        0.0, ge=0, description="weight of mean(logsumexp(logits)^2) (training only)"
    )
    chunk_size: int | None = Field(
        None,
        gt=0,
        description="tokens per chunk of the chunked cross-entropy: the float32 logits never "
        "exist at once (None: plain)",
    )
    l1: float = Field(0.0, ge=0, description="L1 penalty weight on penalty_params")
    l2: float = Field(
        0.0, ge=0, description="L2 penalty weight on penalty_params (coupled; not weight decay)"
    )
    penalty_params: list[str] = Field(
        default_factory=lambda: ["*"],
        description="globs over trainable parameter names that l1 / l2 penalize",
    )
    distill: DistillConfig = Field(
        default_factory=DistillConfig, description="distillation terms (with teacher.pretrained)"
    )


class TeacherConfig(Section):
    """The teacher of distillation: any model `model.pretrained` takes (a `transformers`
    directory, a GGUF file, a run or checkpoint of ours), frozen, in eval mode, with the
    student's vocabulary."""

    _path = "teacher"

    pretrained: str = Field(
        "", description="the teacher model's path ('' : no distillation, plain training)"
    )
