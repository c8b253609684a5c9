"""`apply_peft`: the adapters transform of the recipe (after quantization, before parallelism).

`peft` is the engine and the file format where it does the job: LoRA (rsLoRA, PiSSA init,
per-module ranks) and AdaLoRA wrap any `nn.Linear`, our `BitLinear` included (it subclasses
`nn.Linear`: the ternary base stays frozen, its quantized forward unchanged), and save
adapters as `adapter_config.json` + `adapter_model.safetensors`. Ours is what no library does
for this library's models: resolving `all-linear` without the output head on any model,
BitFit with zero-initialized biases on bias-free BitNet layers, the packed ternary base of
`qlora_ternary`, prefix tuning on `BitNetLM`, and driving AdaLoRA's budget from the Trainer.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn

from ..atomic import atomic_directory
from ..callback import Callback
from ..errors import BitNetError
from ..nn.bitlinear import BitLinear
from ..nn.convert import output_head
from .config import LORA_FAMILY, PEFTConfig
from .packed import PackedTernaryLinear

log = logging.getLogger(__name__)


@dataclass
class PEFTReport:
    """What `apply_peft` did: the method, the adapted modules (with their rank for the LoRA
    family), and how many parameters train out of all."""

    method: str
    wrapped: list[str] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    trainable: int = 0
    total: int = 0
    budget: int | None = None  # the rank budget the ranks were chosen within, if any
    base_dtype: str = "float32"  # the storage dtype of the frozen linear layers
    stored: int = 0  # how many frozen linear layers are stored in base_dtype

    @property
    def share(self) -> float:
        """Trainable parameters as a fraction of all."""
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        rank = f", rank {'/'.join(map(str, ranks))}" if ranks else ""
        text = (
            f"{self.method}: {len(self.wrapped)} modules adapted{rank}; {self.trainable:,} of "
            f"{self.total:,} parameters train ({100 * self.share:.2f}%)"
        )
        if self.stored:
            text += f"; {self.stored} frozen linear layers stored in {self.base_dtype}"
        if self.budget is not None:
            chosen = ", ".join(f"{n} {r}" for n, r in self.ranks.items())
            text += f"; ranks chosen within {self.budget:,} LoRA parameters: {chosen}"
        return text


def _is_linear(m: nn.Module) -> bool:
    # nn.Linear and its subclasses (BitLinear), and frozen packed ternary bases.
    return isinstance(m, nn.Linear | PackedTernaryLinear)


def resolve_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the linear modules of `model` that `patterns` select: globs over dotted names
    that also match any dotted suffix (`q_proj`, `layers.1.*`), or `all-linear` (every linear
    but the output head, for any model: peft spares the head only for `transformers` models).
    A pattern matching nothing is a one-line error listing the names that exist."""
    head = output_head(model)
    linears = [(n, m) for n, m in model.named_modules() if _is_linear(m)]
    chosen: list[str] = []
    for p in patterns:
        if p == "all-linear":
            hit = [n for n, m in linears if m is not head and n.split(".")[-1] != "lm_head"]
        else:
            hit = [n for n, _ in linears if fnmatchcase(n, p) or fnmatchcase(n, "*." + p)]
        if not hit:
            short = sorted({n.split(".")[-1] for n, _ in linears})
            raise BitNetError(
                f"peft.target_modules pattern {p!r} matches no linear module; the model has "
                f"{', '.join(short) or 'none'}"
            )
        chosen += [n for n in hit if n not in chosen]
    return chosen


def _count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a packed ternary base counts its weights in the total
    (they are buffers there), an NF4 base its weights, not its packed bytes."""
    seen: set[int] = set()
    trainable = total = 0
    for m in model.modules():
        if isinstance(m, PackedTernaryLinear):
            total += m.in_features * m.out_features
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        state = getattr(p, "quant_state", None)  # bitsandbytes' packed 4-bit weight
        total += state.shape.numel() if state is not None else p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _require_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise BitNetError("this PEFT method needs peft (pip install 'bitnet-training[peft]')")


def apply_peft(model: nn.Module, config: PEFTConfig) -> tuple[nn.Module, PEFTReport]:
    """Apply `config.method` to `model` and return (the model to train, a report). The base
    is frozen; only the adapters train. LoRA and AdaLoRA return `peft`'s `PeftModel` wrapping
    `model`; BitFit changes `model` in place; `none` returns it untouched (everything
    trains). `config.adapter` loads an existing adapter (peft's format) to start from;
    `config.base_dtype` stores the frozen linear layers in bfloat16 (`store_frozen_linears`)."""
    model, report = _apply(model, config)
    if config.method != "none" and config.base_dtype != "float32":
        report.base_dtype = config.base_dtype
        report.stored = store_frozen_linears(model, getattr(torch, config.base_dtype))
    return model, report


def _apply(model: nn.Module, config: PEFTConfig) -> tuple[nn.Module, PEFTReport]:
    method = config.method
    if method == "none":
        t, n = _count(model)
        return model, PEFTReport("none", trainable=t, total=n)
    if config.adapter:
        _check_adapter(config)
    if method == "bitfit":
        report = apply_bitfit(model, resolve_targets(model, config.target_modules))
        if config.adapter:
            load_bitfit(model, config.adapter)
        return model, report
    if method in LORA_FAMILY:
        return _apply_lora(model, config)
    from .prompt import apply_prompt

    wrapped = apply_prompt(
        model,
        method,
        config.num_virtual_tokens,
        prefix_projection=config.prefix_projection,
        encoder_hidden_size=config.encoder_hidden_size,
    )
    if config.adapter:
        wrapped.load_adapter_state_dict(_read_adapter(config.adapter))
    t, n = _count(wrapped)
    return wrapped, PEFTReport(method, ["prefix"], trainable=t, total=n)


def _apply_lora(model: nn.Module, config: PEFTConfig) -> tuple[nn.Module, PEFTReport]:
    _require_peft()
    import peft

    targets = resolve_targets(model, config.target_modules)
    ranks = {name: config.rank for name in targets}
    if config.rank_budget is not None:
        ranks = select_ranks(model, targets, config.rank_budget)
    for pattern, r in config.rank_of().items():
        hit = [n for n in targets if fnmatchcase(n, pattern) or fnmatchcase(n, "*." + pattern)]
        if not hit:
            raise BitNetError(f"peft.rank_pattern {pattern!r} matches no adapted module")
        ranks.update(dict.fromkeys(hit, r))
    # peft matches target names by suffix and rank_pattern keys as regexes over names.
    pattern = {re.escape(n): r for n, r in ranks.items() if r != config.rank}
    chosen = config.rank_budget is not None
    common = dict(target_modules=targets, lora_alpha=config.alpha, lora_dropout=config.dropout)
    if config.method == "qlora_ternary":
        from .packed import pack_model

        pack_model(model, config.packing)
    if config.method == "qlora":
        from .nf4 import quantize_nf4

        quantize_nf4(model, config.double_quant)
    if config.method == "adalora":
        peft_config = peft.AdaLoraConfig(
            init_r=config.init_rank,
            target_r=config.target_rank,
            tinit=config.tinit,
            tfinal=config.tfinal,
            deltaT=config.delta_t,
            orth_reg_weight=config.orth_reg_weight,
            # peft wants the run's length now; AdaLoRAControl.setup sets the real one.
            total_step=config.tinit + config.tfinal + 1,
            **common,
        )
        ranks = dict.fromkeys(targets, config.init_rank)
    else:
        init = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}[config.init]
        peft_config = peft.LoraConfig(
            r=config.rank,
            use_rslora=config.rslora,
            init_lora_weights=init,
            rank_pattern=pattern,
            bias=config.bias,
            **common,
        )
    if config.method == "qlora_ternary":
        from .packed import register_with_peft

        register_with_peft(peft_config)
    if config.adapter:
        _check_lora_adapter(config, targets)
        wrapped = _load_peft_adapter(model, config.adapter, config.method == "qlora_ternary")
    else:
        wrapped = peft.get_peft_model(model, peft_config)
    if config.method == "adalora":
        # AdaLoRA reallocates its rank budget after every optimizer step: declared here, so
        # a plain Trainer(...).train() drives it (Trainer collects trainer_callbacks()).
        control = AdaLoRAControl(wrapped)
        wrapped.trainer_callbacks = lambda: [control]
    t, n = _count(wrapped)
    report = PEFTReport(config.method, targets, ranks, t, n)
    report.budget = config.rank_budget if chosen else None
    return wrapped, report


ADAPTER_TYPES = {
    "lora": "LORA",
    "qlora": "LORA",
    "qlora_ternary": "LORA",
    "adalora": "ADALORA",
    "bitfit": "BITFIT",
    "prefix": "PREFIX_TUNING",
    "ptuning_v2": "PREFIX_TUNING",
}


def _adapter_config(path: str) -> dict:
    import json

    _adapter_file(path)
    try:
        with open(os.path.join(path, "adapter_config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise BitNetError(f"peft.adapter {path!r}: unreadable adapter_config.json: {e}") from None
    if not isinstance(cfg, dict):
        raise BitNetError(f"peft.adapter {path!r}: adapter_config.json is not a mapping")
    return cfg


def _check_adapter(config: PEFTConfig) -> None:
    """Refuse an adapter made by another method than `config.method`."""
    kind = _adapter_config(config.adapter).get("peft_type")
    want = ADAPTER_TYPES[config.method]
    if kind != want:
        raise BitNetError(
            f"peft.adapter {config.adapter!r} is a {kind or 'unknown'} adapter; "
            f"peft.method={config.method} needs a {want} one"
        )


def _check_lora_adapter(config: PEFTConfig, targets: list[str]) -> None:
    """The adapter decides the LoRA shape: refuse settings that say otherwise (they would be
    silently replaced by the adapter's)."""
    cfg = _adapter_config(config.adapter)
    theirs = sorted(cfg.get("target_modules") or [])
    if theirs != sorted(targets):
        missing = sorted(set(targets) - set(theirs))
        raise BitNetError(
            f"peft.adapter {config.adapter!r} adapts other modules than peft.target_modules "
            f"selects here ({len(theirs)} vs {len(targets)}"
            + (f", e.g. not {missing[0]}" if missing else "")
            + ")"
        )
    default = PEFTConfig()
    for key in ("rank_budget", "rank_pattern", "rslora", "dropout", "init", "bias"):
        if getattr(config, key) != getattr(default, key):
            raise BitNetError(
                f"peft.{key} has no effect with peft.adapter: the adapter decides its ranks, "
                f"scaling, dropout and initialization (drop peft.{key})"
            )
    checks = [("alpha", cfg.get("lora_alpha"), config.alpha)]
    if config.method != "adalora":
        checks.append(("rank", cfg.get("r"), config.rank))
    for key, adapter_value, ours in checks:
        if adapter_value is not None and float(adapter_value) != float(ours):
            raise BitNetError(
                f"peft.adapter {config.adapter!r} has {key} {adapter_value}, peft.{key} is "
                f"{ours}: set peft.{key}={adapter_value} (the adapter decides)"
            )


def _read_adapter(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(_adapter_file(path))
    except (SafetensorError, OSError) as e:
        raise BitNetError(
            f"peft.adapter {path!r}: unreadable adapter_model.safetensors: {e}"
        ) from None


def _spectrum_source(m: nn.Module) -> torch.Tensor:
    """What a module's adapter should capture: the weight of a full-precision layer, the
    quantization residual W - gamma * Q(W) of a quantized one (float32, (out, in))."""
    w = m.weight.detach().float()
    spec = m.weight_spec() if hasattr(m, "weight_spec") else None
    if spec is not None:
        from ..quant.functional import dequantize

        w = w - dequantize(m.quantized_weight(), torch.float32).reshape(w.shape)
    return w


@torch.no_grad()
def select_ranks(model: nn.Module, targets: list[str], budget: int) -> dict[str, int]:
    """Each target's LoRA rank within `budget` trainable parameters (a rank-r adapter on an
    (out, in) layer costs r * (in + out)). Every module gets rank 1; then, greedily, the next
    rank goes to the module whose next singular direction holds the largest share of its
    energy per parameter it costs (singular values of `_spectrum_source`: the weight, or the
    quantization residual of a ternary layer), until the budget is spent. A direction with
    no energy is never bought, so a module never gets more rank than its source has."""
    costs, shares = {}, {}
    for name in targets:
        m = model.get_submodule(name)
        s = torch.linalg.svdvals(_spectrum_source(m)).double() ** 2
        shares[name] = (s / s.sum().clamp_min(1e-30)).tolist()
        costs[name] = m.in_features + m.out_features
    ranks = dict.fromkeys(targets, 1)
    spent = sum(costs.values())
    if spent > budget:
        raise BitNetError(
            f"peft.rank_budget={budget} is too small: rank 1 on the {len(targets)} targeted "
            f"modules already needs {spent} parameters"
        )
    while True:
        best, value = None, 0.0
        for name in targets:
            r = ranks[name]
            if r < len(shares[name]) and spent + costs[name] <= budget:
                v = shares[name][r] / costs[name]
                if v > value + 1e-15:
                    best, value = name, v
        if best is None:
            return ranks
        ranks[best] += 1
        spent += costs[best]


def _adapter_file(path: str) -> str:
    f = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(f):
        raise BitNetError(f"peft.adapter {path!r} has no adapter_model.safetensors")
    return f


def _load_peft_adapter(model: nn.Module, path: str, packed: bool = False) -> nn.Module:
    import peft

    _adapter_file(path)
    try:
        kw = {}
        if packed:  # peft's config file does not record our packed-base layer mapping
            from .packed import register_with_peft

            kw["config"] = register_with_peft(peft.LoraConfig.from_pretrained(path))
        return peft.PeftModel.from_pretrained(model, path, is_trainable=True, **kw)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        # torch's load_state_dict error starts with a header line; the detail follows it.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if not ln.startswith("Error(s)")), type(e).__name__)
        raise BitNetError(f"peft.adapter {path!r} does not fit this model: {first}") from None


class AdaLoRAControl(Callback):
    """Drives AdaLoRA (arXiv 2303.10512) under the Trainer: its schedule spans the run's
    optimizer steps, and after every optimizer step (gradients still present) peft's
    `update_and_allocate` updates the sensitivity / uncertainty EMAs and prunes ranks to the
    budget. Logs the current total rank (`adalora_rank`). Checkpoints hold the EMAs (as
    tensors) and the final rank pattern, so a resumed run is the uninterrupted one."""

    def __init__(self, model):
        self.model = model

    @property
    def _allocator(self):
        return self.model.base_model.rankallocator

    def setup(self, trainer):
        cfg = self.model.peft_config["default"]
        if trainer.total_steps <= cfg.tinit + cfg.tfinal:
            raise BitNetError(
                f"peft.tinit={cfg.tinit} + peft.tfinal={cfg.tfinal} leave no budgeting phase "
                f"in a run of {trainer.total_steps} steps: lower them or train longer"
            )
        cfg.total_step = trainer.total_steps
        self._allocator.set_total_step(trainer.total_steps)

    def state_dict(self):
        return {"rank_pattern": self.model.peft_config["default"].rank_pattern or None}

    def load_state_dict(self, state):
        if state.get("rank_pattern"):
            self.model.peft_config["default"].rank_pattern = state["rank_pattern"]

    _EMAS = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def state_tensors(self):
        a = self._allocator
        return {f"{ema}/{n}": getattr(a, ema)[n] for ema in self._EMAS for n in a.ipt}

    def load_state_tensors(self, tensors):
        a, params = self._allocator, dict(self.model.base_model.model.named_parameters())
        for key, t in tensors.items():
            ema, _, name = key.partition("/")
            if ema not in self._EMAS or name not in params:
                raise BitNetError(f"AdaLoRA state {key!r} does not fit this model's adapters")
            getattr(a, ema)[name] = t.to(params[name].device, params[name].dtype)

    def on_optimizer_step(self, trainer):
        self.model.base_model.update_and_allocate(trainer.state.step)

    def on_log(self, trainer, logs):
        # Pruned singular values are masked to zero in lora_E (the budget in force).
        logs["adalora_rank"] = sum(
            int((m.lora_E["default"] != 0).sum())
            for m in self.model.modules()
            if hasattr(m, "lora_E") and "default" in m.lora_E
        )


def _cast_input(module: nn.Module, args: tuple):
    x = args[0]
    module._input_dtype = x.dtype
    if x.dtype != module.weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return (x.to(module.weight.dtype), *args[1:])
    return None


def _cast_output(module: nn.Module, args: tuple, out: torch.Tensor):
    dtype = module.__dict__.pop("_input_dtype", out.dtype)
    return out if torch.is_autocast_enabled(out.device.type) else out.to(dtype)


@torch.no_grad()
def store_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights (and biases) of every fully frozen `nn.Linear` of `model` (a LoRA
    layer's base, an untargeted layer, the output head) in `dtype`, in place, and return how
    many. Under autocast to `dtype` (bf16 mixed precision) they compute exactly as before,
    since autocast rounds a float32 weight to `dtype` for every matmul anyway: the frozen base
    takes half the memory at no change in any output. Outside autocast (generation, fp32
    runs) the layer computes in `dtype` and returns the input's dtype. Layers with a trainable
    parameter (BitFit's biases) stay as they are. Refused for a quantized base, whose frozen
    form is `qlora_ternary`'s packed codes."""
    if any(isinstance(m, BitLinear | PackedTernaryLinear) for m in model.modules()):
        raise BitNetError(
            "peft.base_dtype stores a full-precision base's frozen linear layers; this base is "
            "ternary: peft.method=qlora_ternary stores it in 2 bits per weight instead"
        )
    n = 0
    for m in model.modules():
        if type(m) is not nn.Linear or any(p.requires_grad for p in m.parameters()):
            continue
        m.weight.data = m.weight.data.to(dtype)
        if m.bias is not None:
            m.bias.data = m.bias.data.to(dtype)
        m.register_forward_pre_hook(_cast_input)
        m.register_forward_hook(_cast_output)
        n += 1
    return n


# ------------------------------------------------------------------------------ BitFit
def apply_bitfit(model: nn.Module, targets: list[str]) -> PEFTReport:
    """BitFit (Ben Zaken et al. 2022): freeze everything, train only biases. The targeted
    linear modules that have no bias (all of BitNet's) get a zero-initialized trainable one,
    so the model's output is unchanged at step 0."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        m = model.get_submodule(name)
        if m.bias is None:
            w = m.weight
            m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=w.dtype, device=w.device))
        m.bias.requires_grad_(True)
    t, n = _count(model)
    return PEFTReport("bitfit", list(targets), trainable=t, total=n)


def load_bitfit(model: nn.Module, path: str) -> None:
    """Load a BitFit adapter (the biases saved by `save_adapter`) into `model`."""
    biases = _read_adapter(path)
    params = dict(model.named_parameters())
    bad = [k for k in biases if k not in params or params[k].shape != biases[k].shape]
    if bad:
        raise BitNetError(
            f"peft.adapter {path!r} does not fit this model: it has a bias {bad[0]} that "
            "peft.target_modules does not give this model (or of another shape)"
        )
    with torch.no_grad():
        for k, v in biases.items():
            params[k].copy_(v)


# ------------------------------------------------------------------------- saving
def save_adapter(model: nn.Module, directory: str, state_dict: dict | None = None) -> str:
    """Write what trains in `model` as an adapter directory, atomically: peft's format
    (`adapter_config.json` + `adapter_model.safetensors`, loadable with
    `peft.PeftModel.from_pretrained` onto the same base) for LoRA / AdaLoRA / peft's prefix
    tuning; the same two files with our own `peft_type` (`BITFIT`, `PREFIX_TUNING` on
    `BitNetLM`) for what peft has no format for. `state_dict`: the model's whole state dict,
    when its own parameters are shards (FSDP). Returns `directory`."""
    import json

    from safetensors.torch import save_file

    with atomic_directory(directory) as tmp:
        if hasattr(model, "peft_config") and hasattr(model, "save_pretrained"):
            with warnings.catch_warnings():
                # AdaLoRA prunes some modules to rank 0, whose empty tensors peft takes for
                # unsharded FSDP / ZeRO-3 shards and warns about: they are what it pruned.
                warnings.filterwarnings("ignore", message=".*have invalid shape.*")
                model.save_pretrained(tmp, state_dict=state_dict)
        else:
            if hasattr(model, "adapter_state_dict"):
                state, kind = model.adapter_state_dict(), "PREFIX_TUNING"
            else:
                kind = "BITFIT"
                whole = state_dict if state_dict is not None else dict(model.named_parameters())
                trains = [n for n, p in model.named_parameters() if p.requires_grad]
                state = {n: whole[n].detach() for n in trains}
            save_file(
                {k: v.contiguous() for k, v in state.items()},
                os.path.join(tmp, "adapter_model.safetensors"),
            )
            with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
                json.dump({"peft_type": kind, "library": "bitnet_training"}, f, indent=1)
    return directory
