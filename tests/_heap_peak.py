"""Run by tests/test_planner.py in a fresh process: the measured peak heap growth (malloc's
bytes in use, as benchmarks/qat_overhead.py measures) of the second training step of the
run config the arguments give (overrides), on the CPU, printed as JSON."""

import contextlib
import ctypes
import json
import sys

import torch
import transformers  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

import peft  # noqa: F401 - imported before the baseline: imports grow the heap too
from bitnet_training import recipe
from bitnet_training.config import load_config
from bitnet_training.optim import build_optimizer
from bitnet_training.quant import gemm


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def heap() -> int:
    m = _libc.mallinfo2()
    return m.uordblks + m.hblkhd


class Peak(TorchDispatchMode):
    peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        Peak.peak = max(Peak.peak, heap())
        return out


def main(overrides: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = load_config(None, [*overrides, "training.device=cpu"])
    base = heap()
    model = recipe.build_model(cfg).model
    model.train()
    optimizer = build_optimizer(model, cfg.training.optimizer, cfg.training.learning_rate)
    loss_fn = recipe.build_loss(cfg, model, None)
    ids = torch.zeros((cfg.training.batch_size, cfg.data.seq_len), dtype=torch.long)
    bf16 = cfg.training.mixed_precision in ("bf16", "auto")

    def step():
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with amp:
            loss = loss_fn(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # allocates the optimizer states
    with Peak():
        step()
    # The GEMMs this run measured faster (bf16), for the plan to follow: another process
    # could measure a near tie the other way.
    print(json.dumps({"peak": Peak.peak - base, "paths": gemm.path_state()}))


if __name__ == "__main__":
    main(sys.argv[1:])
