"""QAT overhead: training-step time and peak memory of the `tiny` BitNetLM.

Variants, all the same model, weights and batch:
  off        quantization off (plain nn.Linear): the baseline
  ours       BitLinear (fused int8-saving autograd function, native quantizer kernels, in
             fp32 the exact integer GEMM (its kernel chosen per shape by measurement), in
             bf16 the faster of that and the float GEMM of the quantized values, measured
             per shape; cached weight)
  reference  the BitNet team's published training form, written here:
             y = linear(x + sg(q_a(x) - x), W + sg(q_w(W) - W)), per-token int8, absmean W
  hf         transformers' AutoBitLinear in online-quantization mode

A step is forward + backward + AdamW step. For each precision (fp32, bf16 autocast) and
mode (eager, torch.compile) it prints each variant's median step time and the ratios to `off`
and to `reference`, measured in one run with the variants interleaved round by round (in a
Williams-square order: each variant after each other equally often); a ratio is the median
over rounds of that round's ratio, a paired comparison that the machine's drift between
rounds does not move. Peak memory is measured for each variant in a fresh subprocess: the
peak growth of the heap (malloc's bytes in use, sampled after every ATen op) during one
training step, and the bytes autograd saves for the backward. Never asserts a time: it
prints a table.

    python benchmarks/qat_overhead.py                # everything (~4-10 min on 2 cores)
    python benchmarks/qat_overhead.py --no-compile --steps 5
    python benchmarks/qat_overhead.py --no-compile --repeat 5   # 5 fresh processes per row
    python benchmarks/qat_overhead.py --device cuda --model small --precisions bf16
    python benchmarks/qat_overhead.py --device cuda --model 2b4t --layers 4 --vocab 32000 \
        --precisions bf16 --batch 4 --seq 1024       # a 2B4T-shaped layer stack

On CUDA the step is timed to `torch.cuda.synchronize()` and memory is the caching
allocator's peak growth in one step (`max_memory_allocated`).

Every process runs with the heap the Trainer gives a run (`training.keep_freed_memory`: glibc
keeps a step's freed activations instead of faulting them in again next step);
`--malloc-defaults` keeps glibc's own thresholds.

On a shared machine one run's ratios move by a few percent: `--repeat N` times each row in N
fresh processes and prints every run's ratios and their median.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bitnet_training import BitNetError, BitNetLM, ModelConfig
from bitnet_training.quant import gemm, native, triton_kernels
from bitnet_training.quant.config import QATConfig
from bitnet_training.train.allocator import keep_freed_memory

VARIANTS = ("off", "ours", "reference", "hf")
OURS: dict = {}  # QATConfig fields `ours` runs with (--integer-matmul)


class ReferenceBitLinear(nn.Linear):
    """The reference training BitLinear: STE by `x + (q(x) - x).detach()` on both sides."""

    def forward(self, x):
        w = self.weight
        w_scale = 1.0 / w.abs().mean().clamp(min=1e-5)
        w_q = (w * w_scale).round().clamp(-1, 1) / w_scale
        x_scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
        x_q = (x * x_scale).round().clamp(-128, 127) / x_scale
        return F.linear(x + (x_q - x).detach(), w + (w_q - w).detach(), self.bias)


def _swap_linears(model: nn.Module, make) -> None:
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and name != "lm_head":
            new = make(m)
            new.weight = m.weight
            model.set_submodule(name, new)


def build(variant: str, cfg: ModelConfig) -> nn.Module:
    torch.manual_seed(0)
    if variant == "ours":
        return BitNetLM.bitnet(cfg, QATConfig(**OURS))
    model = BitNetLM(cfg)
    if variant == "reference":
        _swap_linears(model, lambda m: ReferenceBitLinear(m.in_features, m.out_features, False))
    elif variant == "hf":
        from transformers.integrations.bitnet import AutoBitLinear

        _swap_linears(
            model, lambda m: AutoBitLinear(m.in_features, m.out_features, False, online_quant=True)
        )
    return model


class Runner:
    """One variant's model, optimizer and step function at one precision and mode."""

    def __init__(self, variant, cfg, batch, precision, compiled, device="cpu"):
        self.device = torch.device(device)
        self.model = build(variant, cfg).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (batch[0], batch[1]), generator=g)
        self.ids = ids.to(self.device)
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        if compiled:  # an eager forward first measures the matmuls the trace then runs
            with torch.no_grad(), self.autocast():
                self.model(self.ids)
        self.fwd = torch.compile(self.model) if compiled else self.model

    def autocast(self):
        dt = self.dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dt, enabled=bool(self.dtype))

    def sync(self):
        """Wait for the device's queued work (a CUDA step returns before it has run)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self):
        with self.autocast():
            loss = self.fwd(self.ids, labels=self.ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


def saved_bytes(runner: Runner) -> int:
    """Bytes of distinct storages autograd holds for the backward at the end of a forward.

    Tensors saved by graph branches that were later cut off (the quantizer's own ops under
    `.detach()`) are dead by then and not counted; parameters are not counted.
    """
    refs = []

    def pack(t):
        # Keep a detached alias: packing `t` itself would tie a node that saves its own
        # output into a reference cycle that outlives the cut-off branch. (No backward runs.)
        d = t.detach()
        refs.append(weakref.ref(d))
        return d

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), runner.autocast():
        loss = runner.model(runner.ids, labels=runner.ids).loss
    params = {p.untyped_storage().data_ptr() for p in runner.model.parameters()}
    alive = {}
    for r in refs:
        t = r()
        if t is not None and t.untyped_storage().data_ptr() not in params:
            alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del loss
    return sum(alive.values())


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def _heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back (all arenas, mmapped blocks too).

    PyTorch's CPU allocator is plain malloc, so this is the memory its tensors hold; unlike
    RSS it does not depend on whether freed memory was returned to the OS.
    """
    m = _libc.mallinfo2()
    return m.uordblks + m.hblkhd


class PeakHeap(TorchDispatchMode):
    """Track the peak of `_heap_in_use()` after every ATen op (forward and backward)."""

    def __enter__(self):
        self.base = self.peak = _heap_in_use()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_in_use())
        return out


def model_config(args) -> ModelConfig:
    """The preset, with --layers / --vocab overrides (a 2b4t-shaped layer stack that fits)."""
    overrides = {"num_hidden_layers": args.layers, "vocab_size": args.vocab}
    return ModelConfig.preset(args.model, **{k: v for k, v in overrides.items() if v is not None})


def shape_args(args) -> list[str]:
    """The command-line options that fix the model, batch, device and heap, for a child."""
    out = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
           "--device", args.device]  # fmt: skip
    out += ["--malloc-defaults"] if args.malloc_defaults else []
    out += ["--integer-matmul", args.integer_matmul]
    for flag, value in (("--layers", args.layers), ("--vocab", args.vocab)):
        out += [flag, str(value)] if value is not None else []
    return out


def memory_child(args) -> None:
    """Run in a fresh process: peak memory growth of one training step (CPU: the heap's;
    CUDA: the caching allocator's allocated bytes), and saved bytes."""
    cfg = model_config(args)
    r = Runner(args.variant, cfg, (args.batch, args.seq), args.precision, False, args.device)
    r.step()  # first step allocates the optimizer state: not part of the step's peak
    if r.device.type == "cuda":
        r.sync()
        torch.cuda.reset_peak_memory_stats(r.device)
        base = torch.cuda.memory_allocated(r.device)
        r.step()
        r.sync()
        peak = torch.cuda.max_memory_allocated(r.device) - base
    else:
        with PeakHeap() as tracker:
            r.step()
        peak = tracker.peak - tracker.base
    saved = saved_bytes(r)
    print(json.dumps({"peak": peak, "saved": saved}))


def measure_memory(args, variant, precision):
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--precision", precision,
           *shape_args(args)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# The ratio columns: numerator, denominator, header, width.
RATIOS = (
    ("ours", "off", "ours/off", 9),
    ("reference", "off", "ref/off", 8),
    ("hf", "off", "hf/off", 7),
    ("ours", "reference", "ours/ref", 9),
)
# The rounds' orders, cycled: a Williams square for four variants (indices into VARIANTS).
# Over any 4 consecutive rounds each variant runs once in each position and, within a round,
# right after each of the other three exactly once: no variant mostly inherits one
# predecessor's heap and caches.
ORDERS = ((0, 1, 3, 2), (1, 2, 0, 3), (2, 3, 1, 0), (3, 0, 2, 1))


def time_variants(args, precision, compiled) -> dict:
    """One row: each variant's median step time (ms columns) and, for each ratio in `RATIOS`,
    the median over rounds of that round's ratio. A round steps every variant once, in the
    orders of `ORDERS` in turn (balanced when `args.steps` is a multiple of 4, as the default
    12 is). Pairing the ratio within a round cancels the machine's drift between rounds."""
    cfg = model_config(args)
    shape = (args.batch, args.seq)
    runners = {v: Runner(v, cfg, shape, precision, compiled, args.device) for v in VARIANTS}
    for r in runners.values():  # warm-up (and compilation)
        for _ in range(2):
            r.step()
        r.sync()
    times = {v: [] for v in VARIANTS}
    for i in range(args.steps):
        for v in (VARIANTS[j] for j in ORDERS[i % len(ORDERS)]):
            t = time.perf_counter()
            runners[v].step()
            runners[v].sync()
            times[v].append(time.perf_counter() - t)
    ratios = {
        f"{a}/{b}": statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))
        for a, b, _, _ in RATIOS
    }
    return {"ms": {v: statistics.median(ts) * 1e3 for v, ts in times.items()}, "ratios": ratios}


def timing_child(args) -> None:
    """Run in a fresh process: one row's median step times and the matmuls `ours` ran."""
    row = time_variants(args, args.precision, args.compiled)
    out = {
        "decisions": gemm.decisions(),
        "float": gemm.dequantized(),
        "screened": gemm.screened_out(),
        "paths": gemm.paths(),
    }
    print(json.dumps({"row": row, **out, "triton": triton_kernels.checks()}))


# What the children ran.
_CHILD_MATMULS: dict = {"decisions": {}, "float": set(), "triton": {}, "screened": {}, "paths": {}}


def time_repeated(args, precision, compiled) -> list[dict]:
    """`args.repeat` runs of one row, each in a fresh process (no heap left by another)."""
    cmd = [sys.executable, __file__, "--child", "time", "--precision", precision,
           *shape_args(args), "--steps", str(args.steps)]  # fmt: skip
    cmd += ["--compiled"] if compiled else []
    runs = []
    for _ in range(args.repeat):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        runs.append(result["row"])
        _CHILD_MATMULS["decisions"].update(result["decisions"])  # the last run's choice
        _CHILD_MATMULS["float"].update(result["float"])
        _CHILD_MATMULS["triton"].update(result["triton"])
        _CHILD_MATMULS["screened"].update(result["screened"])
        _CHILD_MATMULS["paths"].update(result["paths"])
    return runs


def _row(precision: str, mode: str, row: dict) -> str:
    cells = " ".join(f"{row['ms'][v]:12.1f}" for v in VARIANTS)
    ratios = " ".join(f"{row['ratios'][f'{a}/{b}']:{w}.3f}" for a, b, _, w in RATIOS)
    return f"{precision:9} {mode:8} {cells} {ratios}"


ISA_FLAGS = ("amx_bf16", "amx_int8", "avx512_vnni", "avx512_bf16", "avx512f", "avx2")


def machine() -> str:
    """The CPU model and the instruction sets that decide which matmul wins (AMX tiles for
    bf16 / int8, AVX-512 VNNI / BF16), from /proc/cpuinfo where there is one."""
    name, flags = native.cpu_info()
    have = [f for f in ISA_FLAGS if f in flags] or ["none of " + ", ".join(ISA_FLAGS)]
    return f"{name}; {', '.join(have)}"


def profile_child(args) -> None:
    """Run in a fresh process: self CPU ms per step by ATen op, for one variant."""
    from torch.profiler import ProfilerActivity, profile

    cfg = model_config(args)
    r = Runner(args.variant, cfg, (args.batch, args.seq), args.precision, False, args.device)
    for _ in range(2):
        r.step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            r.step()
    print(json.dumps({e.key: e.self_cpu_time_total / 3e3 for e in prof.key_averages()}))


def profile_step(args, precision: str) -> None:
    """torch.profiler over a few steps of `off` and of `ours`: where our extra time goes, by
    ATen op (self time per step, ours minus off; an op `ours` replaces shows negative). Each
    variant runs in its own process: a second model profiled in one process was measured to
    run its elementwise ops up to 4x slower (the heap the first one left), whichever it was."""
    per_op = {}
    for variant in ("off", "ours"):
        cmd = [sys.executable, __file__, "--child", "profile", "--variant", variant,
               "--precision", precision, *shape_args(args)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        per_op[variant] = json.loads(out.strip().splitlines()[-1])
    off, ours = per_op["off"], per_op["ours"]
    diff = {k: ours.get(k, 0.0) - off.get(k, 0.0) for k in set(off) | set(ours)}
    rows = sorted(diff, key=diff.get, reverse=True)
    print(f"\n## Profile, {precision}: self CPU ms per step, ours - off (largest both ways)")
    print(f"{'op':44} {'off':>8} {'ours':>8} {'diff':>8}")
    for k in rows[:10] + rows[-4:]:
        print(f"{k[:44]:44} {off.get(k, 0):8.1f} {ours.get(k, 0):8.1f} {diff[k]:8.1f}")
    print(f"{'total':44} {sum(off.values()):8.1f} {sum(ours.values()):8.1f} "
          f"{sum(diff.values()):8.1f}")  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", help="a ModelConfig preset: tiny, small, 2b4t")
    p.add_argument("--layers", type=int, help="override the preset's number of layers")
    p.add_argument("--vocab", type=int, help="override the preset's vocabulary size")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=12, help="timed rounds (steps per variant)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--compile-only", action="store_true", help="only the torch.compile rows")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument(
        "--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)"
    )
    p.add_argument(
        "--profile", choices=["fp32", "bf16"], help="only profile ours against off, by op"
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="time each row in N fresh processes (median)"
    )
    p.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="keep glibc's heap thresholds (the Trainer raises them: training.keep_freed_memory)",
    )
    p.add_argument(
        "--integer-matmul",
        choices=("auto", "true", "false"),
        default="auto",
        help="ours' qat.integer_matmul (true: the integer GEMM in bf16 too)",
    )
    p.add_argument("--child", nargs="?", const="memory", help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, not {args.repeat}")
    if args.device not in ("cpu", "cuda") or (
        args.device == "cuda" and not torch.cuda.is_available()
    ):
        p.error(f"--device {args.device}: expected cpu, or cuda where PyTorch sees a GPU")
    try:
        model_config(args)
    except BitNetError as e:
        p.error(str(e))
    if args.profile and args.device != "cpu":
        p.error("--profile tables CPU ops: run it with --device cpu")
    if args.integer_matmul != "auto":
        OURS["integer_matmul"] = args.integer_matmul == "true"
    if not args.malloc_defaults:
        keep_freed_memory()  # as the Trainer does: every variant's step runs with it
    if args.child:
        children = {"profile": profile_child, "time": timing_child, "memory": memory_child}
        return children[args.child](args)

    torch.manual_seed(0)
    cfg = model_config(args)
    print(f"# {args.model} BitNetLM ({cfg.num_parameters() / 1e6:.1f} M parameters), batch "
          f"{args.batch} x {args.seq} = {args.batch * args.seq} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    heap = "glibc's defaults" if args.malloc_defaults else "freed memory kept, as the Trainer"
    print(f"# heap: {heap}")
    if OURS:
        print(f"# ours: qat.integer_matmul={args.integer_matmul}")
    print(f"# CPU: {machine()}")
    if args.device == "cuda":
        cap = ".".join(map(str, torch.cuda.get_device_capability()))
        quantizer = triton_kernels.error() or "Triton kernel"
        print(f"# GPU: {torch.cuda.get_device_name()} (compute capability {cap}), CUDA "
              f"{torch.version.cuda}; activation quantizer: {quantizer}")  # fmt: skip
    if args.profile:
        return profile_step(args, args.profile)
    print(f"\n## Step time (forward + backward + AdamW): median of {args.steps} interleaved "
          "rounds; ratios: the median of the rounds' ratios")  # fmt: skip
    print(f"{'precision':9} {'mode':8} " + " ".join(f"{v + ' ms':>12}" for v in VARIANTS)
          + "".join(f" {name:>{w}}" for _, _, name, w in RATIOS))  # fmt: skip
    modes = [False] if args.no_compile else [True] if args.compile_only else [False, True]
    precisions = args.precisions.split(",")
    for compiled in modes:
        mode = "compile" if compiled else "eager"
        for precision in precisions:
            if args.repeat == 1:
                print(_row(precision, mode, time_variants(args, precision, compiled)), flush=True)
                continue
            runs = time_repeated(args, precision, compiled)
            for i, t in enumerate(runs):
                print(_row(precision, f"{mode}#{i + 1}", t), flush=True)
            # The median of each run's ratios (ratios, not times: each run's own baseline is
            # what drift has moved).
            med = {
                k: statistics.median(run["ratios"][k] for run in runs) for k in runs[0]["ratios"]
            }
            ms = {v: statistics.median(run["ms"][v] for run in runs) for v in VARIANTS}
            print(_row(precision, "median", {"ms": ms, "ratios": med}), flush=True)
    print("\n## Matmuls `ours` ran: integer GEMM kernels chosen (measured here, per shape)")
    for shape, kernel in {**gemm.decisions(), **_CHILD_MATMULS["decisions"]}.items():
        print(f"{shape:40} {kernel}")
    for name, why in {**gemm.screened_out(), **_CHILD_MATMULS["screened"]}.items():
        print(f"{name:40} {why}")
    for shape, path in {**gemm.paths(), **_CHILD_MATMULS["paths"]}.items():
        print(f"{shape:40} {path} GEMM measured faster (integer_matmul=auto)")
    for where in sorted(set(gemm.dequantized()) | _CHILD_MATMULS["float"]):
        print(f"{where:40} float GEMM of x_q, w_q ran")
    print(f"native quantizers (CPU): {native.build_error() or 'built'}")
    for where, ok in {**triton_kernels.checks(), **_CHILD_MATMULS["triton"]}.items():
        verdict = "exact on the device: ran" if ok else "differs: PyTorch's ops ran"
        print(f"activation quantizer (Triton) {where}: {verdict}")
    if args.no_memory:
        return
    what = "the CUDA allocator's peak" if args.device == "cuda" else "peak heap"
    print(f"\n## Memory (eager): {what} growth in one step; bytes saved for the backward")
    print(f"{'precision':9} " + " ".join(f"{v + ' MiB':>14}" for v in VARIANTS)
          + f" {'ours/ref peak':>14} {'ours/ref saved':>15}")  # fmt: skip
    for precision in precisions:
        m = {v: measure_memory(args, v, precision) for v in VARIANTS}
        cells = " ".join(
            f"{m[v]['peak'] / 2**20:6.0f} ({m[v]['saved'] / 2**20:4.0f})" for v in VARIANTS
        )
        print(f"{precision:9} {cells} {m['ours']['peak'] / m['reference']['peak']:14.3f} "
              f"{m['ours']['saved'] / m['reference']['saved']:15.3f}", flush=True)  # fmt: skip
    print("   (each cell: peak heap growth during a step, in parentheses saved-for-backward MiB)")


if __name__ == "__main__":
    main()
