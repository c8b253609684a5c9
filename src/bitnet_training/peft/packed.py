"""The frozen base of 1.58-bit QLoRA: `BitLinear` layers stored as packed ternary codes.

`pack_model(model)` replaces every `BitLinear` by a `PackedTernaryLinear` holding only what
the quantized forward needs: the ternary codes packed 4 per byte ("2bit", 2 bits per weight)
or 5 per byte ("base3", 1.6 bits), the absmean scale(s) as float32, an optional frozen bias
and the `QATConfig` (for the activation quantizer). The forward unpacks the codes on the fly
and computes exactly what `BitLinear.eval()` computes, with the same functions
(`nn/bitlinear.py`'s fused autograd function, `quant`'s quantizers), so LoRA on top trains
against the same base outputs as on the unpacked model while the latent weights (16 or 32
bits per weight) are gone. In training the backward rebuilds the dequantized weight from
the packed codes instead of keeping one per layer alive between forward and backward.

peft interop: `register_with_peft(config)` (or `lora_config(**kw)`) maps
`PackedTernaryLinear` to `PackedLoraLinear`, peft's own LoRA `Linear` with merging refused,
through peft's custom-module hook (`LoraConfig._register_custom_module`). The layer exposes
its packed codes as `qweight`, the name peft reads a quantized base's device from (GPTQ's).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitNetError
from ..nn.bitlinear import BitLinear, _compute_dtype, _FusedBitLinear, decide_matmul, integer_gemm
from ..quant.config import QATConfig
from ..quant.fake_quant import fake_quantize
from ..quant.functional import Quantized, dequantize
from ..quant.packing import pack_2bit, pack_base3, unpack_2bit, unpack_base3

# name -> (pack, unpack, codes per byte)
PACKINGS = {"2bit": (pack_2bit, unpack_2bit, 4), "base3": (pack_base3, unpack_base3, 5)}


def _check_packing(packing: str) -> None:
    if packing not in PACKINGS:
        raise BitNetError(f"packing={packing!r} is invalid: expected one of {', '.join(PACKINGS)}")


def _scale_shape(granularity: str, out_f: int, in_f: int, group_size: int | None) -> tuple:
    # The shapes `quant.functional.ternary_quantize` returns per granularity.
    if granularity == "tensor":
        return ()
    if granularity == "channel":
        return (out_f, 1)
    return (out_f, in_f // group_size)


class PackedTernaryLinear(nn.Module):
    """A frozen ternary linear layer stored packed: y = BitLinear.eval()(x), no parameters.

    Args:
        in_features, out_features: the layer's shape; the input is (..., in_features), the
            output (..., out_features).
        packing: "2bit" (4 codes per byte) or "base3" (5 codes per byte, 1.6 bits).
        granularity: "tensor", "channel" or "group": one absmean scale per tensor, per output
            row, or per `group_size` consecutive inputs of a row.
        group_size: inputs per scale with granularity "group".
        bias: whether a (frozen) bias is stored.
        config: the source layer's `QATConfig`; its activation settings drive the forward.

    Buffers: `qweight` uint8 (ceil(out * in / codes per byte),), the row-major codes packed;
    `weight_scale` float32 of shape () / (out, 1) / (out, in / group_size), the absmean
    gamma (weights = codes * gamma); `bias` (out,) or None. With `norm_placement: input` a
    frozen copy of the layer's RMSNorm. Build it with `from_bitlinear`; the constructor
    makes zeroed buffers for loading a state_dict. Casting the module (`.to(bfloat16)`) rounds
    the scales like any float buffer; the forward reads them as float32.
    """

    # The packed base is rebuilt from its source (quantize, pack): adapter checkpoints
    # (`CheckpointIO(trainable_only=True)`) leave these out.
    frozen_buffers = ("qweight", "weight_scale", "bias")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        packing: str = "2bit",
        granularity: str = "tensor",
        group_size: int | None = None,
        bias: bool = False,
        config: QATConfig | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_packing(packing)
        if granularity not in ("tensor", "channel", "group"):
            raise BitNetError(
                f"granularity={granularity!r} is invalid: expected tensor, channel or group"
            )
        if (granularity == "group") != (group_size is not None) or (
            group_size is not None and in_features % group_size
        ):
            raise BitNetError(
                f"group_size={group_size!r} is invalid: a divisor of in_features "
                f"({in_features}) with granularity 'group', else None"
            )
        self.in_features, self.out_features = in_features, out_features
        self.packing, self.granularity, self.group_size = packing, granularity, group_size
        self.config = config or QATConfig()
        per_byte = PACKINGS[packing][2]
        nbytes = math.ceil(in_features * out_features / per_byte)
        self.register_buffer("qweight", torch.zeros(nbytes, dtype=torch.uint8, device=device))
        shape = _scale_shape(granularity, out_features, in_features, group_size)
        self.register_buffer("weight_scale", torch.ones(shape, device=device))
        b = torch.zeros(out_features, device=device, dtype=dtype) if bias else None
        self.register_buffer("bias", b)
        self.norm = None

    @classmethod
    def from_bitlinear(cls, layer: BitLinear, packing: str = "2bit") -> PackedTernaryLinear:
        """The packed, frozen equivalent of `layer` as `layer.eval()` computes it now.

        Takes the codes and scale(s) of `layer.quantized_weight()` (the latent weight is not
        kept), a detached copy of its bias, its `QATConfig`, and with `norm_placement: input`
        a frozen copy of its RMSNorm. `layer` is not modified. Refused in one line: weights
        that are not ternary now (weight_bits or the current bit stage other than 1.58,
        weight quantization off, progressive blending not finished) and static activation
        observers (their calibrated ranges are not carried).
        """
        _check_packing(packing)
        if not isinstance(layer, BitLinear):
            raise BitNetError(
                f"PackedTernaryLinear.from_bitlinear needs a BitLinear, got {type(layer).__name__}"
            )
        spec, cfg = layer.weight_spec(), layer.config
        if spec is None or spec.bits != 1.58:
            bits = None if spec is None else spec.bits
            raise BitNetError(
                f"cannot pack a BitLinear with weight_bits={bits}: only ternary (1.58-bit) "
                "weights pack into 2-bit or base-3 codes"
            )
        blends = {"weight": layer.weight_blend, "activation": layer.activation_blend}
        for what, blend in blends.items():
            if blend < 1.0:
                raise BitNetError(
                    f"cannot pack a BitLinear whose {what} quantization is blended in "
                    f"(lambda={blend}): finish the progressive schedule first"
                )
        if layer.act_observer is not None:
            raise BitNetError(
                f"cannot pack a BitLinear with qat.activation_observer="
                f"{cfg.activation_observer!r}: only dynamic per-token activations are supported"
            )
        q = layer.quantized_weight()
        w = layer.weight
        packed = cls(
            layer.in_features,
            layer.out_features,
            packing,
            spec.granularity,
            spec.group_size,
            bias=layer.bias is not None,
            config=cfg,
            device=w.device,
            dtype=None if layer.bias is None else layer.bias.dtype,
        )
        packed.qweight = PACKINGS[packing][0](q.codes)
        packed.weight_scale = q.scale.detach().clone()
        if layer.bias is not None:
            packed.bias = layer.bias.detach().clone()
        if layer.norm is not None:
            packed.norm = copy.deepcopy(layer.norm).requires_grad_(False)
        packed.train(layer.training)
        return packed

    def codes(self) -> torch.Tensor:
        """The ternary codes, int8 (out_features, in_features), unpacked from `qweight`."""
        n = self.in_features * self.out_features
        # No value check: the bytes were packed by pack_* (a sync per forward otherwise).
        flat = PACKINGS[self.packing][1](self.qweight, n, check=False)
        return flat.view(self.out_features, self.in_features)

    def _weight(self, dt: torch.dtype, codes: torch.Tensor | None = None) -> torch.Tensor:
        # BitLinear._quantize_weight's dequantization: codes * gamma in float32, then dt.
        codes = self.codes() if codes is None else codes
        return dequantize(Quantized(codes, self.weight_scale.float()), torch.float32).to(dt)

    def decide_matmul(self, dt: torch.dtype) -> None:
        """Measure now which GEMM this layer runs in compute dtype `dt` (as
        `BitLinear.decide_matmul`; the base is frozen)."""
        if self.granularity in ("tensor", "channel"):
            device = self.qweight.device
            decide_matmul(
                self.config, self.in_features, self.out_features, dt, device, False, 1, False
            )

    def nbytes(self) -> int:
        """Bytes of the layer's tensors: packed codes + scales (+ bias, + input norm)."""
        tensors = [*self.buffers(), *self.parameters()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), as `BitLinear.eval()` computes it.

        The dequantized weight exists only during this call: autograd saves a recipe to
        rebuild it from the packed codes instead (saved-tensor hooks), so training keeps
        2 (or 1.6) bits per weight alive between forward and backward, not 16 or 32.
        """
        if self.norm is not None:
            x = self.norm(x)
        cfg = self.config
        dt = _compute_dtype(x)
        codes = self.codes()
        w_q = self._weight(dt, codes)

        # Autograd saves w_q (the fused path) or a view of it (F.linear saves w_q.t()):
        # either is replaced by a recipe to rebuild it. Matched by storage address, not by
        # reference: autograd keeps the hook alive, and a closure over w_q would keep it too.
        w_ptr = w_q.untyped_storage().data_ptr()

        def pack_hook(t: torch.Tensor):
            if t.dtype == dt and t.untyped_storage().data_ptr() == w_ptr:
                return _Rebuild(self, t)
            return t

        a_spec = cfg.activation_spec()
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, _unpack_hook):
            # The branches of BitLinear.forward for a ternary weight without blending.
            if (
                cfg.fused
                and a_spec is not None
                and a_spec.symmetric
                and a_spec.granularity == "token"
            ):
                run = scale_row = None
                if self.granularity in ("tensor", "channel"):
                    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
                    run = integer_gemm(cfg, codes, n, dt, x.device, trains=False)
                    s = self.weight_scale.float()
                    scale_row = s.reshape(1, -1) if s.dim() else s
                # w_q stands in for the latent weight: it needs no gradient.
                y = _FusedBitLinear.apply(
                    x, w_q, self.bias, w_q, run, scale_row, None,
                    int(a_spec.bits), cfg.kernels, dt, cfg.saved_activations,
                )  # fmt: skip
                return y.reshape(*x.shape[:-1], self.out_features)
            if a_spec is not None:
                x = fake_quantize(x, a_spec)
            return F.linear(x, w_q, self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, packing={self.packing}, "
            f"granularity={self.granularity}{group}"
        )


class _Rebuild:
    """What autograd keeps of a packed layer's dequantized weight (or a view of it): the
    layer, dtype and view geometry. Rebuilding is exact: the same codes and scales."""

    __slots__ = ("dtype", "geometry", "layer")

    def __init__(self, layer: PackedTernaryLinear, t: torch.Tensor):
        self.layer, self.dtype = layer, t.dtype
        self.geometry = (t.size(), t.stride(), t.storage_offset())

    def __call__(self) -> torch.Tensor:
        return self.layer._weight(self.dtype).as_strided(*self.geometry)


def _unpack_hook(saved):
    return saved() if isinstance(saved, _Rebuild) else saved


def pack_model(model: nn.Module, packing: str = "2bit") -> list[str]:
    """Replace every `BitLinear` of `model` by a `PackedTernaryLinear`, in place.

    Returns the dotted names replaced. All layers are converted before any is swapped, so a
    refused layer (see `PackedTernaryLinear.from_bitlinear`) leaves the model unchanged.
    Refused in one line: a model without `BitLinear` (quantize it first), `model` itself a
    `BitLinear`, and a `BitLinear` already wrapped by an adapter (pack before applying peft).
    """
    _check_packing(packing)
    if isinstance(model, BitLinear):
        raise BitNetError(
            "pack_model rewrites submodules in place and cannot replace the model itself; "
            "use PackedTernaryLinear.from_bitlinear(layer) for a bare BitLinear"
        )
    names = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
    if not names:
        raise BitNetError(
            "pack_model: the model has no BitLinear layer to pack; quantize it first "
            "(quantize_model(model, QATConfig()))"
        )
    wrapped = [n for n in names if n.split(".")[-1] == "base_layer"]
    if wrapped:
        raise BitNetError(
            f"pack_model: {wrapped[0]} is already wrapped by an adapter; pack the base before "
            "applying LoRA (peft)"
        )
    new = {n: PackedTernaryLinear.from_bitlinear(model.get_submodule(n), packing) for n in names}
    for name, layer in new.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return names


def _check_lora_config(config) -> None:
    """Refuse LoRA options that need the dense base weight, which a packed base lacks."""
    if getattr(config, "use_dora", False):
        raise BitNetError(
            "peft use_dora=True needs the dense base weight: not available on a packed "
            "ternary base (use plain LoRA, or DoRA on the unpacked BitLinear base)"
        )
    init = config.init_lora_weights
    # True / False / "gaussian" never read the base; the others factor a dense weight.
    if not (isinstance(init, bool) or init == "gaussian"):
        raise BitNetError(
            f"peft init_lora_weights={init!r} reads the dense base weight: not available on a "
            "packed ternary base (expected True, False or 'gaussian')"
        )


@functools.cache
def _lora_class() -> type:
    """peft's LoRA `Linear`, subclassed for a packed base (built on first use: peft is an
    optional dependency)."""
    from peft.tuners.lora import Linear as LoraLinear

    class PackedLoraLinear(LoraLinear):
        """peft's LoRA `Linear` around a `PackedTernaryLinear`: y = base(x) + B(A(x)) * s.

        Everything but merging is peft's own (adapters, dropout, scaling, rsLoRA, several
        adapters, saving). Merging is refused: a packed base has no latent weight to add
        B A into; merge into the unpacked `BitLinear` base instead.
        """

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            # peft knows the shapes of its own layer types only (and warns for the others).
            if isinstance(module, PackedTernaryLinear):
                return module.in_features, module.out_features
            return super()._get_in_out_features(module)

        def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
            _check_lora_config(config)
            super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise BitNetError(
                "cannot merge LoRA into a packed ternary base (it keeps no latent weights): "
                "merge into the unpacked BitLinear model, before pack_model"
            )

    # Importable (and picklable) as bitnet_training.peft.packed.PackedLoraLinear.
    PackedLoraLinear.__module__, PackedLoraLinear.__qualname__ = __name__, "PackedLoraLinear"
    return PackedLoraLinear


def __getattr__(name: str):
    # `PackedLoraLinear` exists only once peft is importable.
    if name == "PackedLoraLinear":
        return _lora_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_with_peft(config):
    """Let `config` (a `peft.LoraConfig`) wrap `PackedTernaryLinear` layers; returns it.

    Registers `PackedLoraLinear` through peft's custom-module hook. The registration is not
    saved in `adapter_config.json`: to load a saved adapter onto a packed base, pass
    `config=register_with_peft(LoraConfig.from_pretrained(path))` to
    `PeftModel.from_pretrained`.
    """
    try:
        from peft import LoraConfig
    except ImportError:
        raise BitNetError("1.58-bit QLoRA needs peft (pip install peft)") from None
    if not isinstance(config, LoraConfig):
        raise BitNetError(
            f"register_with_peft needs a peft.LoraConfig, got {type(config).__name__}"
        )
    _check_lora_config(config)
    config._register_custom_module({PackedTernaryLinear: _lora_class()})
    return config


def lora_config(**kw):
    """`peft.LoraConfig(**kw)` that wraps packed ternary layers (`register_with_peft`)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise BitNetError("1.58-bit QLoRA needs peft (pip install peft)") from None
    return register_with_peft(LoraConfig(**kw))
