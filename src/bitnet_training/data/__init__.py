"""Data: the byte-level tokenizer, the embedded corpus, token-window datasets and sources."""

from .corpus import Document, corpus_fingerprint, embedded_corpus, split_documents
from .dataset import TokenWindowDataset, read_text_files
from .preprocess import PreprocessConfig, preprocess
from .sampler import ResumableBatchSampler
from .shards import ShardDataset, load_index, load_tokenizer
from .sources import Datasets, build_datasets, build_eval_dataset, tokenizer_for
from .streaming import StreamingTextDataset
from .tokenizer import SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, tokenizer_id

__all__ = [
    "SPECIAL_TOKENS",
    "ByteTokenizer",
    "Datasets",
    "Document",
    "HFTokenizer",
    "PreprocessConfig",
    "ResumableBatchSampler",
    "ShardDataset",
    "StreamingTextDataset",
    "TokenWindowDataset",
    "build_datasets",
    "build_eval_dataset",
    "corpus_fingerprint",
    "embedded_corpus",
    "load_index",
    "load_tokenizer",
    "preprocess",
    "read_text_files",
    "split_documents",
    "tokenizer_for",
    "tokenizer_id",
]
