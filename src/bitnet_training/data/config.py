"""`DataConfig`: where training text comes from and how it is cut."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .augment import AugmentConfig

DATA_SOURCES = ("embedded", "files", "shards", "stream")


@dataclass
class DataConfig:
    """Where training text comes from and how it is cut.

    source: `embedded` (the corpus shipped with Python, split by document), `files`
        (`train_files`, and `val_files` for validation; without `val_files` the training
        files are split by file with `val_fraction`) or `shards` (`shards_dir`, written by
        `bitnet-train preprocess`: memory-mapped, with its own tokenizer and split) or
        `stream` (`train_files`: text / JSON lines (`jsonl_field`) / .gz, files, directories
        or globs, read lazily with the byte tokenizer, windows shuffled through
        `shuffle_buffer`; `val_files` read into memory; needs `training.max_steps`).
    sampling: for shards, `sequential` (packed windows, shuffled per epoch) or `random`
        (nanoGPT-style windows at random offsets).
    augment: token-level augmentation of the training windows (`AugmentConfig`; off).
    seq_len: tokens per training window.
    val_fraction: share of documents held out for validation.
    """

    source: str = "embedded"
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    shards_dir: str = ""
    sampling: str = "sequential"
    shuffle_buffer: int = 1024
    jsonl_field: str = "text"
    seq_len: int = 256
    val_fraction: float = 0.05
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if self.source not in DATA_SOURCES:
            raise ConfigError("data.source", self.source, " or ".join(DATA_SOURCES))
        if not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool) or self.seq_len < 2:
            raise ConfigError("data.seq_len", self.seq_len, "an integer >= 2")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("data.val_fraction", self.val_fraction, "a number in [0, 1)")
        if self.sampling not in ("sequential", "random"):
            raise ConfigError("data.sampling", self.sampling, "sequential or random")
        if self.source == "shards" and not self.shards_dir:
            raise ConfigError(
                "data.shards_dir", self.shards_dir, "a directory written by bitnet-train preprocess"
            )
        if not isinstance(self.shuffle_buffer, int) or self.shuffle_buffer < 0:
            raise ConfigError("data.shuffle_buffer", self.shuffle_buffer, "an integer >= 0")
        if self.augment.enabled and self.source == "stream":
            raise ConfigError(
                "data.augment",
                "on",
                "off with data.source=stream (augmentation applies to embedded, files and shards)",
            )
        if self.source == "files":
            odd = [
                f
                for f in self.train_files + self.val_files
                if f.endswith((".gz", ".jsonl", ".json", ".ndjson"))
            ]
            if odd:
                raise ConfigError(
                    "data.train_files",
                    odd[0],
                    "plain text files with data.source=files (JSON lines and .gz: "
                    "data.source=stream, or bitnet-train preprocess)",
                )
