import pytest
import torch

from bitnet_training import BitNetError
from bitnet_training.data import (
    ByteTokenizer,
    Document,
    ResumableBatchSampler,
    TokenWindowDataset,
    read_text_files,
)


def test_windows_make_every_token_a_target_once():
    tokens = torch.arange(1, 32, dtype=torch.int32)  # 31 tokens
    ds = TokenWindowDataset(tokens, seq_len=6)
    assert len(ds) == 6  # (31 - 1) // 5
    targets = torch.cat([ds[i]["labels"][1:] for i in range(len(ds))])
    assert targets.tolist() == list(range(2, 32))
    assert ds[0]["input_ids"].dtype == torch.int64
    assert torch.equal(ds[1]["input_ids"], torch.tensor([6, 7, 8, 9, 10, 11]))
    with pytest.raises(IndexError):
        ds[6]


def test_from_documents_separates_with_eos_and_counts_bytes():
    tok = ByteTokenizer()
    ds = TokenWindowDataset.from_documents([Document("a", "héllo"), Document("b", "ok")], tok, 4)
    assert ds.tokens.tolist() == [*"héllo".encode(), tok.eos_token_id, *b"ok", tok.eos_token_id]
    assert ds.bytes_per_token == pytest.approx(8 / 10)


def test_read_text_files_errors(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("some text\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x7fELF\x00\x01\x02")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    assert read_text_files([str(good)])[0].text == "some text\n"
    cases = [
        (tmp_path / "nope.txt", "does not exist"),
        (empty, "is empty"),
        (binary, "is a binary file"),
        (latin, "is not UTF-8 text"),
        (tmp_path, "is a directory"),
    ]
    for path, msg in cases:
        with pytest.raises(BitNetError, match=msg) as e:
            read_text_files([str(path)], "data.val_files")
        assert str(e.value).startswith("data.val_files: ") and str(path) in str(e.value)
        assert "\n" not in str(e.value)


def test_sampler_orders_and_resumes():
    s = ResumableBatchSampler(10, 3, seed=7)
    it = iter(s)
    epoch0 = [next(it) for _ in range(3)]  # 3 full batches; the 10th item is dropped
    assert len({i for b in epoch0 for i in b}) == 9
    state = s.state_dict()
    assert state == {"epoch": 0, "batch": 3}
    rest = [next(it) for _ in range(4)]
    s2 = ResumableBatchSampler(10, 3, seed=7)
    s2.load_state_dict(state)
    it2 = iter(s2)
    assert [next(it2) for _ in range(4)] == rest
    # Each epoch has its own order, fixed by (seed, epoch) alone.
    fresh = ResumableBatchSampler(10, 3, seed=7)
    fresh.load_state_dict({"epoch": 1, "batch": 0})
    assert next(iter(fresh)) == rest[0] and rest[0] != epoch0[0]


def test_sampler_needs_one_batch():
    with pytest.raises(BitNetError, match="fewer than one batch"):
        ResumableBatchSampler(2, 4)
