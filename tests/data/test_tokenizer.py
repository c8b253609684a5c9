import pytest
import torch

from bitnet_training import ModelConfig
from bitnet_training.data import ByteTokenizer
from bitnet_training.errors import BitNetError


def test_round_trip_any_text():
    tok = ByteTokenizer()
    for text in ["", "hello", "naïve café — 日本語 🙂", "\x00\n\t"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hé") == [104, 0xC3, 0xA9]


def test_special_tokens():
    tok = ByteTokenizer()
    ids = tok.encode("ab", add_bos=True, add_eos=True)
    assert ids == [256, 97, 98, 257]
    assert tok.decode(ids) == "ab"
    assert tok.decode(torch.tensor(ids), skip_special_tokens=False) == "<|bos|>ab<|eos|>"
    assert len(tok) == tok.vocab_size == 259
    assert ModelConfig.preset("tiny").vocab_size >= tok.vocab_size


def test_cut_character_and_bad_id():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"
    with pytest.raises(BitNetError, match="token id 300 is outside"):
        tok.decode([300])
