"""Training and validation datasets from a `DataConfig`: the embedded corpus or the user's
text files, tokenized into `TokenWindowDataset`s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import BitNetError, ConfigError
from .augment import AugmentedDataset
from .corpus import Document, corpus_fingerprint, embedded_corpus, split_documents
from .dataset import TokenWindowDataset, read_text_files
from .pairs import PairedTextDataset
from .preprocess import expand_inputs, iter_documents
from .shards import ShardDataset, load_index, load_tokenizer
from .streaming import StreamingTextDataset
from .tokenizer import ByteTokenizer

if TYPE_CHECKING:
    from .config import DataConfig


@dataclass
class Datasets:
    """`train` and `val` (None when there is no validation text) plus a description of
    where they came from (`source`, `fingerprint`, document and token counts)."""

    train: TokenWindowDataset
    val: TokenWindowDataset | None
    info: dict


def tokenizer_for(config: DataConfig):
    """The tokenizer of a data source: byte-level, or the one a shard directory was made with."""
    if config.source == "shards":
        return load_tokenizer(config.shards_dir)
    return ByteTokenizer()


def _shard_datasets(config: DataConfig, seed: int) -> Datasets:
    index = load_index(config.shards_dir)
    train = ShardDataset(config.shards_dir, "train", config.seq_len, config.sampling, seed)
    if len(train) == 0:
        raise BitNetError(
            f"the training shards hold {train.num_tokens} tokens, fewer than one window of "
            f"data.seq_len={config.seq_len}"
        )
    val = ShardDataset(config.shards_dir, "val", config.seq_len, "sequential", seed)
    if config.val_files:  # the user's validation text instead of the shards' split
        tok = load_tokenizer(config.shards_dir)
        docs = documents_of(config.val_files, config.jsonl_field)
        val = TokenWindowDataset.from_documents(docs, tok, config.seq_len)
    sp = index["splits"]
    info = {
        "source": "shards",
        "fingerprint": index["fingerprint"],
        "train_documents": sp["train"]["documents"],
        "val_documents": sp["val"]["documents"],
        "train_tokens": train.num_tokens,
        "val_tokens": val.num_tokens if hasattr(val, "num_tokens") else len(val.tokens),
    }
    return Datasets(train, val if len(val) else None, info)


def build_datasets(config: DataConfig, tokenizer, seed: int = 0) -> Datasets:
    """Read, split and tokenize the text `config` names (shards are memory-mapped, already
    tokenized and split), with `config.augment` on the training set. Too little training
    text for one window is a `BitNetError`."""
    if config.source in ("embedded", "shards") and config.train_files:
        raise ConfigError(
            "data.train_files",
            config.train_files,
            f"no files with data.source={config.source} (train on files with "
            "data.source=files or stream)",
        )
    if config.source in ("files", "stream", "pairs") and not config.train_files:
        raise ConfigError(
            "data.train_files",
            config.train_files,
            f"at least one file when data.source is {config.source}",
        )
    mask = config.augment.mask_token_id
    if mask is not None and not 0 <= mask < tokenizer.vocab_size:
        raise ConfigError(
            "data.augment.mask_token_id",
            mask,
            f"a token id of the tokenizer (0..{tokenizer.vocab_size - 1})",
        )
    data = _build(config, tokenizer, seed)
    if config.augment.enabled:
        fill = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        data.train = AugmentedDataset(data.train, config.augment, fill, fill, seed)
    return data


def documents_of(paths: list[str], jsonl_field: str = "text") -> list[Document]:
    """Documents of text / JSON lines / .gz files, directories or globs, read into memory."""
    counts = {"invalid_utf8_replaced": 0, "invalid_utf8_skipped": 0, "empty_documents": 0}
    return [
        Document(f"{p}:{i}", t)
        for p in expand_inputs(paths)
        for i, t in enumerate(iter_documents(p, jsonl_field, "error", counts))
    ]


def build_eval_dataset(config: DataConfig, tokenizer) -> TokenWindowDataset | None:
    """The validation set `config` describes: its `val_files` (any source), else the source's
    own validation split; None when there is none."""
    if config.source == "pairs":
        return (
            PairedTextDataset(config.val_files, tokenizer, config.seq_len)
            if (config.val_files)
            else None
        )
    if config.val_files:
        docs = documents_of(config.val_files, config.jsonl_field)
        val = TokenWindowDataset.from_documents(docs, tokenizer, config.seq_len)
        return val if len(val) else None
    if config.source in ("files", "stream"):
        return None  # their validation text is val_files (or a split of train_files)
    return build_datasets(config, tokenizer).val


def _stream_datasets(config: DataConfig, tokenizer, seed: int) -> Datasets:
    train = StreamingTextDataset(
        config.train_files,
        tokenizer,
        config.seq_len,
        seed,
        config.shuffle_buffer,
        config.jsonl_field,
    )
    val = None
    if config.val_files:
        docs = documents_of(config.val_files, config.jsonl_field)
        val = TokenWindowDataset.from_documents(docs, tokenizer, config.seq_len) if docs else None
    info = {
        "source": "stream",
        "fingerprint": train.fingerprint,
        "train_files": len(train.files),
        "train_tokens": 0,
        "val_tokens": len(val.tokens) if val is not None else 0,
    }
    return Datasets(train, val if val is not None and len(val) else None, info)


def _build(config: DataConfig, tokenizer, seed: int) -> Datasets:
    if config.source == "pairs":
        train = PairedTextDataset(config.train_files, tokenizer, config.seq_len)
        val = build_eval_dataset(config, tokenizer)
        info = {"source": "pairs", "fingerprint": train.fingerprint, "train_pairs": len(train)}
        return Datasets(train, val, {**info, "val_pairs": len(val) if val else 0})
    if config.source == "shards":
        return _shard_datasets(config, seed)
    if config.source == "stream":
        return _stream_datasets(config, tokenizer, seed)
    if config.source == "embedded":
        docs = embedded_corpus()
        if config.val_files:  # validate on the user's text, train on the whole corpus
            train_docs, val_docs = docs, documents_of(config.val_files, config.jsonl_field)
        else:
            train_docs, val_docs = split_documents(docs, config.val_fraction)
        docs = train_docs + val_docs
    else:
        train_docs = read_text_files(config.train_files, "data.train_files")
        if config.val_files:  # text, JSON lines or .gz, as eval reads them
            val_docs = documents_of(config.val_files, config.jsonl_field)
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
