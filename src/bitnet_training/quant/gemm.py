"""Exact GEMMs of int8 activation codes with integer (ternary) weight codes, chosen per
machine by measurement.

Every kernel here returns `torch._int_mm(a, w.t()).to(dt)`: the exact integer product
rounded once to the compute dtype, so which one runs changes the time, never a bit of the
result (tests check each against `_int_mm`; `choose` checks again on its probe):

    onednn  oneDNN's quantized linear (`torch.ops.onednn.qlinear_pointwise`, what inductor
            uses for int8 models), s8 x s8 -> float32 / bf16 on AMX or AVX-512 VNNI, with
            the weight prepacked once per optimizer step. CPU, float32 and bf16.
    int_mm  `torch._int_mm` (s8 x s8 -> s32), then a cast. CPU, and CUDA's int8 tensor cores.
    float   a GEMM of the same codes held in the compute dtype (bf16 / float32 / float64):
            exact because codes and every partial sum (below 128 * 2^17 = 2^24) are
            representable and these GEMMs accumulate in at least float32.

`choose` times the kernels the device allows on a random probe of the layer's shape (rows
capped at `PROBE_ROWS`; laying out the weight, which happens once per optimizer step, plus
one product rescaled as the layer rescales it, after untimed warm-up rounds), once per
(device, dtype, rows rounded up to a power of two, in, out) per process, and caches the
winner; `QATConfig(gemm=...)` names one instead. Before the first such measurement on a
(device, dtype), a screen times each kernel on a small fixed product and drops for the
process those over `SCREEN_FACTOR` times slower than the fastest: a kernel with no fast path
on this CPU (oneDNN's s8 x s8 linear on an AMD EPYC without AMX ran 1,000-4,000x slower than
`_int_mm`, over a second a layer) is then never timed at a layer's full shape.

Where the layer may also run the float GEMM of the quantized values x_q = codes / s instead
(`QATConfig(integer_matmul="auto")` in bf16: different roundings, not the same numbers),
`integer_path` measures which of the two is faster for its (in, out) shape, once, and keeps
the decision for the process; the Trainer decides every layer's before the first step, makes
the ranks hold the same decisions (`agree_paths`), and saves them in checkpoints (a resumed
run keeps its numbers).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import BitNetError
from .native import library, rescale_accumulator, reusable, takes_accumulator

KERNELS = ("onednn", "int_mm", "float")
# Integer sums stay exact below 2^24 (a float32 significand) and inside int32.
MAX_IN_FEATURES = 2**17

_DECISIONS: dict[tuple, str] = {}
# (device type, dtype, kernels screened, native_ok) -> {kernel: its time / the fastest's}
_SCREENS: dict[tuple, dict[str, float]] = {}
_DEQUANTIZED: set[tuple[str, torch.dtype]] = set()  # where the float GEMM of x_q, w_q ran
ROUNDS = 5  # timed rounds per kernel when choosing
PROBE_ROWS = 2048  # the most rows a measurement's probe has
WARMUP = 3  # untimed rounds before them
SCREEN_SHAPE = (64, 256, 256)  # rows, in, out: about 0.01-0.1 ms for a kernel with a fast path
SCREEN_FACTOR = 20.0  # a kernel this many times slower than the fastest there is dropped
# (device type, dtype, in, out) -> whether the integer GEMM runs (True) or the float GEMM of
# x_q (False), where both may (`integer_path`).
_PATHS: dict[tuple, bool] = {}
# The integer path is chosen when its time is at most this share of the float path's: a
# near tie keeps the float GEMM, the reference form's own numbers.
PATH_FACTOR = 0.95


def unavailable(
    kernel: str, n: int, k: int, m: int, dt: torch.dtype, device, code_max: int = 1
) -> str | None:
    """Why `kernel` cannot run an (n, k) x (k, m) product in `dt` on `device`, for weight
    codes of magnitude up to `code_max` (None: it can)."""
    dev = torch.device(device).type
    if k >= MAX_IN_FEATURES:
        return f"in_features {k} >= 2^17 (int32 sums could overflow)"
    if dt == torch.float16:
        return "float16 cannot hold the integer sums (above 65504) or small tokens' scales"
    if kernel == "onednn":
        if dev != "cpu":
            return "oneDNN's quantized linear runs on CPU only"
        if dt not in (torch.float32, torch.bfloat16):
            return f"oneDNN's quantized linear outputs float32 or bf16, not {dt}"
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops, "onednn")):
            return "this PyTorch build has no oneDNN"
        if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
            return "this PyTorch build has no onednn.qlinear_pointwise"
        return None
    if kernel == "int_mm":
        if dev == "cpu":
            return None
        if dev == "cuda":
            ok = n > 16 and k % 8 == 0 and m % 8 == 0
            return None if ok else "CUDA's _int_mm needs more than 16 rows and k, m multiples of 8"
        return f"torch._int_mm does not run on {dev}"
    if kernel == "float":
        if dt not in (torch.bfloat16, torch.float32, torch.float64):
            return f"a {dt} GEMM does not accumulate exactly"
        if 128 * code_max * k >= 2**24:
            return f"in_features {k} with codes up to {code_max}: float32 sums could round"
        cuda = torch.backends.cuda.matmul
        if dev == "cuda" and dt == torch.bfloat16 and cuda.allow_bf16_reduced_precision_reduction:
            return "cuBLAS may add bf16 partial sums in bf16 (see its reduced-precision flag)"
        return None
    raise ValueError(f"unknown GEMM kernel {kernel!r}; one of {', '.join(KERNELS)}")


class Prepared:
    """A weight's codes (out, in), int8, laid out for one kernel and compute dtype."""

    __slots__ = ("dt", "kernel", "operand", "transpose")

    def __init__(
        self, kernel: str, codes: torch.Tensor, dt: torch.dtype, reuse: Prepared | None = None
    ):
        """`reuse`: the same kernel's layout of an earlier weight of this shape, whose buffer
        is overwritten if nothing else holds it (no fresh memory to fault in)."""
        self.kernel, self.dt, self.transpose = kernel, dt, False
        old = reuse.operand if reuse is not None and reuse.kernel == kernel else None
        if kernel == "onednn":
            m = codes.shape[0]
            packed = torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)
            ones = torch.ones(m, dtype=torch.float32)
            self.operand = (packed, ones, torch.zeros(m, dtype=torch.int64))
        elif kernel == "int_mm" and codes.device.type == "cpu":
            # The CPU kernel takes the transposed view as it is: the same products, measured
            # as fast as a transposed copy, which is not made (0.1-0.25 ms a layer a step).
            self.operand, self.transpose = codes, True
        elif kernel == "int_mm":
            shape = codes.shape[::-1]
            fits = reusable(old, shape, torch.int8, codes.device)
            self.operand = old.copy_(codes.t()) if fits else codes.t().contiguous()
        else:
            fits = reusable(old, codes.shape, dt, codes.device)
            self.operand = old.copy_(codes) if fits else codes.to(dt)

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        """int8 codes (n, in) -> the exact product (n, out), rounded once to `dt`. The
        `float` kernel also takes the codes already in `dt`."""
        if self.kernel == "onednn":
            packed, ones, zeros = self.operand
            return torch.ops.onednn.qlinear_pointwise(
                a, 1.0, 0, packed, ones, zeros, None, 1.0, 0, self.dt, "none", [], ""
            )
        if self.kernel == "int_mm":
            return self.accumulate(a).to(self.dt)
        return F.linear(a if a.dtype == self.dt else a.to(self.dt), self.operand)

    def accumulate(self, a: torch.Tensor) -> torch.Tensor:
        """`int_mm` only: the exact int32 sums (n, out), before any rounding to `dt`."""
        return torch._int_mm(a, self.operand.t() if self.transpose else self.operand)

    def scaled(
        self, a: torch.Tensor, inv: torch.Tensor, scale: torch.Tensor, native_ok: bool = True
    ) -> torch.Tensor:
        """A quantized layer's output: the exact product rounded to `dt`, divided by the
        per-token scales `inv` (n, 1) and times the weight's `scale` (per tensor, or (1, out)
        per output channel): y = (a W^T) * gamma / s. `int_mm` in float32 does it in one
        in-place C pass over the int32 sums where `native_ok` and the native kernels allow."""
        if (
            native_ok
            and self.kernel == "int_mm"
            and self.dt == torch.float32
            and a.device.type == "cpu"
            and takes_accumulator((a.shape[0], self.out_features), inv, scale)
            and library() is not None  # last: it builds the library on first use
        ):
            return rescale_accumulator(self.accumulate(a), inv, scale)
        y = self(a)
        if scale.dim() == 0:  # per-tensor gamma folds into the token's scale
            return y.mul_((scale / inv).to(self.dt))
        return y.div_(inv.to(self.dt)).mul_(scale.to(self.dt))

    @property
    def out_features(self) -> int:
        if self.kernel == "onednn":
            return self.operand[1].shape[0]
        if self.kernel == "int_mm" and not self.transpose:
            return self.operand.shape[1]
        return self.operand.shape[0]


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _probe_rows(n: int) -> int:
    """The rows a measurement for `n` rows times: n rounded up to a power of two, at most
    PROBE_ROWS (a GEMM's time grows with its rows past that; a 7B layer's measurement at
    16k rows took minutes on 2 cores)."""
    return min(_bucket(n), PROBE_ROWS)


def choose(
    n: int,
    k: int,
    m: int,
    dt: torch.dtype,
    device,
    allowed=KERNELS,
    code_max: int = 1,
    native_ok: bool = True,
) -> str | None:
    """The fastest kernel of `allowed` for this shape, measured once and cached; None when
    none of them can run it. Under `torch.compile` nothing is measured: `int_mm` if it can.
    `native_ok`: whether the layer may rescale with the native kernels (`qat.kernels`), as
    the probe then does too."""
    device = torch.device(device)
    usable = [kn for kn in allowed if unavailable(kn, n, k, m, dt, device, code_max) is None]
    if torch.compiler.is_compiling():
        return "int_mm" if "int_mm" in usable else (usable[0] if usable else None)
    if not usable:
        return None
    key = (device.type, dt, _bucket(n), k, m, tuple(usable), native_ok)
    if key not in _DECISIONS:  # one usable kernel: recorded as chosen, nothing measured
        if len(usable) > 1:
            usable = _screened(usable, dt, device, native_ok)
        _DECISIONS[key] = (
            usable[0]
            if len(usable) == 1
            else _measure(usable, _probe_rows(n), k, m, dt, device, native_ok)
        )
    return _DECISIONS[key]


def _screened(usable: list[str], dt, device: torch.device, native_ok: bool) -> list[str]:
    """`usable` less the kernels more than `SCREEN_FACTOR` times slower than the fastest on
    a small fixed product (`SCREEN_SHAPE`), timed once per (device, dtype, kernels) per
    process: one untimed call each (setup), then the best of two timed ones."""
    key = (device.type, dt, tuple(usable), native_ok)
    if key not in _SCREENS:
        a, w, inv, gamma = _probe(*SCREEN_SHAPE, device)
        times = {}
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for kn in usable:
                r = Prepared(kn, w, dt)
                r.scaled(a, inv, gamma, native_ok)
                times[kn] = min(
                    _timed(lambda r=r: r.scaled(a, inv, gamma, native_ok), device) for _ in range(2)
                )
        fastest = max(min(times.values()), 1e-9)
        _SCREENS[key] = {kn: t / fastest for kn, t in times.items()}
    # The fastest is always kept (its ratio is 1).
    return [kn for kn in usable if _SCREENS[key][kn] <= SCREEN_FACTOR]


def _probe(n: int, k: int, m: int, device: torch.device):
    """Random (n, k) int8 codes, (m, k) ternary weight codes, (n, 1) token scales and a
    gamma, from a private generator: measuring must not move the global RNG (bit-exact
    resume)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randint(-128, 128, (n, k), generator=g, device=device, dtype=torch.int8)
    w = torch.randint(-1, 2, (m, k), generator=g, device=device, dtype=torch.int8)
    inv = torch.rand(n, 1, generator=g, device=device) + 0.5
    return a, w, inv, torch.tensor(0.02, device=device)


def _measure(usable, n, k, m, dt, device, native_ok: bool = True) -> str:
    a, w, inv, gamma = _probe(n, k, m, device)
    # Outside any autocast region the caller is in: the reference product is float64.
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        want = (a.double() @ w.double().t()).to(dt)
        runs = {kn: Prepared(kn, w, dt) for kn in usable}
        # Not exact on this machine: never chosen.
        runs = {kn: r for kn, r in runs.items() if torch.equal(r(a), want)}
        # Laying out the weight is paid once per optimizer step (the weight changes), so it
        # counts in full beside one product and its rescaling as the layer runs it (which
        # differs by kernel: in place on int_mm's int32 sums in float32, a pass over the
        # rounded output otherwise). Rounds interleave the kernels, so a disturbance
        # (another process on the cores) hits all of them; each keeps its best round.
        # Untimed rounds first: a kernel's first calls in a process run slower (oneDNN sets
        # up its primitives, and the allocator maps fresh memory for the outputs until it
        # keeps freed blocks), measured up to 4x: the timed rounds see what a training step
        # sees once it runs steadily.
        for _ in range(WARMUP):
            for kn, r in runs.items():
                Prepared(kn, w, dt)
                r.scaled(a, inv, gamma, native_ok)
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(ROUNDS):
            for kn, r in runs.items():
                t = _timed(lambda kn=kn: Prepared(kn, w, dt), device)
                t += _timed(lambda r=r: r.scaled(a, inv, gamma, native_ok), device)
                best[kn] = min(best[kn], t)
    if not best:
        return "int_mm" if "int_mm" in usable else usable[0]
    return min(best, key=best.get)


def integer_path(
    k: int,
    m: int,
    dt: torch.dtype,
    device,
    allowed=KERNELS,
    code_max: int = 1,
    native_ok: bool = True,
    rebuild: Callable | None = None,
    float_rebuilds: bool = False,
    rows: int = PROBE_ROWS,
) -> bool:
    """Whether a layer of this (in `k`, out `m`) shape runs the exact integer GEMM (True) or
    the float GEMM of x_q = codes / s (False) in `dt` on `device`: the faster of the two,
    measured once per (device, dtype, in, out) per process on a probe of `rows` rows (the
    integer GEMM with the fastest of the `allowed` kernels there; False if none can run it).

    `rebuild(codes, inv)` makes x_q as the layer does, for a weight that trains (None: a
    frozen weight). The integer path pays it once more (the backward's x_q, or the forward's
    where x_q is saved), and the float path too where `float_rebuilds` (codes saved). Under
    `torch.compile` nothing is measured: the decision this process holds, else the float
    GEMM."""
    key = (torch.device(device).type, dt, k, m)
    if torch.compiler.is_compiling():
        return _PATHS.get(key, False)
    if key not in _PATHS:
        _PATHS[key] = _measure_path(
            allowed, rows, k, m, dt, device, code_max, native_ok, rebuild, float_rebuilds
        )
    return _PATHS[key]


def _measure_path(
    allowed, rows, k, m, dt, device, code_max, native_ok, rebuild, float_rebuilds
) -> bool:
    device = torch.device(device)
    # The `float` kernel runs the very GEMM the float path runs, plus the rescale: it could
    # never win by the margin, so only the integer kernels are timed against that path.
    integer = [kn for kn in allowed if kn != "float"]
    kernel = choose(rows, k, m, dt, device, integer, code_max, native_ok) if integer else None
    if kernel is None:
        return False
    a, w, inv, gamma = _probe(rows, k, m, device)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        # What the float path multiplies: x_q as the layer makes it, w_q in dt (both paths
        # hold w_q, the backward's operand).
        x_q = rebuild(a, inv) if rebuild is not None else a.div(inv).to(dt)
        w_q = (w.float() * gamma).to(dt)

        def integer():
            Prepared(kernel, w, dt).scaled(a, inv, gamma, native_ok)
            if rebuild is not None:
                rebuild(a, inv)  # x_q for the weight gradient

        def floating():
            F.linear(x_q, w_q)
            if rebuild is not None and float_rebuilds:
                rebuild(a, inv)

        runs = {True: integer, False: floating}
        for _ in range(WARMUP):
            for fn in runs.values():
                fn()
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(ROUNDS):  # interleaved, each keeps its best round (as `_measure`)
            for path, fn in runs.items():
                best[path] = min(best[path], _timed(fn, device))
    return best[True] <= PATH_FACTOR * best[False]


def agree_paths() -> None:
    """Make every rank of the default process group hold the same `integer_path` decisions,
    so that data-parallel replicas compute the same numbers: each shape takes the decision
    of the lowest rank that holds one. A collective: every rank calls it (the Trainer does,
    at setup, after each rank decided its own layers'). Nothing to do in one process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, path_state())
    _PATHS.clear()
    for state in reversed(states):  # rank 0 last: its decisions win
        load_path_state(state)


def paths() -> dict[str, str]:
    """The matmul each shape runs where `integer_path` decided: 'device dtype in -> out':
    'integer' or 'float'."""
    return {
        f"{dev} {str(dt).removeprefix('torch.')} {k} -> {m}": "integer" if v else "float"
        for (dev, dt, k, m), v in sorted(_PATHS.items(), key=str)
    }


def path_state() -> list[list]:
    """The `integer_path` decisions, for a checkpoint: [device, dtype, in, out, integer]."""
    return [[dev, str(dt).removeprefix("torch."), k, m, v] for (dev, dt, k, m), v in _PATHS.items()]


def load_path_state(state: list[list]) -> None:
    """Hold the decisions of `path_state()` (a resumed run keeps its matmuls, so its
    numbers)."""
    for entry in state:
        ok = isinstance(entry, list) and len(entry) == 5
        dt = getattr(torch, entry[1], None) if ok and isinstance(entry[1], str) else None
        if not (isinstance(dt, torch.dtype) and all(type(x) is int for x in entry[2:4])):
            raise BitNetError(
                f"the checkpoint's matmul_paths entry {entry!r} is not "
                "[device, dtype, in_features, out_features, integer]"
            )
        key = (str(entry[0]), dt, entry[2], entry[3])
        _PATHS[key] = bool(entry[4])


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def decisions() -> dict[str, str]:
    """The kernels chosen so far in this process: '(device dtype) rows x in -> out': kernel.
    Shapes where `integer_path` chose the float GEMM of x_q are left out: no kernel ran."""
    out = {}
    for (dev, dt, n, k, m, *_), kernel in sorted(_DECISIONS.items(), key=str):
        if _PATHS.get((dev, dt, k, m), True):
            out[f"{dev} {str(dt).removeprefix('torch.')} {n} x {k} -> {m}"] = kernel
    return out


def screened_out() -> dict[str, str]:
    """The kernels the screen dropped so far in this process: 'device dtype kernel': how
    many times slower than the fastest it ran on the screen's product."""
    n, k, m = SCREEN_SHAPE
    out = {}
    for (dev, dt, *_), slowdown in sorted(_SCREENS.items(), key=str):
        for kn, x in slowdown.items():
            if x > SCREEN_FACTOR:
                name = f"{dev} {str(dt).removeprefix('torch.')} {kn}"
                out[name] = f"{x:,.0f}x slower than the fastest on {n} x {k} -> {m}: not used"
    return out


def note_dequantized(device, dt: torch.dtype) -> None:
    """Record that a fused layer ran the float GEMM of the quantized values (no integer
    GEMM) on `device` in `dt`, for `dequantized()`."""
    _DEQUANTIZED.add((torch.device(device).type, dt))


def dequantized() -> list[str]:
    """Where fused layers ran the float GEMM of the quantized values: 'device dtype'."""
    return sorted(f"{dev} {str(dt).removeprefix('torch.')}" for dev, dt in _DEQUANTIZED)
