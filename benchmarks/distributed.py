"""Data parallelism on CPU: bytes communicated, step time and model-state memory per rank,
DDP with each gradient compression and FSDP2 (float32, bf16 and packed ternary all-gathers),
2 processes against 1.

Every variant trains the same `tiny` BitNetLM (ternary QAT, bf16 autocast) on the same
random token batches: one process with a batch of 2b, or two gloo processes with b each (the
same global batch), wrapped by `distributed.ddp.wrap_ddp` with gradient compression none /
fp16 / bf16 / powersgd. Bytes are what rank 0 hands to the all-reduce per step (counted by
wrapping `torch.distributed.all_reduce`; without a hook DDP all-reduces every gradient in
float32, counted as the gradients' bytes; FSDP's all-gathers and reduce-scatters are counted
by their inputs, a rank's shard and the full gradients). Memory is what a rank holds of the
model's state after a step: its parameters (or shards), gradients and AdamW moments, counted
from the tensors. Step time is the median of the timed steps; the two processes share this
machine's cores, so 2 processes on 2 cores are not expected to be faster than 1 with both:
this measures the cost of the communication, not scaling. Never asserts anything: it prints
a table.

    python benchmarks/distributed.py [--variants fsdp fsdp-packed ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bitnet_training import BitNetLM, ModelConfig
from bitnet_training.distributed.ddp import wrap_ddp
from bitnet_training.distributed.fsdp import apply_fsdp

VARIANTS = ("none", "fp16", "bf16", "powersgd", "fsdp", "fsdp-bf16", "fsdp-packed")
NAMES = {
    "fsdp": "FSDP2",
    "fsdp-bf16": "FSDP2, gathered in bf16",
    "fsdp-packed": "FSDP2, packed ternary gather",
}


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _run(rank: int, world: int, init: str, out: str, args) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    sent: list[int] = []
    gathered: list[int] = []  # what the all-gathers send (FSDP's weights), a part of `sent`
    real = dist.all_reduce

    def counting(tensor, *a, **kw):
        sent.append(tensor.numel() * tensor.element_size())
        return real(tensor, *a, **kw)

    def counting_collective(real_fn, also=None):
        def fn(*a, **kw):  # (output, input, ...), positional or by name
            inp = a[1] if len(a) > 1 else kw.get("input", kw.get("input_tensor"))
            sent.append(inp.numel() * inp.element_size())
            if also is not None:
                also.append(sent[-1])
            return real_fn(*a, **kw)

        return fn

    # FSDP2 calls all_gather_single / reduce_scatter_single (torch 2.13)
    gather, scatter = dist.all_gather_single, dist.reduce_scatter_single
    dist.all_reduce = counting
    dist.all_gather_single = counting_collective(gather, gathered)
    dist.reduce_scatter_single = counting_collective(scatter)
    torch.manual_seed(0)
    model = BitNetLM.bitnet(ModelConfig.preset("tiny"))
    if world > 1 and args.compression.startswith("fsdp"):
        model = apply_fsdp(
            model,
            torch.device("cpu"),
            param_dtype="bfloat16" if args.compression == "fsdp-bf16" else "auto",
            ternary_all_gather=args.compression == "fsdp-packed",
        )
    elif world > 1:
        model = wrap_ddp(model, torch.device("cpu"), args.compression, 4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = args.batch // world
    times, per_step, gather_step = [], [], []
    for step in range(args.steps + 3):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randint(0, 320, (b, args.seq), generator=g)
        sent.clear()
        gathered.clear()
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        held = sum(_local_bytes(p) for p in model.parameters())
        held += sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        held += sum(_local_bytes(v) for st in opt.state.values() for v in st.values() if v.dim())
        opt.zero_grad(set_to_none=True)
        if step >= 3:  # after PowerSGD's warm-up (start step 2) and the first steps' setup
            times.append(time.perf_counter() - t)
            per_step.append(sum(sent))
            gather_step.append(sum(gathered))
    dist.all_reduce, dist.all_gather_single, dist.reduce_scatter_single = real, gather, scatter
    grads = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    if rank == 0:
        hooked = world > 1 and args.compression != "none"
        result = {
            "held_mb": held / 2**20,
            "step_s": statistics.median(times),
            "bytes": statistics.median(per_step) if hooked else (grads if world > 1 else 0),
            "gathered": statistics.median(gather_step) if gather_step else 0,
        }
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def measure(world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as d:
        init = f"file://{d}/store"
        if world == 1:
            _run(0, 1, init, d, args)
        else:
            mp.spawn(_run, args=(world, init, d, args), nprocs=world)
        with open(os.path.join(d, "result.json")) as f:
            return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="the global batch (sequences)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = p.parse_args()
    cfg = ModelConfig.preset("tiny")
    print(
        f"# tiny BitNetLM ({cfg.num_parameters() / 1e6:.1f} M parameters, ternary QAT, bf16), "
        f"global batch {args.batch} x {args.seq} tokens, gloo on CPU, {args.threads} threads "
        f"shared by the processes, torch {torch.__version__}\n"
    )
    print(
        "| processes | layout | bytes sent per step (rank 0) | vs DDP float32 | "
        "of which all-gathers | model state per rank MiB | step s |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    args.compression = "none"
    one = measure(1, args)
    print(f"| 1 | - | 0 | - | - | {one['held_mb']:.1f} | {one['step_s']:.3f} |", flush=True)
    args.compression = "none"
    full = measure(2, args)["bytes"]  # DDP's float32 all-reduce: what the ratios divide by
    for c in args.variants:
        args.compression = c
        r = measure(2, args)
        name = NAMES.get(c, f"DDP, {c}")
        print(
            f"| 2 | {name} | {r['bytes']:,.0f} | {r['bytes'] / full:.3f} | "
            f"{r['gathered']:,.0f} | {r['held_mb']:.1f} | {r['step_s']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
