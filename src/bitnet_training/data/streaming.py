"""A streaming dataset: reads text / JSON lines (.gz too) lazily, tokenizes on the fly, and
divides the documents among DataLoader workers and distributed ranks."""

from __future__ import annotations

import functools
import hashlib
import os
import random
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import BitNetError
from .preprocess import expand_inputs, iter_documents
from .sampler import EpochAware


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamingTextDataset(EpochAware, IterableDataset):
    """Windows of `seq_len` tokens from `inputs` (files, directories, globs), never holding
    more than one document and the shuffle buffer in memory.

    Documents are numbered in a fixed order (files in order, documents in each file); with
    R ranks and W DataLoader workers per rank, document k goes to the stream of
    (rank, worker) = divmod(k % (R * W), W): no document is read by two streams and none is
    left out. Each stream packs its documents (EOS after each) into windows that overlap by
    one token (every token a target once); its last, shorter window is padded (labels -100).
    `shuffle_buffer` > 0 shuffles windows through a buffer of that size, seeded by (seed,
    epoch, rank, worker). `set_epoch` (the Trainer calls it) changes the shuffle; iteration
    is deterministic for a given epoch, which is how the Trainer resumes it exactly (it
    replays the epoch up to the saved batch).
    """

    def __init__(
        self,
        inputs: list[str],
        tokenizer,
        seq_len: int = 256,
        seed: int = 0,
        shuffle_buffer: int = 0,
        jsonl_field: str = "text",
        invalid_utf8: str = "error",
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.files = expand_inputs(inputs)
        self.tokenizer, self.seq_len, self.seed = tokenizer, seq_len, seed
        self.shuffle_buffer, self.jsonl_field, self.invalid_utf8 = (
            shuffle_buffer,
            jsonl_field,
            invalid_utf8,
        )
        r, w = _rank_and_world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise BitNetError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.epoch = 0
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or tokenizer.eos_token_id

    @functools.cached_property
    def fingerprint(self) -> str:
        """The inputs (path, size, mtime) and settings: the Trainer refuses to resume a
        stream on anything else."""
        h = hashlib.sha256()
        for f in self.files:
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}\0".encode())
        h.update(
            f"{self.seq_len}:{self.seed}:{self.shuffle_buffer}:{self.jsonl_field}:"
            f"{self.rank}:{self.world_size}".encode()
        )
        return h.hexdigest()[:16]

    def documents(self, stream: int, num_streams: int) -> Iterator[str]:
        """The documents of stream `stream` out of `num_streams` (every k-th document)."""
        counts = {"invalid_utf8_replaced": 0, "invalid_utf8_skipped": 0, "empty_documents": 0}
        k = 0
        for path in self.files:
            for text in iter_documents(path, self.jsonl_field, self.invalid_utf8, counts):
                if k % num_streams == stream:
                    yield text
                k += 1

    def windows(self, stream: int, num_streams: int) -> Iterator[dict[str, torch.Tensor]]:
        """Packed windows of one stream, before shuffling."""
        buf: list[int] = []
        step = self.seq_len - 1
        for text in self.documents(stream, num_streams):
            buf.extend(self.tokenizer.encode(text, add_eos=True))
            while len(buf) >= self.seq_len:
                w = torch.tensor(buf[: self.seq_len])
                yield {"input_ids": w, "labels": w}
                del buf[:step]
        if len(buf) > 1:  # the tail: padded, the padding is not a target
            n = len(buf)
            ids = torch.tensor(buf + [self.pad_id] * (self.seq_len - n))
            labels = ids.clone()
            labels[n:] = -100
            yield {"input_ids": ids, "labels": labels}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        num_streams = self.world_size * workers
        stream = self.rank * workers + worker
        items = self.windows(stream, num_streams)
        if self.shuffle_buffer <= 0:
            yield from items
            return
        # Seeded by the numbers themselves (not hash(), which varies between processes).
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
        buffer: list = []
        for item in items:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            j = rng.randrange(len(buffer))
            yield buffer[j]
            buffer[j] = item
        rng.shuffle(buffer)
        yield from buffer
