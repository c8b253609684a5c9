"""BLEU and chrF of generated text against references, through sacrebleu, streaming.

sacrebleu scores a corpus from sufficient statistics summed over its sentences (n-gram
matches and totals, lengths; character / word n-gram counts for chrF): `GenerationScores`
keeps only those sums, one pair of (hypothesis, reference) at a time, and its corpus scores
equal `sacrebleu.corpus_bleu` / `corpus_chrf` over the same pairs (tested). Defaults are
sacrebleu's (BLEU with 13a tokenization and exponential smoothing; chrF with n = 6, beta 2).
"""

from __future__ import annotations

import importlib.util

from ..data.pairs import read_string_records
from ..errors import BitNetError


class GenerationScores:
    """Streaming corpus BLEU and chrF: `update(hypothesis, reference)` per pair, then
    `compute()` -> {"bleu": .., "chrf": ..} (sacrebleu's 0-100 scores)."""

    def __init__(self):
        if importlib.util.find_spec("sacrebleu") is None:
            raise BitNetError("BLEU / chrF need sacrebleu (pip install 'bitnet-training[metrics]')")
        from sacrebleu.metrics import BLEU, CHRF

        self.metrics = {"bleu": BLEU(), "chrf": CHRF()}
        self.sums: dict[str, list[float] | None] = dict.fromkeys(self.metrics)
        self.count = 0

    def update(self, hypothesis: str, reference: str) -> None:
        for name, metric in self.metrics.items():
            stats = metric._extract_corpus_statistics([hypothesis], [[reference]])[0]
            old = self.sums[name]
            summed = stats if old is None else [a + b for a, b in zip(old, stats, strict=True)]
            self.sums[name] = list(summed)
        self.count += 1

    def compute(self) -> dict[str, float]:
        if not self.count:
            raise BitNetError("no generation pairs were scored")
        return {
            name: float(m._compute_score_from_stats(self.sums[name]).score)
            for name, m in self.metrics.items()
        }


def read_pairs(path: str):
    """Yield (prompt, reference) from a JSON-lines file of {"prompt": ..., "reference": ...}
    objects, one line at a time. A missing, empty or malformed file is a one-line error."""
    n = 0
    for prompt, reference in read_string_records(path, "generation file", ("prompt", "reference")):
        n += 1
        yield prompt, reference
    if n == 0:
        raise BitNetError(f"generation file {path!r} has no prompt / reference pairs")
