import pytest
import torch

from bitnet_training import ConfigError
from bitnet_training.data import TokenWindowDataset
from bitnet_training.data.augment import AugmentConfig, AugmentedDataset

MASK, PAD = 300, 301


def _data(n=400, seq=64):
    tokens = torch.arange(n * (seq - 1) + 1) % 250  # no token equals MASK or PAD
    return TokenWindowDataset(tokens.int(), seq)


def _all(ds):
    return [ds[i] for i in range(len(ds))]


def test_off_by_default_and_identity():
    assert not AugmentConfig().enabled
    base = _data(10)
    aug = AugmentedDataset(base, AugmentConfig(), MASK, PAD)
    for a, b in zip(_all(aug), _all(base), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_masking_rate_and_clean_labels():
    base = _data()
    items = _all(AugmentedDataset(base, AugmentConfig(mask_prob=0.15), MASK, PAD, seed=1))
    masked = torch.stack([x["input_ids"] == MASK for x in items]).float().mean().item()
    assert masked == pytest.approx(0.15, abs=0.01)  # 25,600 draws: sd 0.002
    assert all(torch.equal(x["labels"], base[i]["labels"]) for i, x in enumerate(items))


def test_swap_rate():
    base = _data()
    items = _all(AugmentedDataset(base, AugmentConfig(swap_prob=0.1), MASK, PAD, seed=2))
    moved = torch.stack([x["input_ids"] != base[i]["input_ids"] for i, x in enumerate(items)])
    # Each swap moves 2 tokens; a draw at a position already swapped is skipped, so the
    # rate of swap starts is p / (1 + p) per position.
    assert moved.float().mean().item() == pytest.approx(2 * 0.1 / 1.1, abs=0.01)
    assert all(
        sorted(x["input_ids"].tolist()) == sorted(base[i]["input_ids"].tolist())
        for i, x in enumerate(items)
    )


def test_deletion_rate_and_padding():
    base = _data()
    items = _all(AugmentedDataset(base, AugmentConfig(delete_prob=0.2), MASK, PAD, seed=3))
    pads = torch.stack([x["input_ids"] == PAD for x in items]).float().mean().item()
    assert pads == pytest.approx(0.2, abs=0.01)
    for x in items:
        keep = x["input_ids"] != PAD
        assert (x["labels"][~keep] == -100).all()
        assert torch.equal(x["labels"][keep], x["input_ids"][keep])


def test_span_corruption():
    base = _data()
    cfg = AugmentConfig(span_prob=0.05, span_length=4)
    items = _all(AugmentedDataset(base, cfg, MASK, PAD, seed=4))
    spans = sum(int((x["input_ids"] == MASK).sum()) for x in items)
    expected = 400 * 64 * 0.05 / (1 + 0.05 * (4 - 1))  # starts are skipped inside a span
    assert spans == pytest.approx(expected, rel=0.1)
    assert all(len(x["input_ids"]) == 64 for x in items)


def test_seeded_per_epoch():
    base = _data(20)
    aug = AugmentedDataset(base, AugmentConfig(mask_prob=0.3), MASK, PAD, seed=5)
    first = [x["input_ids"] for x in _all(aug)]
    assert all(torch.equal(a, x["input_ids"]) for a, x in zip(first, _all(aug), strict=True))
    aug.set_epoch(1)
    assert not all(torch.equal(a, x["input_ids"]) for a, x in zip(first, _all(aug), strict=True))


def test_validation():
    with pytest.raises(ConfigError, match="data.augment.mask_prob"):
        AugmentConfig(mask_prob=1.5)
