"""`PEFTConfig`: parameter-efficient fine-tuning, the `peft:` section of a run config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..errors import ConfigError
from ..settings import Section

PEFTMethod = Literal[
    "none", "lora", "qlora", "qlora_ternary", "adalora", "bitfit", "prefix", "ptuning_v2"
]

# Which keys act for which methods: a key of another method than the chosen one is refused.
LORA_FAMILY = ("lora", "qlora", "qlora_ternary", "adalora")
FIXED_RANK = ("lora", "qlora", "qlora_ternary")  # AdaLoRA sets its ranks itself
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "target_modules": (*LORA_FAMILY, "bitfit"),
    "rank": FIXED_RANK,
    "alpha": LORA_FAMILY,
    "dropout": LORA_FAMILY,
    "rslora": FIXED_RANK,
    "init": ("lora",),
    "rank_pattern": FIXED_RANK,
    "rank_budget": FIXED_RANK,
    "bias": FIXED_RANK,
    "packing": ("qlora_ternary",),
    "double_quant": ("qlora",),
    "num_virtual_tokens": ("prefix", "ptuning_v2"),
    "prefix_projection": ("prefix",),
    "encoder_hidden_size": ("prefix",),
    "init_rank": ("adalora",),
    "target_rank": ("adalora",),
    "tinit": ("adalora",),
    "tfinal": ("adalora",),
    "delta_t": ("adalora",),
    "orth_reg_weight": ("adalora",),
    "adapter": (*LORA_FAMILY, "bitfit", "prefix", "ptuning_v2"),
    "base_dtype": ("lora", "adalora", "bitfit", "prefix", "ptuning_v2"),
}


class PEFTConfig(Section):
    """Parameter-efficient fine-tuning: a model transform applied after quantization; the
    base is frozen and only the adapters train. `lora` (and `adalora`) run on `peft`'s
    engine over full-precision or ternary (`BitLinear`) bases; `qlora` freezes a
    full-precision base in NF4 (bitsandbytes), `qlora_ternary` a ternary base as packed
    ternary codes, both under LoRA; `bitfit` trains biases only; `prefix` /
    `ptuning_v2` learn per-layer key/value prefixes. Keys of another method are refused."""

    _path = "peft"

    method: PEFTMethod = Field("none", description="the PEFT method (none: train everything)")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description="module-name globs to adapt; all-linear: every linear but the output head",
    )
    rank: int = Field(8, gt=0, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator: scale = alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    rslora: bool = Field(False, description="rank-stabilized scaling alpha / sqrt(r) (rsLoRA)")
    init: Literal["default", "gaussian", "pissa"] = Field(
        "default",
        description="LoRA init: default (A Kaiming, B zero), gaussian, pissa (principal SVD)",
    )
    rank_pattern: list[str] = Field(
        default_factory=list, description="per-module ranks, 'glob=rank' (e.g. q_proj=16)"
    )
    rank_budget: int | None = Field(
        None,
        gt=0,
        description="choose each module's rank within this many trainable LoRA parameters, "
        "by singular-value energy (None: rank / rank_pattern)",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="biases that also train with LoRA (peft's bias option)"
    )
    packing: Literal["2bit", "base3"] = Field(
        "2bit", description="qlora_ternary's frozen base: 2 bits or base-3 (1.6 bits) per weight"
    )
    double_quant: bool = Field(
        True, description="qlora: quantize NF4's block scales too (QLoRA's double quantization)"
    )
    num_virtual_tokens: int = Field(20, gt=0, description="prefix length per layer")
    prefix_projection: bool = Field(False, description="prefix tuning's MLP reparameterization")
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="hidden size of that MLP (None: the model's)"
    )
    init_rank: int = Field(12, gt=0, description="AdaLoRA's initial rank per module")
    target_rank: int = Field(8, gt=0, description="AdaLoRA's average target rank")
    tinit: int = Field(0, ge=0, description="AdaLoRA: steps before rank pruning starts")
    tfinal: int = Field(0, ge=0, description="AdaLoRA: final steps at the target budget")
    delta_t: int = Field(1, gt=0, description="AdaLoRA: steps between budget allocations")
    orth_reg_weight: float = Field(0.5, ge=0, description="AdaLoRA's orthogonality penalty")
    adapter: str = Field("", description="start from this adapter directory (peft's format)")
    base_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="storage of a full-precision base's frozen linear layers (bfloat16: half "
        "the memory, outputs unchanged under bf16 autocast)",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.method == "adalora" and self.target_rank > self.init_rank:
            raise ConfigError("target_rank", self.target_rank, f"<= init_rank ({self.init_rank})")
        if self.rank_budget is not None and self.rank != 8:
            raise ConfigError("rank", self.rank, "its default when rank_budget chooses the ranks")
        if self.rank_budget is not None and self.rank_pattern:
            raise ConfigError(
                "rank_budget", self.rank_budget, "None when rank_pattern is given (choose one)"
            )
        for item in self.rank_pattern:
            pattern, _, rank = item.rpartition("=")
            if not pattern or not rank.isdigit() or int(rank) < 1:
                raise ConfigError("rank_pattern", item, "'glob=rank' items with a rank >= 1")
        return self

    def rank_of(self) -> dict[str, int]:
        """`rank_pattern` as {glob: rank}."""
        return {p: int(r) for p, _, r in (i.rpartition("=") for i in self.rank_pattern)}
