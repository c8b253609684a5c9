"""Pipeline parallelism (`distributed.strategy=pp`): a `BitNetLM` split into consecutive
stages, one per rank, trained with `torch.distributed.pipelining`'s GPipe or 1F1B schedule.

Rank r keeps the decoder layers of stage r (the layers split as evenly as they go, the
earlier stages taking the extra ones); the first stage also the token embedding, the last
the final norm and the output head. The model keeps its class and parameter names, the
layers it lost simply absent (`model.layers` becomes a `ModuleDict` keyed by the original
indices), so checkpoints, callbacks and the QAT clock see the usual names.

A schedule runs forward and backward itself, micro-batch by micro-batch, with a
`loss_fn(output, target)`, so the Trainer's step is pluggable: a model carrying a `pipeline`
(`Pipeline`) has each accumulation micro-batch trained by `Pipeline.forward_backward`, with
the loss summed over the targets and divided by the step's target count (the same weighting
as without a pipeline: the result equals one process's step). Gradient clipping sums the
squared norms over the stages. Evaluation runs the stages in turn with point-to-point sends
(any batch size; the schedules want equal micro-batches). Every stage reads the same data;
the loss is broadcast from the last stage, so every rank logs the same numbers.

Refused with the reason: losses that need the whole model (distillation, chunked CE,
contrastive), penalties and fp16 loss scaling (outside the schedule's backward), metrics
that need the logits, tied embeddings (the first and last stages would share a weight),
adapters, and fewer layers than stages.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BitNetError

SCHEDULES = ("gpipe", "1f1b")


def stage_layers(n_layers: int, n_stages: int, stage: int) -> range:
    """The decoder layers of `stage` among `n_stages` (consecutive, as even as they go)."""
    base, extra = divmod(n_layers, n_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


class StageForward(nn.Module):
    """What the pipeline stage runs: token ids (first stage) or hidden states in, hidden
    states or logits (last stage) out, through this rank's part of the model."""

    def __init__(self, lm: nn.Module, first: bool, last: bool):
        super().__init__()
        self.lm, self.first, self.last = lm, first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        core = self.lm.model
        h = core.embed_tokens(x) if self.first else x
        cos, sin = core.rope(torch.arange(h.shape[1], device=h.device), h.dtype)
        for layer in core.layers.values():
            h = layer(h, cos, sin)[0]
        return self.lm.lm_head(core.norm(h)) if self.last else h


class Pipeline:
    """This rank's stage of a pipelined model and its schedule (attached to the model as
    `model.pipeline`). `forward_backward` trains one batch, `eval_loss` evaluates one; both
    are collectives over the pipeline's ranks."""

    def __init__(self, lm: nn.Module, device: torch.device, schedule: str, microbatches: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        dist = torch.distributed
        self.stage_index, self.n_stages = dist.get_rank(), dist.get_world_size()
        self.first, self.last = self.stage_index == 0, self.stage_index == self.n_stages - 1
        self.microbatches = microbatches
        self.module = StageForward(lm, self.first, self.last)
        self.dtype = next(lm.parameters()).dtype  # hidden states travel in the weights' dtype
        self.hidden = lm.config.hidden_size
        stage = PipelineStage(self.module, self.stage_index, self.n_stages, device)
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        # scale_grads=False: the loss is already divided by the step's target count
        self.schedule = cls(stage, microbatches, loss_fn=self._loss, scale_grads=False)
        self._summed, self._denominator = None, 1.0

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._summed(logits, labels) / self._denominator

    def _share(self, value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The last stage's `value`, on every rank (one all-reduce; the others add 0)."""
        wide = torch.promote_types(self.dtype, torch.float32)
        out = torch.zeros((), dtype=wide, device=like.device)
        if value is not None:
            out = out + value.detach().to(wide)
        torch.distributed.all_reduce(out)
        return out

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        extra = sorted(set(batch) - {"input_ids", "labels"})
        if extra:
            raise BitNetError(
                f"distributed.strategy=pp feeds input_ids and labels through the stages; "
                f"this batch also has {', '.join(extra)}"
            )
        return batch["input_ids"], batch["labels"]

    def forward_backward(self, batch: dict, summed, denominator: float) -> torch.Tensor:
        """Train on `batch` (forward and backward, in the schedule's micro-batches): the
        loss is `summed(logits, labels)` / `denominator` per micro-batch; returns the
        batch's loss, the same on every rank."""
        ids, labels = self._inputs(batch)
        if ids.shape[0] % self.microbatches:
            raise BitNetError(
                f"distributed.pp_microbatches={self.microbatches} does not divide this batch "
                f"of {ids.shape[0]} sequences (training.batch_size)"
            )
        self._summed, self._denominator = summed, denominator
        losses: list[torch.Tensor] = []
        target = labels if self.last else None
        if self.first:
            self.schedule.step(ids, target=target, losses=losses)
        else:
            self.schedule.step(target=target, losses=losses)
        return self._share(torch.stack(losses).sum() if self.last else None, ids)

    @torch.no_grad()
    def eval_loss(self, batch: dict, summed) -> torch.Tensor:
        """The mean loss over `batch`'s targets (forward only, the stages in turn; the same
        on every rank)."""
        dist = torch.distributed
        ids, labels = self._inputs(batch)
        if self.first:
            h = self.module(ids)
        else:
            h = torch.empty(*ids.shape, self.hidden, dtype=self.dtype, device=ids.device)
            dist.recv(h, src=self.stage_index - 1)
            h = self.module(h)
        if not self.last:
            dist.send(h.to(self.dtype).contiguous(), dst=self.stage_index + 1)
            return self._share(None, ids)
        n = (labels[:, 1:] != -100).sum().clamp_min(1)
        return self._share(summed(h, labels) / n, ids)


def apply_pipeline(
    lm: nn.Module, device: torch.device, schedule: str = "1f1b", microbatches: int | None = None
) -> nn.Module:
    """Keep this rank's stage of `lm` (a `BitNetLM`, moved to `device`) and attach its
    `Pipeline`; one stage per rank of the default process group. `microbatches`: the
    schedule's micro-batches per batch (default: the number of stages)."""
    world = torch.distributed.get_world_size()
    core = getattr(lm, "model", None)
    layers = getattr(core, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(core, "rope"):
        raise BitNetError(
            "distributed.strategy=pp splits a BitNetLM (embeddings, decoder layers, norm, "
            f"head); this model is a {type(lm).__name__}"
        )
    if len(layers) < world:
        raise BitNetError(
            f"distributed.strategy=pp needs a decoder layer per stage: {len(layers)} layers, "
            f"{world} ranks"
        )
    if lm.lm_head.weight is core.embed_tokens.weight:
        raise BitNetError(
            "distributed.strategy=pp with tied embeddings (model.tie_word_embeddings): the "
            "first and last stages would share the weight; untie them"
        )
    if schedule not in SCHEDULES:
        raise BitNetError(f"distributed.pp_schedule={schedule!r} is invalid: gpipe or 1f1b")
    rank = torch.distributed.get_rank()
    keep = stage_layers(len(layers), world, rank)
    core.layers = nn.ModuleDict({str(i): layers[i] for i in keep})
    if rank != 0:
        core.embed_tokens = None
    if rank != world - 1:
        core.norm, lm.lm_head = None, None
    lm.to(device)
    lm.pipeline = Pipeline(lm, device, schedule, microbatches or world)
    lm.data_parallel_place = (0, 1)  # every stage reads the same batches
    return lm


def pipeline_of(model: nn.Module) -> Pipeline | None:
    """The `Pipeline` of a pipelined model, else None."""
    return getattr(model, "pipeline", None)
