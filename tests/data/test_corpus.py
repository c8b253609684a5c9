import pytest

from bitnet_training.data import Document, corpus_fingerprint, embedded_corpus, split_documents
from bitnet_training.errors import ConfigError


def test_embedded_corpus_is_deterministic_and_substantial():
    a, b = embedded_corpus(), embedded_corpus()
    assert a == b and corpus_fingerprint(a) == corpus_fingerprint(b)
    assert len({d.name for d in a}) == len(a)  # names are unique
    assert sum(len(d.text) for d in a) > 500_000  # ~1.1 MB on CPython 3.11
    assert any(d.name.startswith("pydoc:") for d in a)
    assert any(d.name.startswith("doc:") for d in a)


def test_split_is_by_document_and_stable():
    docs = embedded_corpus()
    train, val = split_documents(docs, 0.05)
    assert len(train) + len(val) == len(docs)
    assert not {d.name for d in train} & {d.name for d in val}
    assert 0.02 < len(val) / len(docs) < 0.09
    # A document's side does not depend on which other documents exist.
    _, val2 = split_documents(docs[::2], 0.05)
    assert {d.name for d in val2} == {d.name for d in val} & {d.name for d in docs[::2]}
    assert split_documents(docs, 0.0)[1] == []


def test_bad_fraction_and_fingerprint_changes():
    with pytest.raises(ConfigError, match="data.val_fraction=1.5"):
        split_documents([], 1.5)
    a = [Document("x", "one")]
    assert corpus_fingerprint(a) != corpus_fingerprint([Document("x", "two")])
