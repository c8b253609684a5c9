"""Contrastive fine-tuning: InfoNCE over pooled hidden states, with in-batch negatives.

For a batch of (query, positive) text pairs, each text is embedded by pooling the model's
last hidden states (the output head's input; `mean` over its tokens, or its `last` token),
L2-normalized, and scored against every positive of the batch:

    loss = CE(q_i . p_j / temperature, target j = i)       (symmetric: averaged with p -> q)

so the other pairs' positives are the negatives. Under data parallelism the positives
(and queries) of all ranks are gathered with `torch.distributed.nn.functional.all_gather`,
which keeps gradients, so every rank sees the global batch's negatives.

Data: JSON lines of {"query": ..., "positive": ...} (`data.pairs.PairedTextDataset`, the
`pairs` data source). Texts are right-padded; a causal model's hidden states at real tokens
do not see the padding after them, and pooling uses each text's length, so padding changes
nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitNetError
from .distill import _head, _head_swapped, _logits


def info_nce(
    queries: torch.Tensor, positives: torch.Tensor, temperature: float = 0.05, symmetric=True
) -> torch.Tensor:
    """InfoNCE of (n, d) `queries` against (n, d) `positives` (row i is query i's positive,
    the other rows its negatives), on L2-normalized vectors, in float32. Under an initialized
    process group, rows of all ranks take part (gathered with gradients)."""
    if temperature <= 0:
        raise BitNetError(f"temperature={temperature} is invalid: expected > 0")
    if queries.shape != positives.shape or queries.ndim != 2:
        raise BitNetError(
            f"queries {tuple(queries.shape)} and positives {tuple(positives.shape)} must both "
            "be (n, d)"
        )
    q = F.normalize(queries.float(), dim=-1)
    p = F.normalize(positives.float(), dim=-1)
    offset = 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.nn.functional import all_gather

        offset = torch.distributed.get_rank() * q.shape[0]
        all_p = torch.cat(all_gather(p))
        all_q = torch.cat(all_gather(q))
    else:
        all_p, all_q = p, q
    targets = torch.arange(q.shape[0], device=q.device) + offset
    loss = F.cross_entropy(q @ all_p.t() / temperature, targets)
    if symmetric:
        loss = (loss + F.cross_entropy(p @ all_q.t() / temperature, targets)) / 2
    return loss


def pool(hidden: torch.Tensor, lengths: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(batch, seq, d) hidden states -> (batch, d): the mean over each row's first `lengths`
    tokens, or its last real token."""
    if how == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    if how != "mean":
        raise BitNetError(f"pooling={how!r} is invalid: expected mean or last")
    mask = torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]
    return (hidden * mask[..., None]).sum(1) / lengths[:, None].clamp_min(1)


def embed(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor, how: str = "mean"):
    """Pooled last hidden states of `model` for right-padded `ids` (the output head is
    skipped: no logits are computed)."""
    head = _head(model)
    if head is None:
        raise BitNetError("contrastive pooling needs the model's output head to find its input")
    with _head_swapped(model, head):
        hidden = _logits(model(input_ids=ids))
    return pool(hidden, lengths, how)


class ContrastiveLoss:
    """`loss_fn(model, batch)` for paired text: InfoNCE of the pooled embeddings of
    `batch["query_ids"]` (lengths `query_len`) against `batch["positive_ids"]`
    (`positive_len`), with in-batch (and, under data parallelism, cross-rank) negatives."""

    def __init__(self, temperature: float = 0.05, pooling: str = "mean", symmetric=True):
        if temperature <= 0:
            raise BitNetError(f"loss.temperature={temperature} is invalid: expected > 0")
        if pooling not in ("mean", "last"):
            raise BitNetError(f"loss.pooling={pooling!r} is invalid: expected mean or last")
        self.temperature, self.pooling, self.symmetric = temperature, pooling, symmetric

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        q = embed(model, batch["query_ids"], batch["query_len"], self.pooling)
        p = embed(model, batch["positive_ids"], batch["positive_len"], self.pooling)
        return info_nce(q, p, self.temperature, self.symmetric)
