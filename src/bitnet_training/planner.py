"""`bitnet-train plan`: memory per device of a training run, by component, before running it.

The run is not modelled by formulas: it is *traced*. The model is built as `train` builds it
(preset or `transformers` config, quantization, adapters, activation checkpointing) on the
meta device, given fake CPU tensors (`FakeTensorMode`: shapes and dtypes, no memory), and
two optimizer steps of the run's batch, sequence length and precision are run under PyTorch's
`MemTracker` (`torch.distributed._tools.mem_tracker`), which records every tensor storage
alive at the peak by kind: parameters (the latent weights QAT trains), gradients, optimizer
states, activations (what the forward saves for the backward: BitLinear's int8 activation
codes and per-token scales, or in bf16 its quantized activations, its once-per-step
dequantized weight, attention, the logits) and
temporary buffers (the backward's). A 7B-shaped run traces in seconds on a CPU.

Not tensors, and added as a constant: the runtime's own memory (`runtime overhead`): on CPU
the oneDNN / MKL buffers and allocator slack, measured as a step's heap peak minus its
tensors over the validation test's runs, single-threaded: 11-21 MiB on an Intel Xeon with
AMX (16-51 MiB with 2 threads, as those libraries keep buffers per thread), 16 MiB used
there; -1 to 11 MiB on an AMD EPYC without AMX, 6 MiB used on CPUs without AMX; on CUDA the
context and cuBLAS workspace, assumed (no GPU was lent to measure it). Attention is traced
as PyTorch runs it on the CPU (SDPA's flash path: no (seq x seq) score matrix is kept for the
backward); GPU kernels keep the same.

Parallel layouts divide what the trace measured for one device: data parallel keeps it
(plus DDP's gradient buckets), FSDP divides parameters, gradients and optimizer states by its
degree and adds two gathered transformer blocks, tensor parallel divides the projections and
their activations, pipeline parallel divides the layers and keeps `stages` micro-batches'
activations in flight (1F1B) on the first stage. These are estimates from the one-device
trace; only the one-device figures are validated against measurement.

The 4-bit bases are traced as the LoRA run over the full-precision base and their frozen base
weights then counted as stored: NF4 at 4 bits plus a float32 absmax per 64 weights (8 bits
and a float32 per 256 blocks with double quantization), 1.58-bit packed at 2 bits per weight
(or 1.6 in base 3) plus its scale; one layer's weight is dequantized at a time (a temporary).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import BitNetError

GIB = 2**30
MIB = 2**20
# What a few accelerators hold (bytes).
DEVICES = {
    "h100": 80 * GIB,
    "h200": 141 * GIB,
    "a100": 80 * GIB,
    "a100-80gb": 80 * GIB,
    "a100-40gb": 40 * GIB,
    "l40s": 48 * GIB,
    "a6000": 48 * GIB,
    "rtx4090": 24 * GIB,
    "rtx3090": 24 * GIB,
    "a10g": 24 * GIB,
    "t4": 16 * GIB,
}
# Not tensors: the runtime's own memory (see the module docstring). On CPU it follows the
# GEMM kernels oneDNN / MKL run, measured on two CPU families: with AMX, and without.
RUNTIME = {"cpu": 16 * MIB, "cuda": 600 * MIB}
RUNTIME_CPU_WITHOUT_AMX = 6 * MIB


def _has_amx() -> bool:
    """Whether this CPU has AMX tiles (Linux's /proc/cpuinfo flags; False elsewhere)."""
    from .quant.native import cpu_info

    return "amx_tile" in cpu_info()[1]


def runtime_overhead(device: str) -> int:
    """The runtime's own memory a plan adds on `device` (cpu: this CPU's family)."""
    if device == "cpu" and not _has_amx():
        return RUNTIME_CPU_WITHOUT_AMX
    return RUNTIME[device]


# 7B / 13B: LLaMA's shapes, for the original design's tables; byte vocabulary as our presets.
SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               max_position_embeddings=4096),
    "13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                max_position_embeddings=4096),
}  # fmt: skip
COMPONENTS = (
    "weights",
    "gradients",
    "optimizer states",
    "activations",
    "temporary buffers",
    "runtime overhead",
)


def parse_memory(text: str) -> int:
    """Bytes of `24GB`, `24GiB`, `80 gb`, `512MB` or a device name (`h100`, `a100-40gb`)."""
    t = str(text).strip().lower()
    if t in DEVICES:
        return DEVICES[t]
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(g|gb|gib|m|mb|mib|t|tb|tib)", t)
    if not m:
        raise BitNetError(
            f"--device-memory {text!r} is invalid: a size such as 24GB or 512MB, or one of "
            f"{', '.join(DEVICES)}"
        )
    unit = {"g": GIB, "m": MIB, "t": 1024 * GIB}[m.group(2)[0]]
    size = int(float(m.group(1)) * unit)
    if size <= 0:
        raise BitNetError(f"--device-memory {text!r} is invalid: a size above zero")
    return size


@dataclass
class Layout:
    """Parallel degrees: data parallel (DDP replicas), FSDP shards, tensor and pipeline."""

    dp: int = 1
    fsdp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        for name in ("dp", "fsdp", "tp", "pp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BitNetError(f"--{name} {getattr(self, name)!r} is invalid: an integer >= 1")
        if self.dp > 1 and self.fsdp > 1:
            raise BitNetError("--dp and --fsdp are two kinds of data parallelism: choose one")

    @property
    def devices(self) -> int:
        return self.dp * self.fsdp * self.tp * self.pp


@dataclass
class Plan:
    """Bytes per device by component (`COMPONENTS`), what was planned, and the verdict."""

    components: dict[str, int]
    description: str
    layout: Layout
    device: str
    device_memory: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def table(self) -> str:
        lines = [f"plan: {self.description}"]
        if self.layout.devices > 1:
            lines.append(
                f"layout: dp {self.layout.dp} x fsdp {self.layout.fsdp} x tp {self.layout.tp} "
                f"x pp {self.layout.pp} = {self.layout.devices} devices (per device below)"
            )
        width = max(len(k) for k in self.components)
        for k, v in self.components.items():
            lines.append(f"  {k:<{width}}  {_size(v):>12}")
        lines.append(f"  {'total':<{width}}  {_size(self.total):>12}")
        if self.device_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(
                f"{verdict} in {_size(self.device_memory)} "
                f"({100 * self.total / self.device_memory:.0f}% of the device)"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


class _NoHook:
    def remove(self) -> None:
        pass


def _tracker(model: nn.Module, optimizer):
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    # MemTracker hooks every parameter's gradient, which a frozen one (a PEFT base) refuses:
    # mark those as hooked already.
    for p in model.parameters():
        if not p.requires_grad:
            mt._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    mt.track_external(model, optimizer)
    return mt


def _build(cfg):
    """The run's model and optimizer on fake CPU tensors (built on meta, then given fake
    storage), as `train` builds them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import recipe
    from .optim import build_optimizer

    with torch.device("meta"):
        model = recipe.build_model(cfg).model
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model.to_empty(device="cpu")
        model.train()
        optimizer = build_optimizer(model, cfg.training.optimizer, cfg.training.learning_rate)
    return mode, model, optimizer


def _precision(cfg) -> str:
    """The run's precision: `auto` is bf16 on the devices planned for (GPUs with bf16, CPUs)."""
    p = cfg.training.mixed_precision
    return "bf16" if p == "auto" else p


def trace(cfg, device: str = "cpu") -> dict[str, int]:
    """Peak bytes by kind of two training steps of run config `cfg` on one device (fake
    tensors; see the module docstring). A model of more than 2 layers is traced with 1 and
    2 and extrapolated (each layer adds the same: a 7B traces in seconds, not a minute; the
    validation test checks a 6-layer model against measurement). `device`: the one planned
    for (`_matmuls`)."""
    layers = cfg.model.num_hidden_layers
    if layers <= 2:
        return _trace(cfg, device)
    one, two = (_trace(_with_layers(cfg, n), device) for n in (1, 2))
    return {k: one[k] + (layers - 1) * (two[k] - one[k]) for k in one}


def _with_layers(cfg, n: int):
    from .config import config_from_dict

    d = cfg.to_dict()
    d["model"]["num_hidden_layers"] = n
    return config_from_dict(d)


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():  # BitLinear's cache key reads a (fake) data pointer
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        yield


@contextlib.contextmanager
def _matmuls(model: nn.Module, dtype: torch.dtype | None, device: str):
    """The matmul each quantized layer runs where it is measured (bf16 `integer_matmul:
    auto`): for a CPU plan, decided as a CPU run decides it (measured here, as the Trainer
    does before its first step); for another device, which this CPU cannot measure, the
    float GEMM of x_q (the one that keeps more: x_q rather than int8 codes), for the trace
    only."""
    from .quant import gemm

    if dtype is None or device == "cpu":
        for module in model.modules():
            if dtype is not None and hasattr(module, "decide_matmul"):
                module.decide_matmul(dtype)
        yield
        return
    held = dict(gemm._PATHS)
    for module in model.modules():
        if hasattr(module, "decide_matmul"):
            gemm._PATHS["cpu", dtype, module.in_features, module.out_features] = False
    try:
        yield
    finally:
        gemm._PATHS.clear()
        gemm._PATHS.update(held)


def _trace(cfg, device: str = "cpu") -> dict[str, int]:
    from torch.distributed._tools.mem_tracker import _MemRefType as R

    from .recipe import build_loss

    mode, model, optimizer = _build(cfg)
    b, t = cfg.training.batch_size, cfg.data.seq_len
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(_precision(cfg))
    with _matmuls(model, dtype, device), mode:
        loss_fn = build_loss(cfg, model, None)
        ids = torch.zeros((b, t), dtype=torch.long)
        mt = _tracker(model, optimizer)

        def step():
            amp = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
            with amp:
                loss = loss_fn(model, {"input_ids": ids, "labels": ids})
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        with mt, _quiet():
            step()  # the first step allocates the optimizer states
            mt.reset_mod_stats()
            step()
        ((_, snap),) = mt.get_tracker_snapshot("peak").items()
    return {
        "weights": snap.get(R.PARAM, 0) + snap.get(R.BUFFER, 0),
        "gradients": snap.get(R.GRAD, 0),
        "optimizer states": snap.get(R.OPT, 0),
        "activations": snap.get(R.ACT, 0),
        "temporary buffers": snap.get(R.TEMP, 0) + snap.get(R.OTH, 0),
    }


def _per_device(cfg, layout: Layout, microbatches: int):
    """The run config one device of `layout` traces: tensor parallel as its local shapes
    (heads, key / value heads and FFN width divided; the residual width, embeddings and norms
    whole, as our layout keeps them), pipeline parallel as its share of the layers and one
    micro-batch, PEFT's 4-bit bases as LoRA over the unpacked base."""
    from .config import config_from_dict

    d = cfg.to_dict()
    m = d["model"]
    t = layout.tp
    if t > 1:
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if m[key] % t:
                raise BitNetError(f"--tp {t} does not divide model.{key}={m[key]}")
        m["head_dim"] = m.get("head_dim") or m["hidden_size"] // m["num_attention_heads"]
        m["num_attention_heads"] //= t
        m["num_key_value_heads"] //= t
        m["intermediate_size"] //= t
    if layout.pp > 1:
        if m["num_hidden_layers"] < layout.pp:
            raise BitNetError(
                f"--pp {layout.pp} needs a layer per stage: the model has {m['num_hidden_layers']}"
            )
        m["num_hidden_layers"] = -(-m["num_hidden_layers"] // layout.pp)  # the first stage's
        b = d["training"]["batch_size"]
        if b % microbatches:
            raise BitNetError(
                f"training.batch_size={b} does not split into {microbatches} micro-batches"
            )
        d["training"]["batch_size"] = b // microbatches
    if d["training"]["optimizer"]["name"] == "adamw8bit":  # traced as AdamW, then scaled
        d["training"]["optimizer"] = {**d["training"]["optimizer"], "name": "adamw"}
        d["training"]["optimizer"].pop("paged", None)
    method = d["peft"]["method"]
    if method == "qlora_ternary":  # its packed base unpacks per call and keeps nothing
        d["qat"] = {**d["qat"], "cache_quantized_weight": False}
    if method in ("qlora", "qlora_ternary"):
        d["peft"] = {**d["peft"], "method": "lora"}
        for key in ("packing", "double_quant"):
            d["peft"].pop(key, None)
    if layout.fsdp > 1 and d.get("quantize"):  # FSDP turns BitLinear's weight cache off
        d["qat"] = {**d["qat"], "cache_quantized_weight": False}
    d["distributed"] = {}
    return config_from_dict(d)


def _packed_base(cfg, traced_cfg) -> tuple[int, int, int]:
    """(full-precision bytes of the frozen base weights the trace held, their packed bytes,
    the largest one's dequantized bytes) for QLoRA's 4-bit and 1.58-bit bases."""
    from .nn.convert import output_head

    model = _build(traced_cfg)[1]
    head = output_head(model)
    frozen = [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.Linear) and m is not head and not m.weight.requires_grad
    ]
    n = sum(w.numel() for w in frozen)
    full = sum(w.numel() * w.element_size() for w in frozen)
    if cfg.peft.method == "qlora":  # NF4: 4 bits, absmax per 64 (8 bits + fp32 per 256)
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if cfg.peft.double_quant else 4 / 64)
    else:  # 2 bits (or 1.6 in base 3) and one float32 scale per tensor
        per_weight = 0.25 if cfg.peft.packing == "2bit" else 0.2
    packed = int(n * per_weight) + 4 * len(frozen)
    largest = max((w.numel() * 4 for w in frozen), default=0)
    return full, packed, largest


def plan(
    cfg,
    layout: Layout | None = None,
    device: str = "cuda",
    device_memory: int | None = None,
    schedule: str = "1f1b",
    microbatches: int | None = None,
) -> Plan:
    """Memory per device of training run config `cfg` under `layout`, by component (see the
    module docstring). `device`: cuda or cpu (the runtime's own memory); `device_memory`:
    bytes to check the total against; `schedule` / `microbatches`: the pipeline's."""
    layout = layout or Layout()
    if device not in RUNTIME:
        raise BitNetError(f"--device {device!r} is invalid: cuda or cpu")
    _check_layout(cfg, layout, schedule, microbatches)
    if cfg.export_target != "none":  # the whole model's shapes, before the layout splits them
        from .models.export_targets import check_target

        with torch.device("meta"):
            from . import recipe

            check_target(recipe.build_model(cfg).model, cfg.export_target)
    m = microbatches or layout.pp
    per = _per_device(cfg, layout, m)
    parts = trace(per, device)
    notes = []
    if layout.pp > 1:
        in_flight = m if schedule == "gpipe" else min(layout.pp, m)
        parts["activations"] *= in_flight
        notes.append(
            f"pipeline: the first stage's {per.model.num_hidden_layers} layers, embeddings and "
            f"head; {in_flight} micro-batches of {per.training.batch_size} in flight ({schedule})"
        )
    if cfg.peft.method in ("qlora", "qlora_ternary"):
        full, packed, largest = _packed_base(cfg, per)
        parts["weights"] += packed - full
        parts["temporary buffers"] += largest
        notes.append(
            f"{cfg.peft.method}: frozen base counted packed ({packed / GIB:.2f} GiB), traced as "
            "LoRA over the unpacked base; one layer dequantized at a time"
        )
    if cfg.training.optimizer.name == "adamw8bit":
        # bitsandbytes' 8-bit AdamW: two uint8 moments and a float32 absmax per 256 values
        # each, instead of two float32 moments (its ops cannot run on fake tensors)
        parts["optimizer states"] = int(parts["optimizer states"] * (1 + 4 / 256) / 4)
        notes.append("adamw8bit: optimizer states counted at 8 bits (traced as AdamW)")
    if layout.fsdp > 1:
        blocks = per.model.num_hidden_layers
        block = (parts["weights"] / max(blocks, 1)) if blocks else 0
        for k in ("weights", "gradients", "optimizer states"):
            parts[k] = parts[k] // layout.fsdp
        parts["temporary buffers"] += int(2 * block)  # the gathered block and the next one
        notes.append("fsdp: 1/N of weights, gradients and optimizer states; two gathered blocks")
    if layout.dp > 1:
        parts["temporary buffers"] += parts["gradients"]  # DDP's gradient buckets
        notes.append("ddp: a replica per device, plus gradient buckets the size of the gradients")
    with torch.device("meta"):
        from . import recipe

        model = recipe.build_model(per).model
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if layout.fsdp > 1:
        trainable //= layout.fsdp
    if parts["gradients"] < 0.9 * trainable:
        notes.append(
            f"the peak comes early in the backward: gradients grow to {_size(trainable)} while "
            "activations are freed, so fewer are alive at the peak"
        )
    parts["runtime overhead"] = runtime_overhead(device)
    if device == "cuda":
        notes.append(
            "runtime overhead on CUDA (context, cuBLAS workspace) is assumed, not measured; "
            "the activations are traced as the CPU runs them (autocast's op lists differ "
            "slightly)"
        )
    c = cfg.model
    desc = (
        f"{c.num_hidden_layers} layers x {c.hidden_size} (FFN {c.intermediate_size}, vocab "
        f"{c.vocab_size}), {_method(cfg)}, batch {cfg.training.batch_size} x "
        f"{cfg.data.seq_len}, {_precision(cfg)}, optimizer "
        f"{cfg.training.optimizer.name}"
        + (", activation checkpointing" if cfg.training.activation_checkpointing else "")
    )
    return Plan({k: int(parts[k]) for k in COMPONENTS}, desc, layout, device, device_memory, notes)


def _check_layout(cfg, layout: Layout, schedule: str, microbatches: int | None) -> None:
    """Refuse, as training would, what the layout cannot run; the layout comes from the
    plan's degrees, never from `distributed.*` (which would be silently ignored)."""
    d = cfg.distributed
    if d.strategy not in ("auto", "none") or d.tp_size is not None:
        raise BitNetError(
            f"plan takes the layout from --dp / --fsdp / --tp / --pp, not from "
            f"distributed.strategy={d.strategy}: give the degrees instead"
        )
    if schedule not in ("1f1b", "gpipe"):
        raise BitNetError(f"--pp-schedule {schedule!r} is invalid: expected 1f1b or gpipe")
    if layout.pp == 1 and (schedule != "1f1b" or microbatches is not None):
        raise BitNetError("--pp-schedule and --pp-microbatches describe a pipeline: give --pp")
    if microbatches is not None and microbatches < 1:
        raise BitNetError(f"--pp-microbatches {microbatches} is invalid: an integer >= 1")
    if layout.pp == 1:
        return
    why = (
        "pipelines are not combined with data or tensor parallelism yet"
        if layout.dp * layout.fsdp * layout.tp > 1
        else "tied embeddings (the first and last stages would share a weight)"
        if cfg.model.tie_word_embeddings
        else "loss.chunk_size computes the loss from the hidden states and the head"
        if cfg.loss.chunk_size is not None
        else "distillation needs the whole model"
        if cfg.teacher.pretrained
        else f"peft.method={cfg.peft.method} is not built for pipelines"
        if cfg.peft.method != "none"
        else "fp16 loss scaling would act outside the schedule's backward"
        if cfg.training.mixed_precision == "fp16"
        else None
    )  # fmt: skip
    if why:
        raise BitNetError(f"--pp {layout.pp}: {why}")


def _method(cfg) -> str:
    if cfg.peft.method != "none":
        return f"{cfg.peft.method} (rank {cfg.peft.rank})"
    return "BitNet QAT" if cfg.quantize else "full-precision training"


def shape_overrides(shape: str) -> list[str]:
    """`model.*` overrides for `--shape`: 7b / 13b, or a `transformers` config.json (its
    decoder shape, traced as a BitNetLM of that shape)."""
    import json
    import os

    if shape.lower() in SHAPES:
        return [f"model.{k}={v}" for k, v in SHAPES[shape.lower()].items()]
    path = os.path.join(shape, "config.json") if os.path.isdir(shape) else shape
    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
    except (OSError, ValueError) as e:
        raise BitNetError(
            f"--shape {shape!r}: neither 7b / 13b nor a readable config.json ({e})"
        ) from None
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
            "head_dim", "tie_word_embeddings")  # fmt: skip
    missing = [k for k in keys[:5] if k not in c]
    if missing:
        raise BitNetError(f"--shape {shape!r}: config.json lacks {', '.join(missing)}")
    return [f"model.{k}={json.dumps(c[k])}" for k in keys if c.get(k) is not None]
