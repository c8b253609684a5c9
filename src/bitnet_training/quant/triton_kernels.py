"""BitLinear's fused activation quantizer on CUDA: one Triton kernel per call.

The PyTorch composition of the per-token absmax quantizer (widen, abs, amax, clamp,
reciprocal, multiply, round, cast; then codes / s and a cast for x_q) launches six to eight
kernels, each a pass over the activations in GPU memory. This kernel reads each token's row
twice (its absmax, then its codes while the row is still in L1 / L2) and writes the int8
codes, the scale s = (1 / max|x|) * Qp and, if asked, x_q = dt(codes / s) in the same pass:

    m = max(|x|) clamped below at eps (NaN if the row holds one);  s = (1 / m) * Qp
    codes = round_half_even(x * s)  (0 where x * s is NaN);  x_q = dt(codes / s)

with the eager composition's own arithmetic (`Qp / t` in PyTorch is `t.reciprocal() * Qp`),
IEEE division (`div_rn`), round half to even by adding and subtracting 1.5 * 2^23 (exact for
|x * s| <= Qp + 1 < 2^22) and float32 -> bfloat16 rounded to nearest even in integer
arithmetic (NaN -> 0x7FC0), so that the same code gives the same bits on a GPU and in
Triton's CPU interpreter (`TRITON_INTERPRET=1`), where the tests run it.

The first call per (device, dtypes, bits, block) also checks the kernel against the
PyTorch composition on the device itself, on a probe with ties, zeros, NaN and infinity
rows and the call's own rows: a kernel that differs by one bit is never used (`auto` falls
back to the PyTorch ops with a warning; `QATConfig(kernels="native")` raises).

Triton is imported only here, on first use: it ships with PyTorch's CUDA builds on Linux.
"""

from __future__ import annotations

import threading
import warnings

import torch

from .functional import SCALE_EPS, absmax_codes

_IN = (torch.float32, torch.bfloat16, torch.float16)
_OUT = _IN
DEVICES = ("cuda",)  # where it runs (the tests add "cpu" under the interpreter)
MAX_BLOCK = 8192  # elements of a row held at once; longer rows loop over blocks
# No contraction of x * s + 1.5 * 2^23 into one fused multiply-add (Triton's default), which
# rounds once where PyTorch rounds twice: codes one off near ties (the C kernels are built
# with -ffp-contract=off for the same reason). A test compiles the kernel for sm_90 and
# reads the PTX.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}

_lock = threading.Lock()
_state: dict = {}  # "kernel": the jit function or None; "error": why it is None
_CHECKED: dict[tuple, bool] = {}  # (device, in dtype, out dtype, codes, bits, block): exact


def _define():
    """The kernels (imported on first use: importing Triton is not free)."""
    from . import _triton_act_quant as k

    return {"act_quant": k.act_quant, "to_bf16": k.to_bf16}


def kernel(name: str = "act_quant"):
    """A jit-compiled kernel (`act_quant`, or `to_bf16`: its float32 -> bfloat16 rounding
    alone), defined on first call; None if Triton cannot be imported (`error()` says why)."""
    if "kernel" not in _state:
        with _lock:
            if "kernel" not in _state:
                try:
                    _state["kernel"], _state["error"] = _define(), None
                except Exception as e:  # ImportError, or a Triton too old for this code
                    _state["kernel"], _state["error"] = None, f"{type(e).__name__}: {e}"
    return None if _state["kernel"] is None else _state["kernel"][name]


def error() -> str | None:
    """Why the Triton kernel is unavailable (None: it is available)."""
    kernel()
    return _state.get("error")


def takes_activations(x: torch.Tensor, dequantized: torch.dtype | None = None) -> bool:
    """Whether `quantize_activations` takes `x`: a plain non-empty (N, K) CUDA tensor in
    float32 / bf16 / fp16, with x_q in one of those, outside any fake-tensor mode (the
    memory planner's trace)."""
    return (
        type(x) in (torch.Tensor, torch.nn.Parameter)
        and x.device.type in DEVICES
        and x.dtype in _IN
        and (dequantized is None or dequantized in _OUT)
        and x.dim() == 2
        and x.numel() > 0
        and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)  # vmap / grad: no pointer
    )


def _block(k: int) -> int:
    return min(MAX_BLOCK, 1 << max(0, k - 1).bit_length())


def _launch(x2, bits, dequantized, codes):
    if x2.device.type == "cuda":  # Triton launches on the current device
        with torch.cuda.device(x2.device):
            return _launch_here(x2, bits, dequantized, codes)
    return _launch_here(x2, bits, dequantized, codes)


def _launch_here(x2, bits, dequantized, codes):
    if x2.data_ptr() % 16:  # Triton compiles for 16-byte aligned inputs: the probe's case
        x2 = x2.clone()
    n, k = x2.shape
    c = torch.empty((n, k), dtype=torch.int8, device=x2.device) if codes else None
    inv = torch.empty((n, 1), dtype=torch.float32, device=x2.device)
    x_q = None if dequantized is None else torch.empty((n, k), dtype=dequantized, device=x2.device)
    bf16 = dequantized == torch.bfloat16
    block = _block(k)
    kernel()[(n,)](
        x2, inv if c is None else c, inv,
        inv if x_q is None else (x_q.view(torch.int16) if bf16 else x_q),
        k, float(2 ** (bits - 1) - 1), SCALE_EPS,
        WRITE_CODES=codes, WRITE_XQ=x_q is not None, XQ_BF16=bf16, BLOCK=block,
        num_warps=min(16, max(1, block // 256)), **LAUNCH_OPTIONS,
    )  # fmt: skip
    return c, inv, x_q


def to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """float32 `x` to bfloat16 with the kernel's own rounding (what x_q in bfloat16 gets)."""
    if kernel() is None:
        raise RuntimeError(f"the Triton kernels are unavailable: {error()}")
    if x.dtype != torch.float32:
        raise ValueError(f"to_bfloat16 takes float32, not {x.dtype}")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.int16, device=x.device)
    grid = (-(-x.numel() // 1024),)
    kernel("to_bf16")[grid](x, out, x.numel(), BLOCK=1024, **LAUNCH_OPTIONS)
    return out.view(torch.bfloat16)


def reference(x2: torch.Tensor, bits: int, dequantized: torch.dtype | None = None):
    """The PyTorch composition the kernel replaces: (codes, s, x_q or None)."""
    codes, inv = absmax_codes(x2, bits)
    return codes, inv, None if dequantized is None else codes.div(inv).to(dequantized)


def _probe(x2: torch.Tensor) -> torch.Tensor:
    """Rows that exercise every branch and rounding, then up to 64 of the call's own rows."""
    k = x2.shape[1]
    g = torch.Generator(device="cpu").manual_seed(0)
    # Near ties: a row of max m holding m / 2 puts m/2 * s within rounding of 63.5 where
    # s = (1 / m) * 127 is inexact, so one rounding too few or too many moves its code
    # (m = 154 * 2^-13: PyTorch 64, a fused multiply-add 63). 24 such m of 8 significant
    # bits in [2^-7, 2^7) (exact in bf16 and fp16), and their negatives.
    i = torch.arange(24)
    m = ((128 + 5.33 * i).floor() * 2.0 ** (i % 14 - 14)).tolist()
    near = [torch.tensor([v, v / 2, -v / 2, v / 2]).repeat(-(-k // 4))[:k] for v in m]
    near += [-r for r in near]
    rows = [
        torch.arange(k, dtype=torch.float32).remainder_(254).sub_(126.5),  # x * s = j + 0.5
        torch.zeros(k),
        torch.randn(k, generator=g) * 1e-7,  # below eps
        torch.randn(k, generator=g) * 3e4,
        torch.randn(k, generator=g),
        torch.randn(k, generator=g),
    ]
    rows[0][0] = 127.0  # max |x| = 127: s = (1 / 127) * 127 = 1 exactly, so ties are ties
    rows[4][k // 2] = float("nan")
    rows[5][k - 1] = float("-inf")
    probe = torch.stack(rows + near).to(device=x2.device, dtype=x2.dtype)
    return torch.cat([probe, x2[:64]])


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():  # NaN payloads may differ; every other bit may not (-0.0)
        nan, bits = a.isnan(), {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(bits), b[~nan].view(bits))
    return torch.equal(a, b)


def checked(x2: torch.Tensor, bits: int, dequantized, codes: bool) -> bool:
    """Whether the kernel is available and gives the PyTorch composition's bits on this
    device for these dtypes (checked on the first call, then cached)."""
    if kernel() is None:
        return False
    k = x2.shape[1]  # what Triton specializes on: k % 16 == 0, k == 1; and the block
    key = (x2.device, x2.dtype, dequantized, codes, bits, _block(k), k % 16 == 0, k == 1)
    if key not in _CHECKED and x2.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # no check inside a CUDA graph's capture: PyTorch's ops, this once
    if key not in _CHECKED:
        probe = _probe(x2)
        try:
            got = _launch(probe, bits, dequantized, codes)
        except Exception as e:  # a compile or launch failure on this device
            _state["error"] = f"{type(e).__name__}: {e}"
            _CHECKED[key] = False
        else:
            want = reference(probe, bits, dequantized)
            _CHECKED[key] = all(
                _same(g, w) for g, w in zip(got, want, strict=True) if g is not None
            )
            if not _CHECKED[key]:
                _state["error"] = (
                    f"the Triton activation quantizer differs from PyTorch's ops on "
                    f"{x2.device} ({x2.dtype} -> {dequantized})"
                )
        if not _CHECKED[key]:
            warnings.warn(f"{_state['error']}: using PyTorch's ops", stacklevel=2)
    return _CHECKED[key]


def checks() -> dict[str, bool]:
    """The device checks run so far in this process, 'device input -> x_q (bits)': whether
    the kernel matched PyTorch's ops (and so ran) there."""
    out = {}
    for (dev, dt, dq, _codes, bits, *_), ok in _CHECKED.items():
        name = str(dq).removeprefix("torch.") if dq is not None else "codes"
        key = f"{dev} {str(dt).removeprefix('torch.')} -> {name} ({bits} bits)"
        out[key] = out.get(key, True) and ok
    return out


def quantize_activations(
    x2: torch.Tensor, bits: int, dequantized: torch.dtype | None = None, codes: bool = True
) -> tuple[torch.Tensor | None, ...]:
    """BitNet's per-token absmax quantizer of (N, K) `x2` in one kernel: int8 codes (N, K)
    and s = Qp / max|x| (N, 1) in float32, as `native.quantize_activations` returns them
    (same values as the PyTorch composition); with `dequantized` a dtype also x_q in it,
    (codes, s, x_q), and with `codes=False` the codes are not written (None)."""
    if kernel() is None:
        raise RuntimeError(f"the Triton activation quantizer is unavailable: {error()}")
    if not codes and dequantized is None:
        raise ValueError("quantize_activations: codes=False needs a dequantized dtype")
    if not takes_activations(x2, dequantized):
        raise ValueError(
            f"quantize_activations: no Triton kernel for {x2.dtype} {tuple(x2.shape)} on "
            f"{x2.device} with x_q in {dequantized}"
        )
    c, inv, x_q = _launch(x2.contiguous(), bits, dequantized, codes)
    return (c, inv) if x_q is None else (c, inv, x_q)
