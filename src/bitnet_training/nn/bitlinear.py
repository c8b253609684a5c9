"""`BitLinear`: an `nn.Linear` whose forward quantizes its weight and input activations.

The layer keeps full-precision latent weights (what the optimizer updates) and, in the
forward, uses their quantized values: ternary absmean by default, with 8-bit per-token
activations, as BitNet b1.58 trains (arXiv 2402.17764; the team's FAQ code):

    y = linear(q_a(x), q_w(W)) + b,     gradients straight through both quantizers.

Two things are done better than the reference form `x + stopgrad(q(x) - x)`, with the same
gradients (tests compare them):

* the fused autograd function saves the int8 activation codes and one scale per token for
  the backward instead of the full-precision quantized activations (4x smaller in fp32, 2x
  in bf16), and runs the forward matmul as an exact integer GEMM of the codes in float32
  (in bf16 where it measures faster than the float GEMM of the quantized values, which runs
  otherwise and in fp16: `measures_path`);
* the weight is quantized once per optimizer step, not once per micro-batch: the quantized
  weight is cached and recomputed only when the latent weight changes (its version counter).
"""

from __future__ import annotations

import dataclasses
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..quant import gemm, native, triton_kernels
from ..quant.config import QATConfig
from ..quant.fake_quant import clip_mask, fake_quantize, quantize
from ..quant.functional import Quantized, absmax_codes, dequantize
from ..quant.lsq import lsq_quantize
from ..quant.observers import make_observer
from ..quant.schedule import bits_at
from .qat_callbacks import declared_callbacks


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmul runs in: autocast's when it is on for x's device, else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def measures_path(config: QATConfig, dt: torch.dtype) -> bool:
    """Whether `QATConfig.integer_matmul` leaves the fused forward's matmul in compute dtype
    `dt` to measurement (`quant.gemm.integer_path`): `auto` in bf16, where the float GEMM of
    the quantized values x_q W_q^T (the reference's own numbers, with no per-token rescaling
    pass) runs as fast as the integer one on some machines (AMX, tensor cores) and slower on
    others (AVX-512 VNNI without AMX). `auto` runs the integer GEMM in float32 / float64,
    where it is exact and faster on every machine measured, and where `gemm` names a kernel;
    the float GEMM in float16 (no integer kernel: `quant.gemm.unavailable`); `true` the
    integer GEMM wherever a kernel can."""
    return config.integer_matmul == "auto" and config.gemm == "auto" and dt == torch.bfloat16


# The memory planner's trace (fake tensors) measures the GEMMs a real run would choose on
# probes of at most this many rows (a real run: `gemm.PROBE_ROWS`).
PLAN_PROBE_ROWS = 256


def integer_gemm(
    config: QATConfig,
    codes: torch.Tensor | None,
    n: int,
    dt: torch.dtype,
    device: torch.device,
    prepared: dict | None = None,
    code_max: int = 1,
    trains: bool = True,
) -> gemm.Prepared | None:
    """The exact integer GEMM for an (n, in) x weight-codes (out, in) product in `dt`, or None
    (the float GEMM of dequantized values runs instead).

    `config.gemm` names the kernel, or `auto` measures (`quant.gemm.choose`). `prepared`
    keeps the laid-out weight for as long as the codes live (the per-step weight cache);
    without it the weight is laid out on every call, so oneDNN's prepacking is not chosen.
    `code_max` bounds the weight codes' magnitude (1 for ternary and binary weights).
    `trains`: whether the weight gets a gradient (the integer path then rebuilds x_q in the
    backward), which the measured choice of path (`measures_path`) weighs in.
    """
    if codes is None or config.integer_matmul is False:
        return None
    # Fake tensors (the memory planner's trace): what a real run here would choose,
    # measured on real tensors, so the plan holds its weight layout and matmul.
    fake = (
        config.gemm == "auto"
        and not torch.compiler.is_compiling()  # first: the check below does not trace
        and codes.device.type == "cpu"
        and not native.real(codes)
    )
    if fake:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # measured on small probes: a plan takes seconds
            rows = min(n, PLAN_PROBE_ROWS)
            kernel = _gemm_kernel(
                config, codes.shape, rows, dt, device, True, code_max, trains, PLAN_PROBE_ROWS
            )
        if kernel == "onednn":
            kernel = "int_mm"  # oneDNN's prepacked weight has no fake kernel; as many bytes
    else:
        kernel = _gemm_kernel(
            config, codes.shape, n, dt, device, prepared is not None, code_max, trains
        )
    if kernel is None:
        return None
    if prepared is None:
        return gemm.Prepared(kernel, codes, dt)
    if (kernel, dt) not in prepared:
        spare = prepared.get("spare", {}).get((kernel, dt))
        prepared[kernel, dt] = gemm.Prepared(kernel, codes, dt, spare)
    return prepared[kernel, dt]


def _gemm_kernel(
    config, shape, n, dt, device, every_kernel, code_max, trains, probe_rows=gemm.PROBE_ROWS
) -> str | None:
    """`integer_gemm`'s kernel, or None for the float GEMM of dequantized values.
    `every_kernel`: whether oneDNN's prepacked weight may be chosen (the weight is laid out
    once per step)."""
    out_f, in_f = shape
    if measures_path(config, dt) and not integer_path(
        config, in_f, out_f, dt, device, every_kernel, code_max, trains, probe_rows
    ):
        return None
    if config.gemm != "auto":
        allowed = (config.gemm,)
        why = gemm.unavailable(config.gemm, n, in_f, out_f, dt, device, code_max)
        if why is not None:
            raise ConfigError("qat.gemm", config.gemm, f"a kernel this layer can run ({why})")
    elif torch.compiler.is_compiling():
        allowed = ("int_mm",)  # traced: nothing to measure
    else:
        allowed = gemm.KERNELS if every_kernel else ("int_mm", "float")
    return gemm.choose(n, in_f, out_f, dt, device, allowed, code_max, config.kernels != "torch")


def integer_path(
    config: QATConfig,
    in_f: int,
    out_f: int,
    dt: torch.dtype,
    device,
    every_kernel: bool = True,
    code_max: int = 1,
    trains: bool = True,
    probe_rows: int = gemm.PROBE_ROWS,
) -> bool:
    """Where `measures_path`: whether an (in_f -> out_f) layer runs the integer GEMM in `dt`,
    measured once per shape as the layer runs each form (`quant.gemm.integer_path`; decided
    by the shape, never by a call's rows)."""

    def rebuild(codes, inv):
        return _dequantized(codes, inv, dt, config.kernels)

    return gemm.integer_path(
        in_f, out_f, dt, device,
        gemm.KERNELS if every_kernel else ("int_mm", "float"),
        code_max, config.kernels != "torch",
        rebuild if trains else None,
        config.saved_activations == "codes", probe_rows,
    )  # fmt: skip


def decide_matmul(
    config: QATConfig,
    in_f: int,
    out_f: int,
    dt: torch.dtype,
    device,
    every_kernel: bool,
    code_max: int,
    trains: bool,
) -> None:
    """Measure now, not in the first forward, the GEMM a fused layer with integer weight
    codes runs in `dt` where `measures_path` (a no-op elsewhere). The layers' own
    `decide_matmul` call it; the Trainer calls those for the whole model before the first
    step."""
    a_spec = config.activation_spec()
    fused = config.fused and a_spec is not None and a_spec.symmetric
    if fused and a_spec.granularity == "token" and measures_path(config, dt):
        integer_path(config, in_f, out_f, dt, device, every_kernel, code_max, trains)


class _WeightSTE(torch.autograd.Function):
    """Forward: the (cached) quantized weight. Backward: gradient straight to the latent
    weight, masked where the quantizer clamped if a mask is given."""

    @staticmethod
    def forward(ctx, weight, w_q, mask):
        ctx.save_for_backward(mask)
        return w_q

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return (grad if mask is None else grad * mask), None, None


class _ActivationCodes(threading.local):
    """The last input quantized by a fused BitLinear, per thread.

    q_proj, k_proj and v_proj (and gate_proj, up_proj) read the same tensor: quantizing it
    once and saving one set of codes for all of them saves time and activation memory. An
    entry is reused only for the very same tensor object at the same version (an in-place
    change bumps it), bit width and inference mode (codes made under inference mode cannot
    be saved for a backward).
    """

    ref = None  # weakref to the input tensor
    key = None  # (version, bits, inference mode)
    value = None  # (codes_i8 or None where none were needed, inv, converted to float dtypes)

    @staticmethod
    def _key(x: torch.Tensor, bits: int) -> tuple:
        return x._version, bits, torch.is_inference_mode_enabled()

    def lookup(self, x: torch.Tensor, bits: int):
        if self.ref is not None and self.ref() is x and self.key == self._key(x, bits):
            return self.value
        return None

    def store(self, x: torch.Tensor, bits: int, value) -> None:
        self.ref, self.key, self.value = weakref.ref(x), self._key(x, bits), value

    def release(self) -> None:
        """Drop the float copies (x_q, codes in a float dtype) of the entry; the codes stay.
        A later lookup that needs them converts again."""
        if self.value is not None:
            self.value[2].clear()


_ACT_CODES = _ActivationCodes()


def _dequantized(codes, inv, dt, kernels: str, out=None) -> torch.Tensor:
    """x_q = codes / s, rounded once to `dt` (`codes.div(inv).to(dt)`), into `out` if given
    (a native kernel or a float32 division only)."""
    if _native(kernels, lambda: codes.numel() > 0 and native.takes_scales(inv, dt)):
        return native.rebuild_activations(codes, inv, dt, out)
    if out is not None and dt == inv.dtype:
        return torch.div(codes, inv, out=out)
    return codes.div(inv).to(dt)


class _RebuiltActivations(threading.local):
    """The quantized activations x_q = codes / s last rebuilt in a backward, per thread.

    The layers that shared one set of codes in the forward (q, k, v; gate, up) run their
    backwards one after another: they rebuild x_q once. The entry lives as long as its codes
    (a weakref callback drops it when autograd frees them).
    """

    key = None  # (id(codes), dtype)
    value = None
    spare = None  # a freed x_q's buffer, for the next rebuild

    def get(self, codes: torch.Tensor, inv: torch.Tensor, dt: torch.dtype, kernels: str):
        # The forward's x_q (the reference's own in float32).
        if torch.compiler.is_compiling():  # first: ids do not trace
            return _dequantized(codes, inv, dt, kernels)
        if self.key == (id(codes), dt) and self.ref() is codes:
            return self.value
        # The last x_q's buffer is overwritten when nothing else holds it (one spare per
        # thread, kept between steps: no fresh memory to fault in).
        spare = self.value if self.value is not None else self.spare
        self.value = self.key = self.spare = None
        out = spare if native.reusable(spare, codes.shape, dt, codes.device) else None
        del spare
        x_q = _dequantized(codes, inv, dt, kernels, out)
        self.ref, self.key, self.value = weakref.ref(codes, self._drop), (id(codes), dt), x_q
        return x_q

    def _drop(self, _ref) -> None:
        self.spare, self.key, self.value = self.value, None, None


_REBUILT = _RebuiltActivations()


def _saved_tensor_hooks_on() -> bool:
    """Whether saved-tensor hooks (`save_on_cpu`, offloading, ...) are on: they may keep the
    very tensor object autograd saves, which reference counts cannot see."""
    if torch.compiler.is_compiling():
        return False  # nothing is cached while tracing
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(True) is not None


def _native(kernels: str, applies) -> bool:
    """Whether a quantizer runs its native kernel: `qat.kernels` allows it, it is not traced
    by `torch.compile`, the kernel takes the tensor (`applies()`), and it is built."""
    return (
        kernels != "torch"
        and not torch.compiler.is_compiling()  # first: the checks below do not trace
        and applies()
        and (kernels == "native" or native.library() is not None)
    )


def _triton(kernels: str, x2: torch.Tensor, bits: int, dequantized, codes: bool) -> bool:
    """Whether the activation quantizer runs its Triton kernel (CUDA): `qat.kernels` allows
    it, it is not traced, the kernel takes the tensor, and it was checked exact on this
    device (`native` makes a kernel that cannot run or differs an error)."""
    if (
        kernels == "torch"
        or torch.compiler.is_compiling()
        or not triton_kernels.takes_activations(x2, dequantized)
    ):
        return False
    if triton_kernels.checked(x2, bits, dequantized, codes):
        return True
    if kernels == "native":
        raise ConfigError("kernels", "native", f"auto or torch here ({triton_kernels.error()})")
    return False


def _quantize_activations(
    x2: torch.Tensor, bits: int, kernel: str, dequantized=None, codes: bool = True
):
    """BitNet reference activation quantizer on (N, in): int8 codes, s = Qp / max|x| and,
    with `dequantized` a dtype, x_q = codes / s in it where the native pass writes it (else
    None: `_dequantized` computes the same values). With `codes=False` (and `dequantized`)
    the native pass writes no codes (None); the PyTorch ops always return them.

    codes = clamp(round(x * s), -Qp - 1, Qp), s per token with max|x| clamped at 1e-5. With
    s from the row's own absmax, |x * s| <= Qp, so the clamp can never act and is skipped.
    The native kernel (`kernel` "auto" where it is built, or "native") computes the same
    values in one fused pass on CPU, the Triton kernel on CUDA (`quant.triton_kernels`);
    "torch" (and under `torch.compile`) the PyTorch ops below.
    """
    codes = codes or dequantized is None
    if _native(kernel, lambda: native.takes_activations(x2, dequantized)):
        out = native.quantize_activations(x2, bits, dequantized, codes)
    elif _triton(kernel, x2, bits, dequantized, codes):
        out = triton_kernels.quantize_activations(x2, bits, dequantized, codes)
    else:
        return (*absmax_codes(x2, bits), None)
    return out if dequantized is not None else (*out, None)


class _FusedBitLinear(torch.autograd.Function):
    """linear(q_a(x), w_q) + b with per-token symmetric absmax activation quantization.

    The matmul is the exact integer GEMM `gemm_fn` of the codes, rescaled per token and per
    weight, or (None) the float GEMM of x_q = codes / s with w_q in `dt`. Saves for the
    weight gradient (`saved`, `QATConfig.saved_activations`) either int8 codes (N, in) and
    the per-token scales s (N, 1), from which the backward rebuilds x_q, or x_q itself in
    `dt` (in bf16 / fp16 by default, where the float GEMM already made it: no rebuild, and
    then the codes are not even written). The activation gradient passes straight through
    (an absmax grid never clamps), the weight gradient goes to the latent weight (masked by
    `w_mask` for the clipped STE). In float32 the gradients equal the reference form's
    exactly; under bf16 autocast up to bf16 rounding.
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, w_q, gemm_fn, w_scale_row, w_mask, bits, act_kernel, dt, saved
    ):
        in_f = x.shape[-1]
        lead = x.shape[:-1]
        # What the backward keeps (QATConfig.saved_activations): x_q itself, or its codes.
        values = saved == "values" or (
            saved == "auto" and gemm_fn is None and dt in (torch.bfloat16, torch.float16)
        )
        # Only the weight gradient reads them: a frozen weight (a PEFT base) keeps none.
        keep = ctx.needs_input_grad[1]
        need_codes = gemm_fn is not None or (keep and not values)
        with torch.autocast(x.device.type, enabled=False):
            # Inference tensors keep no version counter, so they cannot be shared safely.
            share = not torch.compiler.is_compiling() and not x.is_inference()
            shared = _ACT_CODES.lookup(x, bits) if share else None
            if (
                shared is not None
                and shared[0] is None
                and (need_codes or ("x_q", dt) not in shared[2])
            ):
                shared = None  # no codes kept, or x_q released: quantized again
            if shared is not None:
                codes_i8, inv, converted = shared
            else:
                # With no integer GEMM, x_q comes out of the native quantizer's own pass
                # (alone, when no codes are needed).
                codes_i8, inv, x_q = _quantize_activations(
                    x.reshape(-1, in_f), bits, act_kernel, None if gemm_fn else dt, need_codes
                )
                # What the layers sharing the codes also use: ("codes", dt), the codes in
                # dt for the `float` GEMM kernel; ("x_q", dt), the quantized activations.
                converted = {} if x_q is None else {("x_q", dt): x_q}
                if share:
                    _ACT_CODES.store(x, bits, (codes_i8, inv, converted))
            if gemm_fn is not None:
                # Exact integer GEMM (rounded once to dt), then both scales:
                # y = (x_q W_q^T) * gamma / s.
                a = codes_i8
                if gemm_fn.kernel == "float":  # converted once for the layers sharing codes
                    if ("codes", dt) not in converted:
                        converted["codes", dt] = codes_i8.to(dt)
                    a = converted["codes", dt]
                y = gemm_fn.scaled(a, inv, w_scale_row, _native(act_kernel, lambda: True))
                if bias is not None:
                    y = y.add_(bias.to(dt))
            else:
                if not torch.compiler.is_compiling():
                    gemm.note_dequantized(x.device, dt)  # for the run's summary
                if ("x_q", dt) not in converted:
                    converted["x_q", dt] = _dequantized(codes_i8, inv, dt, act_kernel)
                y = F.linear(converted["x_q", dt], w_q, None if bias is None else bias.to(dt))
            if keep and values and ("x_q", dt) not in converted:  # after an integer GEMM
                converted["x_q", dt] = _dequantized(codes_i8, inv, dt, act_kernel)
        if not keep:
            ctx.save_for_backward(None, None, w_q, w_mask)
        elif values:
            ctx.save_for_backward(converted["x_q", dt], None, w_q, w_mask)
        else:
            ctx.save_for_backward(codes_i8, inv, w_q, w_mask)
        ctx.meta = (x.dtype, weight.dtype, None if bias is None else bias.dtype, dt, lead)
        ctx.kernels = act_kernel
        # (N, out): the caller restores the leading dims. A view made here would forbid
        # in-place updates of the output (as AdaLoRA's `result += ...` does).
        return y

    @staticmethod
    def backward(ctx, grad_out):
        if not torch.compiler.is_compiling():  # (nothing is shared while tracing)
            # The forward is over: the shared x_q (or codes in dt) need not outlive it.
            _ACT_CODES.release()
        activations, inv, w_q, w_mask = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype, dt, lead = ctx.meta
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dt)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ w_q).reshape(*lead, w_q.shape[1]).to(x_dtype)
        if ctx.needs_input_grad[1]:
            # x_q as saved, or rebuilt from the codes (inv: their scales).
            x_q = activations if inv is None else _REBUILT.get(activations, inv, dt, ctx.kernels)
            grad_w = (g.t() @ x_q).to(w_dtype)
            if w_mask is not None:
                grad_w = grad_w * w_mask
        if b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


class BitLinear(nn.Linear):
    """`nn.Linear` with quantization-aware training: quantized weights and activations.

    Args:
        in_features, out_features, bias, device, dtype: as `nn.Linear`.
        config: a `QATConfig` (default: BitNet b1.58, ternary weights, 8-bit activations).

    Input (..., in_features), output (..., out_features). The latent `weight` stays full
    precision; `state_dict` keys equal `nn.Linear`'s (plus `norm.weight` with `input_norm`).
    The output is the same in `train()` and `eval()`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        config: QATConfig | None = None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup(config)

    def _setup(self, config: QATConfig | None) -> None:
        self.config = config or QATConfig()
        gs = self.config.group_size
        if gs is not None and self.in_features % gs:
            raise ConfigError(
                "qat.group_size",
                gs,
                f"a divisor of every quantized layer's in_features "
                f"(this one has {self.in_features})",
            )
        self.norm = None
        if self.config.input_norm:
            from .norm import RMSNorm

            self.norm = RMSNorm(
                self.in_features, device=self.weight.device, dtype=self.weight.dtype
            )
        self._cache = None
        # False where the weight's storage is refilled without a version bump (FSDP2's
        # all-gather), so the cache key could not see new values.
        self.cache_weight = True
        # Progressive quantization state, set per step by `set_progress` (a QATControl
        # callback calls it): blend strengths lambda and the weight bit width of the stage.
        self.weight_blend = 1.0
        self.activation_blend = 1.0
        self.stage_bits = None  # None: config.weight_bits
        # Static activation quantization: an observer (its buffers travel in state_dict and
        # checkpoints), optionally an LSQ step size; `track_clipping` asks the next forward
        # to record the share of clamped activations in `last_clip_rate`.
        self.act_observer = None
        self.track_clipping, self.last_clip_rate = False, None
        cfg = self.config
        if cfg.activation_observer is not None:
            channels = self.in_features if cfg.activation_per_channel else None
            self.act_observer = make_observer(
                cfg.activation_observer, channels, cfg.observer_momentum, cfg.observer_percentile
            )
            self.act_observer.register_buffer(
                "remaining", torch.tensor(cfg.calibration_samples, dtype=torch.int64)
            )
            self.act_observer.to(self.weight.device)
            if cfg.learnable_scales:
                shape = (self.in_features,) if channels else ()
                self.act_scale = nn.Parameter(torch.ones(shape, device=self.weight.device))
                self.register_buffer("act_scale_ready", torch.zeros((), dtype=torch.bool))

    def trainer_callbacks(self) -> list:
        """The callbacks this layer's training needs (the step clock, latent clipping,
        linear-only weight decay): the `Trainer` collects them from `model.modules()`."""
        return declared_callbacks(self)

    def set_progress(self, step: int, steps_per_epoch: float = 1.0) -> None:
        """Set lambda (weights, activations) and the bit stage for optimizer step `step`
        from the config's schedules and stages (pure functions of the step)."""
        cfg = self.config
        ws, as_ = cfg.weight_schedule, cfg.activation_schedule
        self.weight_blend = ws.resolve(steps_per_epoch).value(step) if ws else 1.0
        self.activation_blend = as_.resolve(steps_per_epoch).value(step) if as_ else 1.0
        bits = bits_at(cfg.weight_bit_stages, step, cfg.weight_bits)
        self.stage_bits = None if bits == cfg.weight_bits else bits
        until = cfg.calibration_until
        if (
            self.act_observer is not None
            and cfg.online_calibration
            and step % cfg.calibration_frequency == 0
            and (until is None or step < until)
        ):
            self.act_observer.remaining.fill_(cfg.calibration_samples)  # open a window

    def _static_activations(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        """Fake-quantize `x` with the observer's fixed ranges (updating them first while a
        calibration window is open), or with the LSQ step size. Gradients: clipped STE
        (PyTorch's fake_quantize) or LSQ's."""
        cfg, obs = self.config, self.act_observer
        left = int(obs.remaining)
        if (self.training and left > 0) or not obs.initialized:
            obs(x)
            obs.remaining.fill_(max(0, left - (x.shape[0] if x.ndim > 1 else 1)))
        symmetric = cfg.activation_symmetric
        xf = x.float()
        if cfg.learnable_scales:
            if not bool(self.act_scale_ready):
                with torch.no_grad():
                    self.act_scale.copy_(obs.qparams(bits, True)[0])
                    self.act_scale_ready.fill_(True)
            out = lsq_quantize(xf, self.act_scale, bits)
            scale, zp = self.act_scale.detach(), torch.zeros((), dtype=torch.int32)
        else:
            scale, zp = obs.qparams(bits, symmetric)
            qmin, qmax = (
                (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
            )
            if obs.per_channel:
                out = torch.fake_quantize_per_channel_affine(xf, scale, zp, xf.ndim - 1, qmin, qmax)
            else:
                out = torch.fake_quantize_per_tensor_affine(xf, scale, zp, qmin, qmax)
        if self.track_clipping:
            with torch.no_grad():
                qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
                v = (xf / scale).round() + zp
                lo = -qn if symmetric else 0
                self.last_clip_rate = ((v < lo) | (v > qp)).float().mean()
        return out.to(x.dtype)

    def weight_spec(self):
        """The weight quantizer in effect now (the config's, at the current stage's bits)."""
        spec = self.config.weight_spec()
        if spec is not None and self.stage_bits is not None:
            symmetric = spec.symmetric or self.stage_bits in (1, 1.58)
            spec = dataclasses.replace(spec, bits=self.stage_bits, symmetric=symmetric)
        return spec

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QATConfig | None = None) -> BitLinear:
        """A BitLinear sharing `linear`'s parameters (same tensors, device and dtype), so an
        optimizer built on the original parameters keeps working."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._setup(config)
        layer.train(linear.training)
        return layer

    # -- weight quantization, once per optimizer step -------------------------------------

    def _quantize_weight(self, dt: torch.dtype):
        """(w_q in dt, clip mask or None, Quantized or None, the cache entry or None).

        The entry holds what the integer GEMM needs: "codes" (out, in) int8 and "scale_row"
        for symmetric per-tensor / per-channel weights, and "prepared": the codes laid out
        per GEMM kernel (`integer_gemm`), only while the entry is cached."""
        spec = self.weight_spec()
        w = self.weight
        if spec is None:
            return w.detach().to(dt), None, None, None
        cacheable = (
            self.config.cache_quantized_weight
            and self.cache_weight
            and not torch.compiler.is_compiling()
            and not w.is_inference()  # no version counter to key the cache on
        )
        # Tensors made under inference mode cannot be saved for a backward: an entry made
        # there serves only inference-mode forwards. (Never traced: not cacheable then.)
        key = None
        if cacheable:
            inference = torch.is_inference_mode_enabled()
            key = (w._version, w.data_ptr(), w.dtype, w.device, spec, inference)
        if cacheable and self._cache is not None and self._cache[0] == key:
            entry = self._cache[1]
        else:
            # FSDP2's packed ternary all-gather hands over the codes and scale themselves.
            gathered = getattr(w, "quantized", None)
            dq, last = None, self._cache[1] if self._cache is not None else {}
            if gathered is not None:
                q = gathered()
            elif spec.bits == 1.58 and _native(
                self.config.kernels, lambda: native.takes_weight(w, spec.granularity, dt)
            ):
                # Last step's buffers are overwritten where nothing holds them any more.
                codes = last.get("q").codes if last.get("q") is not None else None
                old = (codes, last.get("dq", {}).get(dt))
                fits = not last.get("pinned")
                fits = fits and native.reusable(old[0], w.shape, torch.int8, w.device)
                fits = fits and native.reusable(old[1], w.shape, dt, w.device)
                q, dq = native.ternary_quantize(
                    w.detach(), spec.granularity, dt, old if fits else (None, None)
                )
            else:
                q = quantize(w.detach(), spec)
            entry = {"q": q, "dq": {dt: dq} if dq is not None else {}}
            # The last step's laid-out weights, whose buffers `integer_gemm` may reuse
            # (oneDNN's prepacked weights cannot be written into: not kept).
            last_prepared = last.get("prepared") or {}
            spare = {k: v for k, v in last_prepared.items() if k[0] in ("int_mm", "float")}
            entry["prepared"] = {"spare": spare} if cacheable else None
            entry["mask"] = clip_mask(w.detach(), q, spec) if spec.ste == "clipped" else None
            if q.zero_point is None and spec.granularity in ("tensor", "channel"):
                entry["codes"] = q.codes
                entry["scale_row"] = q.scale.reshape(1, -1) if q.scale.dim() else q.scale
                entry["code_max"] = 1 if spec.bits in (1, 1.58) else 2 ** (int(spec.bits) - 1)
            if cacheable:
                self._cache = (key, entry)
        if dt not in entry["dq"]:
            entry["dq"][dt] = dequantize(entry["q"], torch.float32).to(dt)
        return entry["dq"][dt], entry["mask"], entry["q"], entry

    def _perturb_weight(self, w_q: torch.Tensor, q: Quantized, dt: torch.dtype) -> torch.Tensor:
        """The weight the forward uses when quantization is blended in, partial (Quant-Noise)
        or noisy: w + lambda * mask * (q(w) - w) [+ noise_factor * step * U(-1/2, 1/2)].
        Randomness comes from torch's global generator (seeded, saved in checkpoints)."""
        cfg = self.config
        w = self.weight.detach().float()
        delta = w_q.float() - w
        if self.training and cfg.quant_noise is not None:
            # Quant-Noise (arXiv 2004.07320): quantize a random fraction p of blocks of
            # `block` consecutive input elements per row; the rest stay full precision.
            block = cfg.quant_noise_block_size
            n_blocks = -(-w.shape[1] // block)
            chosen = torch.rand(w.shape[0], n_blocks, device=w.device) < cfg.quant_noise
            delta = delta * chosen.repeat_interleave(block, dim=1)[:, : w.shape[1]]
        w_eff = w + self.weight_blend * delta
        if self.training and cfg.noise_factor > 0:
            # One quantization step per element: the scale broadcast to the weight's shape.
            step = dequantize(Quantized(torch.ones_like(q.codes), q.scale, None), torch.float32)
            w_eff = w_eff + cfg.noise_factor * step * (torch.rand_like(w) - 0.5)
        return w_eff.to(dt)

    def _weight_is_perturbed(self) -> bool:
        cfg = self.config
        return self.weight_blend < 1.0 or (
            self.training and (cfg.quant_noise is not None or cfg.noise_factor > 0)
        )

    def decide_matmul(self, dt: torch.dtype) -> None:
        """Measure now which GEMM this layer runs in compute dtype `dt`, where
        `integer_matmul: auto` leaves it to measurement (`measures_path`); else in its
        first forward."""
        spec = self.weight_spec()
        if spec is None or spec.granularity not in ("tensor", "channel") or not spec.symmetric:
            return  # no integer codes: the float GEMM
        code_max = 1 if spec.bits in (1, 1.58) else 2 ** (int(spec.bits) - 1)
        decide_matmul(
            self.config, self.in_features, self.out_features, dt, self.weight.device, True,
            code_max, self.weight.requires_grad,
        )  # fmt: skip

    def quantized_weight(self) -> Quantized:
        """The weight's integer codes and scale(s), as export stores them: (codes, scale[, zp])."""
        spec = (
            self.weight_spec() or self.config.replace(enable_weight_quantization=True).weight_spec()
        )
        return quantize(self.weight.detach(), spec)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        cfg = self.config
        dt = _compute_dtype(x)
        w_q, mask, q, entry = self._quantize_weight(dt)
        if entry is not None and _saved_tensor_hooks_on():
            entry["pinned"] = True  # a hook may keep w_q itself: never overwrite it
        integer = q is not None and "codes" in entry
        if q is not None and self._weight_is_perturbed():
            w_q, integer = self._perturb_weight(w_q, q, dt), False  # no longer integer
        a_spec = cfg.activation_spec()
        blend_a = a_spec is not None and self.activation_blend < 1.0
        static_a = a_spec is not None and self.act_observer is not None
        if (
            cfg.fused
            and not hasattr(self.weight, "placements")  # a DTensor (tensor parallel): unfused
            and not blend_a
            and not static_a
            and a_spec is not None
            and a_spec.symmetric
            and a_spec.granularity == "token"
        ):
            run, scale_row = None, None
            if integer:
                n = x.numel() // x.shape[-1] if x.shape[-1] else 0
                run = integer_gemm(
                    cfg, entry["codes"], n, dt, x.device, entry["prepared"], entry["code_max"],
                    self.weight.requires_grad,
                )  # fmt: skip
                scale_row = entry["scale_row"]
            y = _FusedBitLinear.apply(
                x, self.weight, self.bias, w_q, run, scale_row, mask,
                int(a_spec.bits), cfg.kernels, dt, cfg.saved_activations,
            )  # fmt: skip
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
        if static_a:
            x_q = self._static_activations(x, int(a_spec.bits))
            x = x + self.activation_blend * (x_q - x) if blend_a else x_q
        elif blend_a:  # progressive: x + lambda * stopgrad(q(x) - x)
            x = x + self.activation_blend * (fake_quantize(x.detach(), a_spec) - x.detach())
        elif a_spec is not None:
            x = fake_quantize(x, a_spec)
        w = self.weight if q is None else _WeightSTE.apply(self.weight, w_q, mask)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        c = self.config
        a = c.activation_bits if c.enable_activation_quantization else None
        spec = self.weight_spec()
        w = spec.bits if spec is not None else None
        return f"{super().extra_repr()}, weight_bits={w}, activation_bits={a}"
