"""Training and validation datasets from a `DataConfig`: the embedded corpus or the user's
text files, tokenized into `TokenWindowDataset`s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import BitNetError
from .corpus import corpus_fingerprint, embedded_corpus, split_documents
from .dataset import TokenWindowDataset, read_text_files

if TYPE_CHECKING:
    from ..config import DataConfig


@dataclass
class Datasets:
    """`train` and `val` (None when there is no validation text) plus a description of
    where they came from (`source`, `fingerprint`, document and token counts)."""

    train: TokenWindowDataset
    val: TokenWindowDataset | None
    info: dict


def build_datasets(config: DataConfig, tokenizer) -> Datasets:
    """Read, split and tokenize the text `config` names. Too little training text for one
    window is a `BitNetError`."""
    if config.source == "embedded":
        docs = embedded_corpus()
        train_docs, val_docs = split_documents(docs, config.val_fraction)
    else:
        train_docs = read_text_files(config.train_files, "data.train_files")
        if config.val_files:
            val_docs = read_text_files(config.val_files, "data.val_files")
        else:
            train_docs, val_docs = split_documents(train_docs, config.val_fraction)
            if not train_docs:  # a lone file hashed into validation: train on it instead
                train_docs, val_docs = val_docs, []
        docs = train_docs + val_docs
    train = TokenWindowDataset.from_documents(train_docs, tokenizer, config.seq_len)
    if len(train) == 0:
        raise BitNetError(
            f"the training text has {len(train.tokens)} tokens, fewer than one window of "
            f"data.seq_len={config.seq_len}: add text or lower data.seq_len"
        )
    val = (
        TokenWindowDataset.from_documents(val_docs, tokenizer, config.seq_len) if val_docs else None
    )
    if val is not None and len(val) == 0:
        val = None  # too short for one window: validation is skipped, and the summary says so
    info = {
        "source": config.source,
        "fingerprint": corpus_fingerprint(docs),
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "train_tokens": len(train.tokens),
        "val_tokens": len(val.tokens) if val is not None else 0,
    }
    return Datasets(train, val, info)
