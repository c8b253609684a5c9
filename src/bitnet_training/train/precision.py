"""Where a run executes: the device, and the numeric precision that is fastest there."""

from __future__ import annotations

import torch

from ..errors import BitNetError


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BitNetError("training.device='cuda' but no CUDA device is available")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` -> what runs fastest here: bf16 on CPUs (measured about 2x fp32 on AVX-512;
    fp16 matmuls are about 100x slower there) and on GPUs that support it, else fp16."""
    if name != "auto":
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise BitNetError("training.mixed_precision='bf16' but this GPU has no bf16 support")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"
