"""`DataConfig`: where training text comes from and how it is cut."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..errors import ConfigError
from ..settings import Section
from .augment import AugmentConfig


class DataConfig(Section):
    """Where training text comes from and how it is cut."""

    _path = "data"

    source: Literal["embedded", "files", "shards", "stream", "pairs"] = Field(
        "embedded",
        description="embedded: the corpus shipped with Python; files: train_files (plain "
        "text); shards: shards_dir from `bitnet-train preprocess`; stream: train_files read "
        "lazily (text, JSON lines, .gz, directories, globs; needs training.max_steps); pairs: "
        "train_files / val_files are JSON lines of {query, positive} (loss.objective="
        "contrastive). Default: files when train_files is given, else embedded",
    )
    train_files: list[str] = Field(
        default_factory=list,
        description="training files; giving them implies source: files (with source embedded "
        "or shards they are refused)",
    )
    val_files: list[str] = Field(
        default_factory=list,
        description="validation files: text, JSON lines or .gz, for any source (without "
        "them: the source's own split)",
    )
    shards_dir: str = Field("", description="shards: the directory `preprocess` wrote")
    sampling: Literal["sequential", "random"] = Field(
        "sequential",
        description="shards: packed windows shuffled per epoch, or nanoGPT-style random offsets",
    )
    shuffle_buffer: int = Field(1024, ge=0, description="stream: windows shuffled together")
    jsonl_field: str = Field(
        "text", description="the JSON lines field holding text (stream, and val_files)"
    )
    seq_len: int = Field(256, ge=2, description="tokens per training window")
    val_fraction: float = Field(
        0.05, ge=0, lt=1, description="share of documents held out for validation"
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="token-level augmentation (off)"
    )

    @model_validator(mode="before")
    @classmethod
    def _files_imply_source(cls, data):
        if isinstance(data, dict) and data.get("train_files") and "source" not in data:
            return {**data, "source": "files"}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.source == "shards" and not self.shards_dir:
            raise ConfigError(
                "shards_dir", self.shards_dir, "a directory written by bitnet-train preprocess"
            )
        if self.augment.enabled and self.source in ("stream", "pairs"):
            raise ConfigError(
                "augment",
                "on",
                f"off with data.source={self.source} (augmentation applies to embedded, files "
                "and shards)",
            )
        odd = [f for f in self.train_files if f.endswith(JSON_OR_GZ)]  # val_files may be
        if self.source == "files" and odd:
            raise ConfigError(
                "train_files",
                odd[0],
                "plain text files with data.source=files (JSON lines and .gz: "
                "data.source=stream, or bitnet-train preprocess)",
            )
        return self


JSON_OR_GZ = (".gz", ".jsonl", ".json", ".ndjson")
