"""What the Trainer asks of a data-parallel model, whichever wrapper made it: the module
inside, whether it averages gradients over ranks, how to skip that average on the micro-steps
of gradient accumulation, and whether its forward itself communicates."""

from __future__ import annotations

import contextlib

from torch import nn


def _fsdp_module():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None
    return FSDPModule


def is_fsdp(model: nn.Module) -> bool:
    """Whether `model` was sharded with FSDP2's `fully_shard`."""
    cls = _fsdp_module()
    return cls is not None and isinstance(model, cls)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a `DistributedDataParallel` wrapper (else `model`: FSDP2 shards a
    module in place, it does not wrap it)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def averages_gradients(model: nn.Module) -> bool:
    """Whether `model`'s backward averages gradients over the data-parallel ranks (DDP's
    all-reduce, FSDP2's reduce-scatter)."""
    return isinstance(model, nn.parallel.DistributedDataParallel) or is_fsdp(model)


def gathers_in_forward(model: nn.Module) -> bool:
    """Whether `model`'s forward is a collective (FSDP2 all-gathers each block's parameters,
    tensor parallelism all-reduces partial sums): then every rank must run the same number
    of forwards, in evaluation and generation too."""
    if getattr(model, "pipeline", None) is not None:  # the stages run in turn
        return True
    return is_fsdp(model) or any(hasattr(p, "placements") for p in model.parameters())


def data_parallel_place(model: nn.Module, rank: int, world: int) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas: the process group's
    `rank` and `world`, unless a layout recorded others (`tensor parallel` ranks share one
    data stream: (0, 1))."""
    return getattr(unwrap(model), "data_parallel_place", None) or (rank, world)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module):
    """Within, backward passes accumulate local gradients without averaging them over the
    ranks (the micro-steps of gradient accumulation); the next backward outside averages
    everything accumulated."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def full_state_dict(model: nn.Module) -> dict | None:
    """`model`'s whole state dict on rank 0 (on the CPU; the other ranks get an empty dict),
    gathered from FSDP shards: a collective every rank calls. None for a model that is not
    sharded (its own `state_dict()` is whole)."""
    if not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


@contextlib.contextmanager
def gathered_root(model: nn.Module):
    """Within, an FSDP model's root parameters (embeddings, final norm, head) stay gathered,
    so code that calls its submodules directly (generation loops) finds them whole; every
    rank must enter it and run the same forwards."""
    if not is_fsdp(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
