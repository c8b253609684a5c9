"""Paired text for contrastive training: JSON lines of {"query": ..., "positive": ...}
(`data.source=pairs`), tokenized and right-padded to `seq_len`."""

from __future__ import annotations

import hashlib
import json
import os

import torch

from ..errors import BitNetError


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
            if not os.path.isfile(path):
                raise BitNetError(f"paired text file {path!r} does not exist")
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except (ValueError, UnicodeDecodeError):
                        raise BitNetError(f"{path}: line {i} is not JSON") from None
                    if not (
                        isinstance(row, dict)
                        and isinstance(row.get("query"), str)
                        and isinstance(row.get("positive"), str)
                        and row["query"]
                        and row["positive"]
                    ):
                        raise BitNetError(
                            f"{path}: line {i} needs non-empty string 'query' and 'positive'"
                        )
                    digest.update(line.encode())
                    enc = [tokenizer.encode(row[k])[:seq_len] for k in ("query", "positive")]
                    self.rows.append((enc[0], enc[1]))
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
