"""Language-modelling losses: next-token cross-entropy with ignore index, label smoothing and
z-loss, plain (from logits) or chunked (from the last hidden states and the output head,
never holding all float32 logits at once).

Conventions, as `BitNetLM` and `transformers` causal LMs use them: position i predicts
labels[i + 1]; labels of -100 (`ignore_index`) are not predicted; the loss is the mean over
predicted tokens, computed in float32 whatever the logits' dtype. z-loss (PaLM, ST-MoE) adds
`z_loss * mean(logsumexp(logits) ** 2)` over the same tokens, which keeps the softmax
normalizer near 1 (log Z near 0) and the logits from drifting in low precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BitNetError


def _shift(labels: torch.Tensor) -> torch.Tensor:
    return labels[:, 1:].reshape(-1)


def _token_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    """Summed loss of (n, V) float32 `logits` against (n,) `targets` (ignored ones count 0)."""
    loss = F.cross_entropy(
        logits,
        targets,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    if z_loss:
        keep = targets != ignore_index
        loss = loss + z_loss * (torch.logsumexp(logits, dim=-1)[keep] ** 2).sum()
    return loss


def _check(label_smoothing: float, z_loss: float) -> None:
    if not 0 <= label_smoothing < 1:
        raise BitNetError(f"label_smoothing={label_smoothing} is invalid: expected [0, 1)")
    if z_loss < 0:
        raise BitNetError(f"z_loss={z_loss} is invalid: expected >= 0")


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean next-token cross-entropy of (batch, seq, vocab) `logits` against (batch, seq)
    `labels` (position i predicts labels[i + 1]), with label smoothing and z-loss. With both
    at 0 it equals `BitNetLM`'s own loss and `transformers`' `ForCausalLMLoss`.
    `reduction="sum"`: summed over the targets instead (a pipeline's micro-batches)."""
    _check(label_smoothing, z_loss)
    if logits.shape[:2] != labels.shape:
        raise BitNetError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on "
            "(batch, seq)"
        )
    targets = _shift(labels)
    flat = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays
    flat = flat.reshape(-1, logits.shape[-1])
    total = _token_losses(flat, targets, ignore_index, label_smoothing, z_loss)
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp_min(1)


class _ChunkedLoss(torch.autograd.Function):
    """Sum of token losses of hidden @ weight.T, chunk by chunk of tokens: the forward keeps
    no logits; the backward recomputes each chunk's logits and accumulates the gradients of
    `hidden` and `weight` (and `bias`). Peak extra memory: one chunk's float32 logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, ignore_index, smoothing, z_loss):
        total = hidden.new_zeros((), dtype=torch.float32)
        with torch.no_grad():
            for s in range(0, hidden.shape[0], chunk):
                logits = F.linear(hidden[s : s + chunk], weight, bias).float()
                total += _token_losses(
                    logits, targets[s : s + chunk], ignore_index, smoothing, z_loss
                )
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.args = (chunk, ignore_index, smoothing, z_loss)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets = ctx.saved_tensors
        chunk, ignore_index, smoothing, z_loss = ctx.args
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        grad_b = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].detach()
            with torch.enable_grad():
                logits = F.linear(h, weight.detach(), None if bias is None else bias.detach())
                logits = logits.detach().requires_grad_()
                loss = _token_losses(
                    logits.float(), targets[s : s + chunk], ignore_index, smoothing, z_loss
                )
                (g,) = torch.autograd.grad(loss, logits)
            g = (g * grad_total).to(logits.dtype)
            grad_h[s : s + chunk] = (g @ weight.to(g.dtype)).to(hidden.dtype)
            grad_w += (g.t() @ h.to(g.dtype)).float()
            if grad_b is not None:
                grad_b += g.float().sum(0)
        return (
            grad_h,
            grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """`causal_lm_loss(hidden @ weight.T + bias, labels, ...)` with the same value and
    gradients, computed `chunk_size` tokens at a time: the (tokens, vocab) float32 logits
    never exist at once (at a 32k vocabulary and 8k tokens that is 1 GiB), only one chunk's.
    `hidden` is (batch, seq, d), the output head's input; `weight` is (vocab, d). Under
    autocast the chunk's matmul runs in autocast's dtype, as the head would."""
    _check(label_smoothing, z_loss)
    if chunk_size < 1:
        raise BitNetError(f"chunk_size={chunk_size} is invalid: expected >= 1")
    if hidden.shape[:2] != labels.shape or hidden.shape[-1] != weight.shape[-1]:
        raise BitNetError(
            f"hidden {tuple(hidden.shape)}, head weight {tuple(weight.shape)} and labels "
            f"{tuple(labels.shape)} do not fit (batch, seq, d), (vocab, d), (batch, seq)"
        )
    targets = _shift(labels)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    if torch.is_autocast_enabled(h.device.type):  # the matmul's dtype under autocast
        dt = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    with torch.autocast(h.device.type, enabled=False):
        total = _ChunkedLoss.apply(
            h, weight, bias, targets, chunk_size, ignore_index, label_smoothing, z_loss
        )
    return total / (targets != ignore_index).sum().clamp_min(1)
