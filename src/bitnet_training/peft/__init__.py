"""Parameter-efficient fine-tuning: `apply_peft(model, PEFTConfig(...))`, the adapters
transform of the recipe (LoRA, AdaLoRA, QLoRA, 1.58-bit QLoRA, BitFit, prefix tuning,
P-tuning v2)."""

import logging

from .apply import PEFTReport, apply_peft, resolve_targets, save_adapter, select_ranks
from .config import PEFTConfig, PEFTMethod

# peft imports bitsandbytes when it is installed, and bitsandbytes' CPU backend then warns
# that the optional `kernels` package (which fetches a kernel from the Hugging Face Hub) is
# absent. Its own CPU kernels run instead: the warning is noise here, where nothing may be
# downloaded. Only that one logger is quietened.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = [
    "PEFTConfig",
    "PEFTMethod",
    "PEFTReport",
    "apply_peft",
    "resolve_targets",
    "save_adapter",
    "select_ranks",
]
