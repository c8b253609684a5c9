"""Reading token shards written by `preprocess`: the index, the tokenizer, and a
memory-mapped dataset that never loads the shards into RAM."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import BitNetError, ConfigError
from .preprocess import FORMAT_VERSION
from .sampler import EpochAware
from .tokenizer import ByteTokenizer, HFTokenizer

SAMPLING = ("sequential", "random")


def load_index(directory: str) -> dict:
    """`index.json` of a shard directory, checked; a one-line `BitNetError` otherwise."""
    path = os.path.join(directory, "index.json")
    if not os.path.isdir(directory):
        raise BitNetError(f"data.shards_dir {directory!r} does not exist")
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise BitNetError(
            f"data.shards_dir {directory!r} has no index.json (run bitnet-train preprocess)"
        ) from None
    except (OSError, ValueError) as e:
        raise BitNetError(f"{path!r} is unreadable: {e}") from None
    version = index.get("format_version") if isinstance(index, dict) else None
    if version != FORMAT_VERSION:
        raise BitNetError(
            f"{path!r} has format version {version!r}; this bitnet-training reads version "
            f"{FORMAT_VERSION}"
        )
    return index


def load_tokenizer(directory: str):
    """The tokenizer a shard directory was made with."""
    tok = load_index(directory)["tokenizer"]
    if tok["kind"] == "byte":
        return ByteTokenizer()
    return HFTokenizer(os.path.join(directory, "tokenizer.json"))


class ShardDataset(EpochAware, Dataset):
    """Windows of `seq_len` tokens over one split of a shard directory, memory-mapped.

    sampling="sequential": the split's documents as one packed stream (EOS between
    documents), cut like `TokenWindowDataset` (windows overlap by one token, so each token is
    a target once per epoch); the Trainer's sampler shuffles their order each epoch.
    sampling="random": nanoGPT-style windows at random offsets; item i of epoch e always
    starts at the same offset (a generator seeded by seed, e and i), so a resumed run sees
    the same windows; `set_epoch(e)` (the Trainer calls it) draws new ones. Items are
    `{"input_ids", "labels"}` int64 tensors. `bytes_per_token` gives bits per byte.
    """

    def __init__(
        self,
        directory: str,
        split: str = "train",
        seq_len: int = 256,
        sampling: str = "sequential",
        seed: int = 0,
    ):
        if sampling not in SAMPLING:
            raise ConfigError("data.sampling", sampling, " or ".join(SAMPLING))
        index = load_index(directory)
        if split not in index["splits"]:
            raise BitNetError(f"{directory!r} has no {split!r} split")
        sp = index["splits"][split]
        self.directory, self.split, self.seq_len = directory, split, seq_len
        self.sampling, self.seed, self.epoch = sampling, seed, 0
        self.dtype = np.dtype(index["dtype"])
        self.files = [os.path.join(directory, s["file"]) for s in sp["shards"]]
        sizes = [s["tokens"] for s in sp["shards"]]
        for f, shard in zip(self.files, sp["shards"], strict=True):
            n, idx = shard["tokens"], f[: -len(".bin")] + ".idx"
            if not os.path.isfile(f) or os.path.getsize(f) != n * self.dtype.itemsize:
                raise BitNetError(f"shard {f!r} is missing or truncated (expected {n} tokens)")
            if not os.path.isfile(idx) or os.path.getsize(idx) != 8 * shard["documents"]:
                raise BitNetError(f"shard index {idx!r} is missing or truncated")
        self.bounds = np.cumsum([0, *sizes])
        self.num_tokens = int(self.bounds[-1])
        self.bytes_per_token = sp["bytes"] / max(1, self.num_tokens)
        self.index_fingerprint = index["fingerprint"]
        self._maps: list[np.memmap] | None = None

    @functools.cached_property
    def fingerprint(self) -> str:
        return f"{self.index_fingerprint}:{self.split}:{self.seq_len}:{self.sampling}"

    def _mmaps(self) -> list[np.memmap]:
        if self._maps is None:  # opened lazily: a pickled dataset (DataLoader worker) reopens
            self._maps = [np.memmap(f, dtype=self.dtype, mode="r") for f in self.files]
        return self._maps

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def __len__(self) -> int:
        if self.num_tokens < self.seq_len:
            return 0
        return (self.num_tokens - 1) // (self.seq_len - 1)

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the split's stream, across shard boundaries."""
        maps, out = self._mmaps(), []
        s = int(np.searchsorted(self.bounds, start, side="right") - 1)
        while start < end:
            lo = start - self.bounds[s]
            hi = min(end, self.bounds[s + 1]) - self.bounds[s]
            out.append(np.asarray(maps[s][lo:hi]))
            start = int(self.bounds[s] + hi)
            s += 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        if self.sampling == "sequential":
            start = i * (self.seq_len - 1)
        else:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            start = int(rng.integers(0, self.num_tokens - self.seq_len + 1))
        w = torch.from_numpy(self.tokens(start, start + self.seq_len).astype(np.int64))
        return {"input_ids": w, "labels": w}
