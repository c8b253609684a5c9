"""The embedded corpus: English text that ships with every CPython, so nothing is downloaded.

Documents, in a fixed order: each `pydoc_data.topics` entry (the language reference topics
behind `help()`), then the module, class and function docstrings of the standard library's
top-level modules, read with `ast` from their source (nothing is imported or executed).
About 1.1 MB of text on Python 3.11; its exact content follows the running Python version,
so `corpus_fingerprint()` names it in logs and checkpoints.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from dataclasses import dataclass

from ..errors import ConfigError

MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly one-line summaries


@dataclass(frozen=True)
class Document:
    """One unit of text; `name` is stable across runs (the split is decided by it)."""

    name: str
    text: str


def _pydoc_topics() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(f"pydoc:{k}", topics[k].strip()) for k in sorted(topics)]


def _stdlib_docstrings() -> list[Document]:
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for fname in sorted(os.listdir(root)):
        if not fname.endswith(".py"):
            continue
        try:
            with open(os.path.join(root, fname), encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue  # an unreadable or unparsable file contributes nothing
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    label = getattr(node, "name", "<module>")
                    line = getattr(node, "lineno", 0)  # names a method apart from a namesake
                    docs.append(Document(f"doc:{fname[:-3]}.{label}:{line}", doc))
    return docs


def embedded_corpus() -> list[Document]:
    """All documents of the embedded corpus, in a deterministic order."""
    return _pydoc_topics() + _stdlib_docstrings()


def corpus_fingerprint(docs: list[Document]) -> str:
    """A short SHA-256 of the documents' names and texts."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode())
        h.update(b"\0")
        h.update(d.text.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def split_documents(
    docs: list[Document], val_fraction: float = 0.05
) -> tuple[list[Document], list[Document]]:
    """Split by document into (train, validation): a document goes to validation when the
    hash of its name falls below `val_fraction`, so no document straddles the split and the
    split of a document never depends on which others exist."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError("data.val_fraction", val_fraction, "a number in [0, 1)")
    train, val = [], []
    for d in docs:
        u = int.from_bytes(hashlib.sha256(d.name.encode()).digest()[:8], "big") / 2**64
        (val if u < val_fraction else train).append(d)
    return train, val
