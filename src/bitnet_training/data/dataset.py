"""A token-window dataset over documents, and reading the user's text files.

Small and replaceable: the whole token stream lives in memory (fine for the embedded corpus
and files of a few hundred MB); memory-mapped shards and streaming come with the data pipeline.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from ..errors import BitNetError
from .corpus import Document


class TokenWindowDataset(Dataset):
    """Fixed-length windows over one token stream, for causal language modelling.

    Window i covers tokens [i*(seq_len-1), i*(seq_len-1) + seq_len): consecutive windows
    share one token, so with the model's shift every token after the first is a prediction
    target exactly once (validation losses cover the whole text). Items are
    `{"input_ids": (seq_len,), "labels": (seq_len,)}` int64 tensors, labels equal to the
    inputs (the model shifts them, as Hugging Face causal LMs do).

    `bytes_per_token` (UTF-8 bytes of text per token) turns a loss per token into bits per
    byte, a figure that does not depend on the tokenizer.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, bytes_per_token: float | None = None):
        if tokens.ndim != 1:
            raise BitNetError(f"tokens must be one stream (1-D), got shape {tuple(tokens.shape)}")
        if seq_len < 2:
            raise BitNetError(f"seq_len={seq_len} is invalid: expected an integer >= 2")
        self.tokens, self.seq_len, self.bytes_per_token = tokens, seq_len, bytes_per_token

    @classmethod
    def from_documents(
        cls, docs: Sequence[Document], tokenizer, seq_len: int
    ) -> TokenWindowDataset:
        """Tokenize `docs` in order, each followed by the tokenizer's EOS, into one stream."""
        ids: list[int] = []
        n_bytes = 0
        for d in docs:
            ids.extend(tokenizer.encode(d.text, add_eos=True))
            n_bytes += len(d.text.encode("utf-8"))
        # int32 halves the stream's memory; windows are widened to int64 on access.
        tokens = torch.tensor(ids, dtype=torch.int32)
        return cls(tokens, seq_len, n_bytes / max(1, len(ids)))

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short SHA-256 of the token stream and window length: the Trainer stores it in
        checkpoints and refuses to resume on different data."""
        h = hashlib.sha256(str(self.seq_len).encode())
        h.update(self.tokens.to(torch.int64).numpy().tobytes())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // (self.seq_len - 1))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = i * (self.seq_len - 1)
        w = self.tokens[start : start + self.seq_len].long()
        return {"input_ids": w, "labels": w}


def read_text_files(paths: Sequence[str], what: str = "data.train_files") -> list[Document]:
    """One `Document` per file. A missing, unreadable, empty or non-text (binary or invalid
    UTF-8) file is a `BitNetError` naming `what` and the file."""
    docs = []
    for path in paths:
        if not os.path.exists(path):
            raise BitNetError(f"{what}: {path!r} does not exist")
        if os.path.isdir(path):
            raise BitNetError(f"{what}: {path!r} is a directory, expected a text file")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise BitNetError(f"{what}: cannot read {path!r}: {e.strerror}") from None
        if b"\0" in raw[:65536]:
            raise BitNetError(f"{what}: {path!r} is a binary file, expected UTF-8 text")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BitNetError(
                f"{what}: {path!r} is not UTF-8 text (invalid byte at offset {e.start})"
            ) from None
        if not text.strip():
            raise BitNetError(f"{what}: {path!r} is empty")
        docs.append(Document(f"file:{os.path.abspath(path)}", text))
    return docs
