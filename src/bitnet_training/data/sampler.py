"""A resumable batch order: seeded shuffles per epoch, with a position that checkpoints hold."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from ..errors import BitNetError


class EpochAware:
    """A dataset whose items depend on the epoch (random windows, shuffles, augmentation):
    `set_epoch` (the Trainer calls it) and the epoch as its checkpointed state."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(int(state["epoch"]))


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` indices over `num_items`, in a new seeded order each epoch.

    The order of epoch e is `torch.randperm(num_items)` under a generator seeded with
    `seed + e`, so it depends on nothing else (not on global RNG state, not on how many
    epochs ran in this process). The incomplete last batch of an epoch is dropped, so every
    step sees `batch_size` sequences. `state_dict()` is `{"epoch", "batch"}`: the next batch
    to yield; a sampler loaded from it yields exactly what the original would have.

    Data parallelism: with `world_size` ranks, batch b of the epoch is the global batch
    `order[b*B*W : (b+1)*B*W]` (B = batch_size, W = world_size) and rank `rank` takes its
    `rank`-th slice of B, so W ranks together see exactly what one process sees with B*W.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise BitNetError(f"rank {rank} is outside world_size {world_size}")
        if num_items < batch_size * world_size:
            raise BitNetError(
                f"the training data has {num_items} sequences, fewer than one batch "
                f"(batch_size={batch_size} x {world_size} ranks): add data or lower "
                "training.batch_size"
            )
        self.num_items, self.batch_size, self.seed, self.shuffle = (
            num_items,
            batch_size,
            seed,
            shuffle,
        )
        self.rank, self.world_size = rank, world_size
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        return self.num_items // (self.batch_size * self.world_size)

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
                start = (self.batch * self.world_size + self.rank) * self.batch_size
                self.batch += 1
                yield order[start : start + self.batch_size].tolist()
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


class IterableBatches:
    """Batches of an `IterableDataset` through a `DataLoader` (`workers` processes), with the
    same resumable position as `ResumableBatchSampler`: `{"epoch", "batch"}`. An epoch ends
    when the dataset does (then `set_epoch` moves the dataset on); a loaded position is
    reached by replaying its epoch and skipping the batches already trained on, so the
    resumed run sees exactly the batches the uninterrupted one would have."""

    def __init__(self, dataset, batch_size: int, workers: int = 0):
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.epoch, self.batch = 0, 0
        self.num_items = None

    def __iter__(self):
        from torch.utils.data import DataLoader

        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            loader = DataLoader(
                self.dataset, batch_size=self.batch_size, drop_last=True, num_workers=self.workers
            )
            produced = 0
            for i, batch in enumerate(_one_line_errors(loader)):
                if i < self.batch:
                    continue  # replaying up to the saved position
                produced += 1
                self.batch = i + 1
                yield batch
            if produced == 0 and self.batch == 0:
                raise BitNetError(
                    f"the streaming dataset yields fewer than one batch "
                    f"(batch_size={self.batch_size}): add data or lower training.batch_size"
                )
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "workers": self.workers}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("workers", self.workers)
        if saved != self.workers:  # the order of batches depends on the worker count
            raise BitNetError(
                f"the checkpoint streamed with training.dataloader_workers={saved}, this run "
                f"has {self.workers}: resuming a stream needs the same number"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def _one_line_errors(loader):
    """Iterate `loader`; a BitNetError raised in a DataLoader worker arrives wrapped in a
    multi-line report: re-raise it as the one-line error it was."""
    try:
        yield from loader
    except BitNetError as e:
        text = str(e)
        marker = "BitNetError: "
        raise BitNetError(
            text[text.rfind(marker) + len(marker) :].strip() if marker in text else text
        ) from None
