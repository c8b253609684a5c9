"""A resumable batch order: seeded shuffles per epoch, with a position that checkpoints hold."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from ..errors import BitNetError


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` indices over `num_items`, in a new seeded order each epoch.

    The order of epoch e is `torch.randperm(num_items)` under a generator seeded with
    `seed + e`, so it depends on nothing else (not on global RNG state, not on how many
    epochs ran in this process). The incomplete last batch of an epoch is dropped, so every
    step sees `batch_size` sequences. `state_dict()` is `{"epoch", "batch"}`: the next batch
    to yield; a sampler loaded from it yields exactly what the original would have.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if num_items < batch_size:
            raise BitNetError(
                f"the training data has {num_items} sequences, fewer than one batch "
                f"(batch_size={batch_size}): add data or lower training.batch_size"
            )
        self.num_items, self.batch_size, self.seed, self.shuffle = (
            num_items,
            batch_size,
            seed,
            shuffle,
        )
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        return self.num_items // self.batch_size

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_items)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_items, generator=g)

    def __iter__(self):
        """Yield batches forever, from the saved position on, advancing epochs."""
        while True:
            order = self._order(self.epoch)
            while self.batch < len(self):
                b = self.batch
                self.batch += 1
                yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
