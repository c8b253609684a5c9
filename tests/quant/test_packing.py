"""Ternary packing: 2-bit, base-3 and transformers' layout; round trips, exact bytes computed
by hand, transformers' own pack_weights, and every bad input."""

import pytest
import torch

from bitnet_training.errors import BitNetError
from bitnet_training.quant.packing import (
    pack_2bit,
    pack_base3,
    pack_ternary_transformers,
    unpack_2bit,
    unpack_base3,
    unpack_ternary,
)

FORMATS = {"2bit": (pack_2bit, unpack_2bit, 4), "base3": (pack_base3, unpack_base3, 5)}
SHAPES = [(0,), (1,), (3,), (4,), (5,), (7,), (8,), (10,), (1001,), (3, 7, 5), (2, 0, 3), (64, 96)]


def random_codes(shape, dtype=torch.int8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g).to(dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_any_size(fmt, shape):
    pack, unpack, per_byte = FORMATS[fmt]
    codes = random_codes(shape)
    before = codes.clone()
    packed = pack(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (-(-codes.numel() // per_byte),)  # 2 or 1.6 bits per code
    out = unpack(packed, codes.numel())
    assert out.dtype == torch.int8 and out.shape == (codes.numel(),)
    assert torch.equal(out.view(shape), codes)
    assert torch.equal(codes, before)  # the input is untouched
    assert torch.equal(unpack(packed.clone(), codes.numel()), out)  # and so is `packed`


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_every_signed_integer_dtype_packs_the_same(fmt, dtype):
    pack, _, _ = FORMATS[fmt]
    codes = random_codes((37,))
    assert torch.equal(pack(codes.to(dtype)), pack(codes))


def test_2bit_bytes_by_hand():
    # digits c + 1 = [0, 1, 2, 2 | 1]: 0 + (1 << 2) + (2 << 4) + (2 << 6) = 164; then 1 with
    # zero padding bits.
    packed = pack_2bit(torch.tensor([-1, 0, 1, 1, 0], dtype=torch.int8))
    assert packed.tolist() == [164, 1]
    assert pack_2bit(torch.ones(4, dtype=torch.int8)).tolist() == [0b10101010]
    assert pack_2bit(-torch.ones(8, dtype=torch.int8)).tolist() == [0, 0]
    assert unpack_2bit(torch.tensor([164, 1], dtype=torch.uint8), 5).tolist() == [-1, 0, 1, 1, 0]


def test_base3_bytes_by_hand():
    # digits [2, 0, 1, 2, 2 | 0, 1]: 2 + 0*3 + 1*9 + 2*27 + 2*81 = 227; then 0 + 1*3 = 3.
    packed = pack_base3(torch.tensor([1, -1, 0, 1, 1, -1, 0], dtype=torch.int8))
    assert packed.tolist() == [227, 3]
    assert pack_base3(torch.ones(5, dtype=torch.int8)).tolist() == [242]  # the largest byte
    assert pack_base3(torch.zeros(5, dtype=torch.int8)).tolist() == [121]
    want = [1, -1, 0, 1, 1, -1, 0]
    assert unpack_base3(torch.tensor([227, 3], dtype=torch.uint8), 7).tolist() == want


def test_transformers_layout_by_hand_and_against_pack_weights():
    # The worked example of transformers.integrations.bitnet.unpack_weights' docstring.
    codes = torch.tensor(
        [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]], dtype=torch.int8
    )
    want = [[0b10100001, 0b00011000], [0b10010000, 0b00001010]]
    assert pack_ternary_transformers(codes).tolist() == want
    pack_weights = pytest.importorskip("transformers.integrations.bitnet").pack_weights
    for i, shape in enumerate([(1, 3), (4, 2), (5, 7), (6, 7), (9, 4), (13, 2, 3), (11,)]):
        codes = random_codes(shape, seed=i)
        before = codes.clone()
        mine = pack_ternary_transformers(codes)
        theirs_input = codes.clone().float()
        theirs = pack_weights(theirs_input)
        assert torch.equal(mine, theirs), shape
        assert not torch.equal(theirs_input, codes.float())  # theirs mutates its input ...
        assert torch.equal(codes, before)  # ... ours does not
        assert torch.equal(unpack_ternary(mine, shape[0]), codes)
    empty = pack_ternary_transformers(torch.zeros(0, 3, dtype=torch.int8))
    assert empty.shape == (0, 3) and unpack_ternary(empty, 0).shape == (0, 3)


PACKERS = {f.__name__: f for f in (pack_2bit, pack_base3, pack_ternary_transformers)}


@pytest.mark.parametrize("name", PACKERS)
def test_pack_refuses_bad_codes(name):
    pack = PACKERS[name]
    for bad in (torch.tensor([0.0, 1.0]), torch.tensor([0, 1], dtype=torch.uint8),
                torch.tensor([True, False]), [0, 1, -1]):  # fmt: skip
        with pytest.raises(
            BitNetError, match=f"^{name}: ternary codes must be a signed integer"
        ) as e:
            pack(bad)
        assert "\n" not in str(e.value)  # one line
    for bad in ([0, 2, -1], [-2, 0]):
        with pytest.raises(BitNetError, match=r"must lie in \{-1, 0, 1\}, got values in \["):
            pack(torch.tensor(bad, dtype=torch.int64))


def test_unpack_refuses_bad_input():
    good = pack_2bit(random_codes((10,)))
    with pytest.raises(BitNetError, match=r"3 packed bytes cannot hold 13 codes"):
        unpack_2bit(good, 13)
    with pytest.raises(BitNetError, match=r"must be a uint8 tensor, got torch.int8"):
        unpack_2bit(good.to(torch.int8), 10)
    with pytest.raises(BitNetError, match=r"numel must be a non-negative int, got -1"):
        unpack_base3(good, -1)
    with pytest.raises(BitNetError, match="the 2-bit value 3"):
        unpack_2bit(torch.tensor([0b00110000], dtype=torch.uint8), 4)
    with pytest.raises(BitNetError, match="above 242"):
        unpack_base3(torch.tensor([243], dtype=torch.uint8), 5)
    # check=False skips the value pass (the packed layers' forward): garbage in, no error.
    assert unpack_base3(torch.tensor([243], dtype=torch.uint8), 5, check=False).shape == (5,)
    with pytest.raises(BitNetError, match="cannot hold 12 rows"):
        unpack_ternary(pack_ternary_transformers(random_codes((8, 3))), 12)
