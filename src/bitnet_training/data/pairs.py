"""Paired text for contrastive training: JSON lines of {"query": ..., "positive": ...}
(`data.source=pairs`), tokenized and right-padded to `seq_len`."""

from __future__ import annotations

import hashlib
import json
import os

import torch

from ..errors import BitNetError


def read_string_records(path: str, what: str, keys: tuple[str, ...], nonempty: bool = False):
    """Yield, one line at a time, the values of `keys` (strings; non-empty with `nonempty`)
    of each object in JSON lines file `path`. A missing file, a line that is not JSON or
    lacks a key is a one-line error naming `what`, the path and the line; an empty file
    yields nothing."""
    if not os.path.isfile(path):
        raise BitNetError(f"{what} {path!r} does not exist")
    need = ("non-empty " if nonempty else "") + "string " + " and ".join(map(repr, keys))
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                raise BitNetError(f"{what} {path!r}: line {i} is not JSON") from None
            values = tuple(row.get(k) for k in keys) if isinstance(row, dict) else (None,)
            if not all(isinstance(v, str) and (v or not nonempty) for v in values):
                raise BitNetError(f"{what} {path!r}: line {i} needs {need}")
            yield values


class PairedTextDataset(torch.utils.data.Dataset):
    """(query, positive) pairs from JSON lines files of {"query": ..., "positive": ...},
    tokenized with `tokenizer` and cut / right-padded to `seq_len` tokens; items are
    {query_ids, query_len, positive_ids, positive_len}. Problems with a file (missing, empty,
    not JSON, missing keys) are one-line errors naming it and the line."""

    def __init__(self, paths: list[str], tokenizer, seq_len: int):
        self.rows: list[tuple[list[int], list[int]]] = []
        digest = hashlib.sha256()
        self.seq_len = seq_len
        pad = getattr(tokenizer, "eos_token_id", 0) or 0
        self.pad = pad
        for path in paths:
            for query, positive in read_string_records(
                path, "paired text file", ("query", "positive"), nonempty=True
            ):
                digest.update(json.dumps([query, positive]).encode())
                self.rows.append(
                    (tokenizer.encode(query)[:seq_len], tokenizer.encode(positive)[:seq_len])
                )
        if len(self.rows) < 2:
            raise BitNetError(
                f"paired text {', '.join(paths)} has {len(self.rows)} pairs: contrastive "
                "training needs at least 2 (the others are the negatives)"
            )

        self.fingerprint = digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.rows)

    def _padded(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids + [self.pad] * (self.seq_len - len(ids)), dtype=torch.long)

    def __getitem__(self, i: int) -> dict:
        q, p = self.rows[i]
        return {
            "query_ids": self._padded(q),
            "query_len": torch.tensor(len(q)),
            "positive_ids": self._padded(p),
            "positive_len": torch.tensor(len(p)),
        }
