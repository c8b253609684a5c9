"""Data: the byte-level tokenizer, the embedded corpus, token-window datasets and sources."""

from .corpus import Document, corpus_fingerprint, embedded_corpus, split_documents
from .dataset import TokenWindowDataset, read_text_files
from .sampler import ResumableBatchSampler
from .sources import Datasets, build_datasets
from .tokenizer import SPECIAL_TOKENS, ByteTokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "ByteTokenizer",
    "Datasets",
    "Document",
    "ResumableBatchSampler",
    "TokenWindowDataset",
    "build_datasets",
    "corpus_fingerprint",
    "embedded_corpus",
    "read_text_files",
    "split_documents",
]
