"""Parallelism and memory layouts of a model, applied by the recipe as its last transform
(torchtitan's order: pipeline split, tensor parallel, activation checkpointing, FSDP / DDP)."""

from .activation_checkpoint import apply_activation_checkpointing

__all__ = ["apply_activation_checkpointing"]
