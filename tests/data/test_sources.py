import pytest

from bitnet_training import BitNetError
from bitnet_training.data import ByteTokenizer, build_datasets
from bitnet_training.data.config import DataConfig


def _files(tmp_path, n):
    paths = []
    for i in range(n):
        p = tmp_path / f"f{i}.txt"
        p.write_text(f"document {i} " * 40)
        paths.append(str(p))
    return paths


def test_files_split_by_file_and_val_files(tmp_path):
    paths = _files(tmp_path, 40)
    d = build_datasets(
        DataConfig(source="files", train_files=paths, seq_len=16, val_fraction=0.3), ByteTokenizer()
    )
    assert 0 < d.info["val_documents"] < 40
    assert d.info["train_documents"] + d.info["val_documents"] == 40
    assert d.val is not None and 0.9 < d.val.bytes_per_token < 1.0  # EOS tokens carry no text
    d2 = build_datasets(
        DataConfig(source="files", train_files=paths[:2], val_files=paths[2:3], seq_len=16),
        ByteTokenizer(),
    )
    assert d2.info["train_documents"] == 2 and d2.info["val_documents"] == 1


def test_a_lone_file_always_trains(tmp_path):
    for i in range(30):  # whichever way its name hashes, a single file is training text
        p = tmp_path / f"only{i}.txt"
        p.write_text("some words " * 50)
        d = build_datasets(
            DataConfig(source="files", train_files=[str(p)], seq_len=16, val_fraction=0.5),
            ByteTokenizer(),
        )
        assert d.info["train_documents"] == 1 and len(d.train) > 0


def test_too_short_for_one_window(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("tiny")
    with pytest.raises(BitNetError, match="fewer than one window of data.seq_len=256"):
        build_datasets(DataConfig(source="files", train_files=[str(p)]), ByteTokenizer())
