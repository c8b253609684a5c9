"""Data: the byte-level tokenizer and the embedded corpus."""

from .corpus import Document, corpus_fingerprint, embedded_corpus, split_documents
from .tokenizer import SPECIAL_TOKENS, ByteTokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "ByteTokenizer",
    "Document",
    "corpus_fingerprint",
    "embedded_corpus",
    "split_documents",
]
