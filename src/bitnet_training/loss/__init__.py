"""Losses: language modelling (cross-entropy with label smoothing and z-loss, chunked over
the vocabulary) and distillation from a frozen teacher (logits KL, hidden-state MSE,
BitDistill's attention relations), each usable as the Trainer's `loss_fn(model, batch)`."""

from .config import DistillConfig, LossConfig, TeacherConfig
from .contrastive import ContrastiveLoss, info_nce, pool
from .distill import DistillLoss, LMLoss, relation_kl
from .lm import causal_lm_loss, chunked_causal_lm_loss
from .regularization import Penalty

__all__ = [
    "ContrastiveLoss",
    "DistillConfig",
    "DistillLoss",
    "LMLoss",
    "LossConfig",
    "Penalty",
    "TeacherConfig",
    "causal_lm_loss",
    "chunked_causal_lm_loss",
    "info_nce",
    "pool",
    "relation_kl",
]
