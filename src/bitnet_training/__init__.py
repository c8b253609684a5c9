"""bitnet-training: quantization-aware training of BitNet (1-bit / 1.58-bit) models on PyTorch."""

from .errors import BitNetError, ConfigError
from .loss import ContrastiveLoss, DistillLoss, LMLoss, LossConfig
from .models import BitNetLM, ModelConfig
from .nn import BitLinear, ConversionReport, RMSNorm, quantize_model
from .peft import PEFTConfig, apply_peft
from .quant import FakeQuantize, QATConfig, QuantSpec
from .train import Callback, Trainer, TrainingCallbacks, TrainingConfig, TrainResult

__version__ = "0.1.0"

__all__ = [
    "BitLinear",
    "BitNetError",
    "BitNetLM",
    "Callback",
    "ConfigError",
    "ContrastiveLoss",
    "ConversionReport",
    "DistillLoss",
    "FakeQuantize",
    "LMLoss",
    "LossConfig",
    "ModelConfig",
    "PEFTConfig",
    "QATConfig",
    "QuantSpec",
    "RMSNorm",
    "TrainResult",
    "Trainer",
    "TrainingCallbacks",
    "TrainingConfig",
    "apply_peft",
    "quantize_model",
]
