"""Parameter-efficient fine-tuning: `apply_peft(model, PEFTConfig(...))`, the adapters
transform of the recipe (LoRA, AdaLoRA, 1.58-bit QLoRA, BitFit, prefix tuning, P-tuning v2)."""

from .apply import PEFTReport, apply_peft, resolve_targets, save_adapter, select_ranks
from .config import PEFTConfig, PEFTMethod

__all__ = [
    "PEFTConfig",
    "PEFTMethod",
    "PEFTReport",
    "apply_peft",
    "resolve_targets",
    "save_adapter",
    "select_ranks",
]
