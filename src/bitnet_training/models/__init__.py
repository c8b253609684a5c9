"""Model architectures."""

from .bitnet import BitNetLM, CausalLMOutput
from .config import PRESETS, ModelConfig

__all__ = ["PRESETS", "BitNetLM", "CausalLMOutput", "ModelConfig"]
