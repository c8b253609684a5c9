"""BitLinear's fused CPU quantizers: small C kernels built with the system's C compiler on
first use, cached on disk, and called through ctypes.

The activation quantizer makes one pass over each token's row (absmax, then codes while the
row is still in cache) instead of the six whole-tensor passes of the PyTorch composition
(widen, abs, amax, scale, round, cast), measured 4-6x faster at 2048 x 384..1024 on 2 cores.
The weight's gamma, its ternary codes with the dequantized weight, and the backward's x_q
are one pass each. Every output is bit-identical to the PyTorch composition it replaces
(tests compare them).

The library is compiled with `-O3 -march=native` for the CPU it runs on, so the cache key
holds the source, the compiler and the CPU's model and flags. It goes under
`$BITNET_TRAINING_CACHE` (default `$XDG_CACHE_HOME/bitnet-training`, else
`~/.cache/bitnet-training`), written atomically, so concurrent processes (torchrun ranks)
can build it at once. Without a C compiler (`$CC`, else `cc` / `gcc`) the PyTorch
composition runs instead; `QATConfig(kernels="native")` makes that an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from .functional import SCALE_EPS, Quantized, absmean_scale

SOURCE = Path(__file__).with_name("kernels") / "bitlinear_cpu.c"
# No contraction of a * b + c into a fused multiply-add the source does not write: the
# kernels round where PyTorch's ops round.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math")
FLAGS += ("-ffp-contract=off",)
FLAGS += ("-shared", "-fPIC")
# OpenMP: the library links libgomp.so.1 by name, which resolves to the copy torch already
# loaded, so both share one thread pool. Threads per call: torch.get_num_threads().

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None; "error": why it is None


def cache_dir() -> Path:
    """Where built kernels are kept."""
    env = os.environ.get("BITNET_TRAINING_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bitnet-training"


def _compiler() -> str | None:
    """$CC if set (it must exist), else `cc` or `gcc` on PATH."""
    cc = os.environ.get("CC")
    if cc:
        if shutil.which(cc) is None:
            raise RuntimeError(f"CC={cc} is not an executable compiler")
        return cc
    return next((c for c in ("cc", "gcc") if shutil.which(c)), None)


def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and instruction-set flags, from Linux's /proc/cpuinfo (elsewhere
    the platform's processor name and no flags)."""
    name, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
    except OSError:
        pass
    return name, flags


def _cpu_id() -> str:
    """The CPU model and flags (-march=native depends on them)."""
    name, flags = cpu_info()
    return f"{name}: {' '.join(sorted(flags))}"


def _build() -> ctypes.CDLL:
    if platform.system() != "Linux":
        raise RuntimeError(f"it is built on Linux only (this is {platform.system()})")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (SOURCE.read_text(), " ".join(FLAGS), version, _cpu_id()))
    ).hexdigest()[:16]
    target = cache_dir() / f"bitlinear_cpu-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run(
                [cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True
            )
            if done.returncode:
                err = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise RuntimeError(f"{cc} failed to build {SOURCE.name}: {err}")
            os.replace(tmp, target)  # atomic: another process sees all of it or nothing
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    _prune(target)
    lib = ctypes.CDLL(str(target))
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in _ACT_KERNELS:
        real = ctypes.c_double if name.endswith("f64") else ctypes.c_float
        fn = getattr(lib, f"act_quant_{name}")
        fn.argtypes = (ptr, i64, i64, real, real, ptr, ptr, ptr, i32)
        fn.restype = i32
    lib.rescale_i32_f32.argtypes = (ptr, i64, i64, ptr, ptr, i32)
    lib.rescale_i32_f32.restype = None
    lib.absmean_f32.argtypes = (ptr, i64, i64, i32, ctypes.c_float, i32, ptr)
    lib.absmean_f32.restype = i32
    lib.quotient_mismatches.argtypes = (i32,)
    lib.quotient_mismatches.restype = ctypes.c_int64
    for name in _SUFFIX.values():
        fn = getattr(lib, f"ternary_{name}")
        fn.argtypes = (ptr, i64, i64, ptr, i32, ptr, ptr, i32)
        fn.restype = None
        fn = getattr(lib, f"rebuild_{name}")
        fn.argtypes = (ptr, i64, i64, ptr, ptr, i32)
        fn.restype = None
        fn = getattr(lib, f"absmean_ternary_{name}")
        fn.argtypes = (ptr, i64, i64, i32, ctypes.c_float, i32, ptr, ptr, ptr)
        fn.restype = i32
    return lib


KEEP_UNUSED_DAYS = 30


def _prune(used: Path) -> None:
    """Mark `used` as loaded now (its mtime) and delete the builds no process has loaded for
    `KEEP_UNUSED_DAYS`: those of other sources, compilers or CPUs (an older version's, a
    machine image's). Deleting a library another process has loaded is safe on Linux."""
    now = time.time()
    with contextlib.suppress(OSError):
        os.utime(used, (now, now))
    for old in used.parent.glob("bitlinear_cpu-*.so"):
        try:
            if old != used and now - old.stat().st_mtime > KEEP_UNUSED_DAYS * 86400:
                old.unlink()
        except OSError:
            pass  # removed or replaced by another process meanwhile


def library() -> ctypes.CDLL | None:
    """The built kernel library, building it on first call; None if it cannot be built
    (`build_error()` says why)."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                try:
                    _state["lib"], _state["error"] = _build(), None
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _state["lib"], _state["error"] = None, str(e)
    return _state["lib"]


def built() -> bool:
    """Whether the library has been built and loaded in this process (builds nothing)."""
    return _state.get("lib") is not None


def build_error() -> str | None:
    """Why the native kernel is unavailable (None: it is available, or not yet tried)."""
    library()
    return _state.get("error")


_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}
# act_quant_<input>_<x_q dtype>: float inputs with float32 scales, or float64 throughout.
_LOW = ("f32", "bf16", "f16")
_ACT_KERNELS = (*(f"{a}_{b}" for a in _LOW for b in _LOW), "f64_f64")


def real(t: torch.Tensor) -> bool:
    """Whether `t` is a plain CPU tensor with memory behind it, and no fake-tensor mode (the
    memory planner's tracing) is on: what a kernel reading raw pointers may be given."""
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.device.type == "cpu"
        and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None
    )


def supports(x: torch.Tensor) -> bool:
    """Whether the native quantizer takes `x` (a real CPU float tensor) at all."""
    return x.dtype in _SUFFIX and real(x)


def quantize_activations(
    x2: torch.Tensor, bits: int, dequantized: torch.dtype | None = None, codes: bool = True
) -> tuple[torch.Tensor | None, ...]:
    """BitNet's per-token absmax quantizer of (N, K) `x2` in one fused pass.

    Returns int8 codes (N, K) and s = Qp / max|x| per row, (N, 1), in float32 (float64 for
    a float64 input): the same values as `bitnet_training.nn.bitlinear`'s PyTorch form.
    With `dequantized` a dtype, also the quantized activations x_q = codes / s in it, from
    the same pass (`rebuild_activations`' values): (codes, s, x_q); with `codes=False` as
    well, the codes are not written (each row's go through a scratch row) and are None.
    """
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native activation quantizer is unavailable: {build_error()}")
    if not codes and dequantized is None:
        raise ValueError("quantize_activations: codes=False needs a dequantized dtype")
    x2 = x2.contiguous()
    n, k = x2.shape
    if k == 0:
        raise ValueError("quantize_activations: rows of length 0 have no absmax")
    wide = torch.float64 if x2.dtype == torch.float64 else torch.float32
    out = dequantized or (torch.float64 if wide == torch.float64 else torch.float32)
    name = f"{_SUFFIX[x2.dtype]}_{_SUFFIX[out]}"
    if name not in _ACT_KERNELS:
        raise ValueError(f"quantize_activations: no kernel from {x2.dtype} to x_q in {out}")
    c = torch.empty((n, k), dtype=torch.int8) if codes else None
    inv = torch.empty((n, 1), dtype=wide)
    x_q = torch.empty((n, k), dtype=out) if dequantized is not None else None
    qp = float(2 ** (bits - 1) - 1)
    failed = getattr(lib, f"act_quant_{name}")(
        x2.data_ptr(), n, k, qp, SCALE_EPS, None if c is None else c.data_ptr(),
        inv.data_ptr(), None if x_q is None else x_q.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError(f"quantize_activations: no memory for a scratch row of {k} bytes")
    return (c, inv) if x_q is None else (c, inv, x_q)


def takes_activations(x: torch.Tensor, dequantized: torch.dtype | None = None) -> bool:
    """Whether `quantize_activations` takes `x` (a real, non-empty CPU float tensor), with
    x_q in `dequantized` if given."""
    if not (supports(x) and x.numel() > 0):
        return False
    if dequantized is None:
        return True
    return f"{_SUFFIX[x.dtype]}_{_SUFFIX.get(dequantized)}" in _ACT_KERNELS


def reusable(t: torch.Tensor | None, shape, dtype, device) -> bool:
    """Whether `t` can be overwritten as a fresh (shape, dtype) tensor on `device`: nothing
    else holds it or a view of it (autograd's saved tensors included; a saved-tensor hook
    that keeps the very Python object is invisible here, so callers pin what they saved
    under one). Writing into such a buffer instead of allocating spares the page faults of
    fresh memory (measured: 11k of them per `tiny` step, about 25 ms)."""
    if t is None or t.shape != shape or t.dtype != dtype or not t.is_contiguous():
        return False
    if t.device != torch.device(device):
        return False
    if t.is_inference() != torch.is_inference_mode_enabled():
        return False  # an inference tensor serves inference mode only, and the reverse
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None or not hasattr(t, "_use_count"):
        return False
    # One reference from `t` itself and one from the storage object asked about.
    return t._use_count() == 1 and use_count(t.untyped_storage()._cdata) == 2


def _check_out(t: torch.Tensor, shape, dtype) -> None:
    # The kernels write through raw pointers: anything but a plain contiguous CPU buffer of
    # the right shape and dtype would be written out of bounds.
    if not (real(t) and t.shape == shape and t.dtype == dtype and t.is_contiguous()):
        raise ValueError(
            f"output buffer: expected a contiguous CPU {dtype} tensor of shape {tuple(shape)}, "
            f"got {type(t).__name__} {t.dtype} {tuple(t.shape)} on {t.device}"
        )


def rebuild_activations(
    codes: torch.Tensor, s: torch.Tensor, dt: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x_q = codes / s per row, rounded once to `dt`: `codes.div(s).to(dt)` for int8 codes
    (N, K) and float32 s (N, 1) (float64 s for a float64 `dt`), in one pass (into `out` if
    given)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native kernels are unavailable: {build_error()}")
    if not takes_scales(s, dt):
        raise ValueError(f"rebuild_activations: no kernel for {s.dtype} scales to {dt}")
    if codes.dtype != torch.int8 or codes.dim() != 2 or s.numel() != codes.shape[0]:
        raise ValueError(
            f"rebuild_activations takes int8 codes (N, K) and one scale per row, not codes "
            f"{codes.dtype} {tuple(codes.shape)} with scales {tuple(s.shape)}"
        )
    codes, s = codes.contiguous(), s.contiguous()
    if out is None:
        out = torch.empty(codes.shape, dtype=dt)
    _check_out(out, codes.shape, dt)
    fn = getattr(lib, f"rebuild_{_SUFFIX[dt]}")
    fn(codes.data_ptr(), codes.shape[0], codes.shape[1], s.data_ptr(), out.data_ptr(),
       torch.get_num_threads())  # fmt: skip
    return out


def quotient_mismatches() -> int:
    """How many (code, scale) pairs the x_q kernels' division-free quotient gets wrong, over
    every code -128..127 and every float32 scale in +-[1, 2) (the kernel source says why that
    covers every scale it is used for): 0, or the kernels are wrong on this machine."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native kernels are unavailable: {build_error()}")
    return int(lib.quotient_mismatches(torch.get_num_threads()))


def takes_accumulator(acc_shape, inv: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether `rescale_accumulator` takes an (N, out) int32 product with per-token scales
    `inv` (N, 1) and gamma `scale` (per tensor, or (1, out) per output channel), float32."""
    n, out = acc_shape
    return (
        real(inv)
        and real(scale)
        and inv.dtype == scale.dtype == torch.float32
        and inv.numel() == n
        and (scale.dim() == 0 or scale.numel() == out)
    )


def rescale_accumulator(acc: torch.Tensor, inv: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The integer GEMM's int32 sums (N, out) as float32 with both scales, written over `acc`:
    `acc.to(float32) * (scale / inv)` for a per-tensor gamma, `acc.to(float32) / inv * scale`
    per output channel, bit for bit (a float32 view of `acc`'s memory is returned)."""
    if acc.dtype != torch.int32 or acc.dim() != 2 or not acc.is_contiguous() or not real(acc):
        raise ValueError("rescale_accumulator takes a contiguous (N, out) int32 CPU tensor")
    if not takes_accumulator(acc.shape, inv, scale):
        raise ValueError("rescale_accumulator: float32 scales, one per row and per tensor/column")
    if scale.dim() == 0:
        row, col = (scale / inv).contiguous(), None
    else:
        row, col = inv.contiguous(), scale.contiguous()
    library().rescale_i32_f32(
        acc.data_ptr(), acc.shape[0], acc.shape[1], row.data_ptr(),
        None if col is None else col.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return acc.view(torch.float32)


def takes_scales(s: torch.Tensor, dt: torch.dtype) -> bool:
    """Whether `rebuild_activations` takes scales `s` (real, CPU) to x_q in `dt`."""
    want = torch.float64 if dt == torch.float64 else torch.float32
    return dt in _SUFFIX and real(s) and s.dtype == want


def _float32_matrix(w: torch.Tensor) -> bool:
    """A real 2-D float32 CPU tensor: what the weight kernels read."""
    return real(w) and w.dtype == torch.float32 and w.dim() == 2


def absmean_kernel(w: torch.Tensor, per_row: bool, threads: int) -> torch.Tensor | None:
    """The C kernel's gamma of a contiguous 2-D float32 CPU weight, as PyTorch's would be with
    `threads` threads (None: a case it leaves to PyTorch: fewer than 8 summed at once, or
    more threads than it sizes for)."""
    if not (_float32_matrix(w) and w.is_contiguous()):
        raise ValueError("absmean_kernel takes a contiguous 2-D float32 CPU tensor")
    rows, k = w.shape
    gamma = torch.empty((rows, 1) if per_row else (), dtype=torch.float32)
    fn = library().absmean_f32
    if fn(w.data_ptr(), rows, k, int(per_row), SCALE_EPS, threads, gamma.data_ptr()):
        return None
    return gamma


_ABSMEAN_CHECKED: dict = {}  # (shape, per row, threads) -> whether it equalled PyTorch's


def _order_probe(shape, salt: int = 0) -> torch.Tensor:
    """A float32 tensor whose sum usually depends on the order of addition: exponents over 40
    binades and fractions scattered by index hashes (`salt` shifts them; no random generator
    is touched), built a million elements at a time."""
    n = shape[0] * shape[1]
    bits = torch.empty(n, dtype=torch.int32)
    for start in range(0, n, 1 << 20):
        i = torch.arange(start, min(n, start + (1 << 20)), dtype=torch.int64) + salt * 7777
        exponent = (i * 7919 % 40 + 107) << 23  # 2^-20 .. 2^19
        bits[start : start + len(i)] = exponent | ((i * 2654435761) & 0x7FFFFF)
    return bits.view(torch.float32).reshape(shape)


def absmean(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """`quant.functional.absmean_scale(w, granularity)` (per tensor or per output channel) of a
    float32 CPU weight, bit for bit, in one pass over `w` with no |w| temporary.

    The C kernel repeats PyTorch's summation order. The first call per shape, granularity and
    thread count also runs PyTorch's on `w` and on two tensors of that shape whose sums
    depend on the order, and compares the bits (a check, not a proof); where they differ (a
    PyTorch whose sum kernel changed, an OpenMP that splits the work otherwise), PyTorch's
    own runs for that key from then on. Anything but a contiguous 2-D float32 CPU tensor
    goes to PyTorch's directly."""
    per_row, threads = granularity == "channel", torch.get_num_threads()
    key = (tuple(w.shape), per_row, threads)
    if (
        library() is None
        or not _ABSMEAN_CHECKED.get(key, True)
        or not (_float32_matrix(w) and w.is_contiguous())
    ):
        return absmean_scale(w, granularity)
    gamma = absmean_kernel(w, per_row, threads)
    if key not in _ABSMEAN_CHECKED or gamma is None:
        ref = absmean_scale(w, granularity)
        same = gamma is not None and _same_bits(gamma, ref)
        for salt in (0, 1) if same else ():
            probe = _order_probe(w.shape, salt)
            got = absmean_kernel(probe, per_row, threads)
            same = same and got is not None and _same_bits(got, absmean_scale(probe, granularity))
        _ABSMEAN_CHECKED[key] = same
        return ref
    return gamma


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def ternary_quantize(
    w: torch.Tensor, granularity: str, dt: torch.dtype, out=(None, None)
) -> tuple[Quantized, torch.Tensor]:
    """`quant.functional.ternary_quantize` of a float32 CPU weight (per tensor or per output
    channel) and its dequantized form in `dt`, the codes and `dt` values in one pass, into
    `out` = (codes, dequantized) buffers where given.

    gamma is `absmean` above: PyTorch's mean of |W| (the reference's summation order)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native ternary quantizer is unavailable: {build_error()}")
    codes = out[0] if out[0] is not None else torch.empty(w.shape, dtype=torch.int8)
    dq = out[1] if out[1] is not None else torch.empty(w.shape, dtype=dt)
    _check_out(codes, w.shape, torch.int8)
    _check_out(dq, w.shape, dt)
    per_row, threads = granularity == "channel", torch.get_num_threads()
    if (
        _ABSMEAN_CHECKED.get((tuple(w.shape), per_row, threads))  # the C sum, checked
        and _float32_matrix(w)
        and w.is_contiguous()
    ):
        # One call for gamma and the codes (the per-step path: what `absmean` below would
        # run, without its Python around it); 1 where the C sum leaves the shape to PyTorch.
        gamma = torch.empty((w.shape[0], 1) if per_row else (), dtype=torch.float32)
        fn = getattr(lib, f"absmean_ternary_{_SUFFIX[dt]}")
        if not fn(w.data_ptr(), w.shape[0], w.shape[1], int(per_row), SCALE_EPS, threads,
                  gamma.data_ptr(), codes.data_ptr(), dq.data_ptr()):  # fmt: skip
            return Quantized(codes, gamma), dq
    gamma = absmean(w, granularity)  # on w as given: the reference's summation order
    w = w.contiguous()
    rows, k = w.shape[0], w[0].numel() if w.shape[0] else 0
    fn = getattr(lib, f"ternary_{_SUFFIX[dt]}")
    fn(w.data_ptr(), rows, k, gamma.contiguous().data_ptr(), int(gamma.dim() > 0),
       codes.data_ptr(), dq.data_ptr(), threads)  # fmt: skip
    return Quantized(codes, gamma), dq


def takes_weight(w: torch.Tensor, granularity: str, dt: torch.dtype) -> bool:
    """Whether `ternary_quantize` here takes weight `w` (float32, 2-D, on CPU)."""
    return (
        _float32_matrix(w)
        and w.numel() > 0
        and granularity in ("tensor", "channel")
        and dt in _SUFFIX
    )
