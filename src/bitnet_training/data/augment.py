"""Token-level data augmentation, on the fly and seeded: masking, deletion, neighbour swaps
and span corruption. Off by default."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from ..settings import Section
from .sampler import EpochAware


class AugmentConfig(Section):
    """Token-level augmentation; each probability applies per token position of a training
    window."""

    _path = "data.augment"

    mask_prob: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="replace the input token by mask_token_id (labels keep the original)",
    )
    swap_prob: float = Field(
        0.0, ge=0, lt=1, description="swap the input token with its right neighbour"
    )
    delete_prob: float = Field(
        0.0, ge=0, lt=1, description="drop the token (the window is padded at the end)"
    )
    span_prob: float = Field(
        0.0, ge=0, lt=1, description="start a span there, replaced by one mask (T5-style)"
    )
    span_length: int = Field(3, gt=0, description="tokens per corrupted span")
    mask_token_id: int | None = Field(
        None, ge=0, description="the mask id (None: the tokenizer's pad id, or its EOS)"
    )

    @property
    def enabled(self) -> bool:
        return any((self.mask_prob, self.swap_prob, self.delete_prob, self.span_prob))


class AugmentedDataset(EpochAware, Dataset):
    """`base` (items with `input_ids` and `labels`) with `config`'s augmentations. Item i of
    epoch e is augmented by a generator seeded with (seed, e, i): deterministic, so a resumed
    run sees the same batches; `set_epoch` (the Trainer calls it) changes the draw."""

    def __init__(
        self, base, config: AugmentConfig, mask_token_id: int, pad_token_id: int, seed: int = 0
    ):
        self.base, self.config, self.seed, self.epoch = base, config, seed, 0
        self.mask_id = config.mask_token_id if config.mask_token_id is not None else mask_token_id
        self.pad_id = pad_token_id
        for attr in ("bytes_per_token", "fingerprint"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.base[i]
        c, rng = self.config, np.random.default_rng([self.seed, self.epoch, i, 0xA5])
        x = item["input_ids"].numpy().copy()
        y = item["labels"].numpy().copy()
        n = len(x)
        if c.mask_prob:
            x[rng.random(n) < c.mask_prob] = self.mask_id
        if c.swap_prob:
            j = 0
            draws = rng.random(n)
            while j < n - 1:
                if draws[j] < c.swap_prob:
                    x[j], x[j + 1] = x[j + 1], x[j]
                    j += 2
                else:
                    j += 1
        if c.delete_prob or c.span_prob:
            keep = np.ones(n, dtype=bool) if not c.delete_prob else rng.random(n) >= c.delete_prob
            x2, y2 = [], []
            starts = rng.random(n) < c.span_prob if c.span_prob else np.zeros(n, dtype=bool)
            j = 0
            while j < n:
                if starts[j]:
                    x2.append(self.mask_id)
                    y2.append(self.mask_id)
                    j += c.span_length
                    continue
                if keep[j]:
                    x2.append(x[j])
                    y2.append(y[j])
                j += 1
            pad = n - len(x2)
            x = np.asarray(x2 + [self.pad_id] * pad, dtype=np.int64)
            y = np.asarray(y2 + [-100] * pad, dtype=np.int64)
        return {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y)}
