"""Quantizers against their formulas: hand-made inputs, NumPy references, PyTorch's own."""

import numpy as np
import pytest
import torch

from bitnet_training.errors import ConfigError
from bitnet_training.quant import (
    binary_quantize,
    bitnet_activation_quantize,
    dequantize,
    int_quantize,
    ternary_quantize,
)


def np_ternary(w, axis_groups):
    """absmean ternary on a NumPy array reshaped so each scale reduces over `axis_groups`."""
    gamma = np.maximum(np.abs(w).mean(axis=axis_groups, keepdims=True), 1e-5)
    return np.clip(np.round(w * (1.0 / gamma)), -1, 1), gamma


def test_ternary_per_tensor_hand_made():
    w = torch.tensor([[1.0, -0.2, 0.9, -3.0]])
    q = ternary_quantize(w)
    # gamma = (1 + 0.2 + 0.9 + 3) / 4 = 1.275; w / gamma = [0.78, -0.16, 0.71, -2.35]
    assert q.scale.item() == pytest.approx(1.275)
    assert q.codes.tolist() == [[1, 0, 1, -1]]
    assert q.codes.dtype == torch.int8
    assert dequantize(q)[0].tolist() == pytest.approx([1.275, 0.0, 1.275, -1.275])


def test_ternary_per_channel_and_group_hand_made():
    w = torch.tensor([[1.0, -0.2, 0.9, -3.0], [0.1, 0.1, -0.1, 0.0]])
    q = ternary_quantize(w, "channel")
    assert q.scale.shape == (2, 1)
    assert q.scale[:, 0].tolist() == pytest.approx([1.275, 0.075])
    assert q.codes.tolist() == [[1, 0, 1, -1], [1, 1, -1, 0]]
    g = ternary_quantize(w, "group", group_size=2)
    assert g.scale.shape == (2, 2)
    # groups: [1, -0.2] -> 0.6; [0.9, -3] -> 1.95; [0.1, 0.1] -> 0.1; [-0.1, 0] -> 0.05
    torch.testing.assert_close(g.scale, torch.tensor([[0.6, 1.95], [0.1, 0.05]]))
    assert g.codes.tolist() == [[1, 0, 0, -1], [1, 1, -1, 0]]
    assert dequantize(g)[0].tolist() == pytest.approx([0.6, 0.0, 0.0, -1.95])


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_ternary_matches_numpy_reference(granularity):
    w = torch.randn(16, 64) * 0.02
    q = ternary_quantize(w, granularity, group_size=16 if granularity == "group" else None)
    a = w.numpy().astype(np.float32)
    if granularity == "tensor":
        codes, gamma = np_ternary(a, None)
    elif granularity == "channel":
        codes, gamma = np_ternary(a, 1)
    else:
        codes, gamma = np_ternary(a.reshape(16, 4, 16), 2)
    deq = (codes * gamma).reshape(16, 64)
    np.testing.assert_array_equal(q.codes.numpy(), codes.reshape(16, 64))
    np.testing.assert_allclose(q.scale.numpy().reshape(-1), gamma.reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(dequantize(q).numpy(), deq, rtol=1e-6)


def test_binary_hand_made_and_zero_maps_to_plus_one():
    w = torch.tensor([0.3, -0.1, 0.5, 0.1])
    q = binary_quantize(w)
    # alpha = 0.2: W - alpha = [0.1, -0.3, 0.3, -0.1]; beta = mean|W| = 0.25
    assert q.codes.tolist() == [1, -1, 1, -1]
    assert q.scale.item() == pytest.approx(0.25)
    assert binary_quantize(torch.tensor([1.0, 0.0, -1.0])).codes.tolist() == [1, 1, -1]
    ch = binary_quantize(torch.tensor([[0.3, -0.1, 0.5, 0.1], [2.0, 4.0, 0.0, 2.0]]), "channel")
    assert ch.codes.tolist() == [[1, -1, 1, -1], [1, 1, -1, 1]]
    assert ch.scale[:, 0].tolist() == pytest.approx([0.25, 2.0])
    gr = binary_quantize(torch.tensor([[0.3, -0.1, 5.0, 1.0]]), "group", group_size=2)
    assert gr.codes.tolist() == [[1, -1, 1, -1]]
    torch.testing.assert_close(gr.scale, torch.tensor([[0.2, 3.0]]))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_symmetric_per_tensor_equals_torch_fake_quantize(bits):
    x = torch.randn(32, 48)
    q = int_quantize(x, bits, symmetric=True)
    qp = 2 ** (bits - 1) - 1
    assert q.scale.item() == pytest.approx(x.abs().max().item() / qp)
    ref = torch.fake_quantize_per_tensor_affine(x, q.scale.item(), 0, -qp - 1, qp)
    torch.testing.assert_close(dequantize(q), ref, rtol=0, atol=1e-6)
    assert q.codes.min() >= -qp - 1 and q.codes.max() <= qp


@pytest.mark.parametrize("bits", [3, 8])
def test_int_asymmetric_per_channel_equals_torch(bits):
    x = torch.randn(6, 40) + 0.5
    q = int_quantize(x, bits, symmetric=False, granularity="channel")
    qmax = 2**bits - 1
    lo = x.amin(1).clamp(max=0)
    hi = x.amax(1).clamp(min=0)
    torch.testing.assert_close(q.scale[:, 0], (hi - lo) / qmax)
    assert q.codes.dtype == torch.uint8
    ref = torch.fake_quantize_per_channel_affine(x, q.scale[:, 0], q.zero_point[:, 0], 0, 0, qmax)
    torch.testing.assert_close(dequantize(q), ref, rtol=0, atol=1e-6)
    # PyTorch's own observer picks the same quantization parameters.
    obs = torch.ao.quantization.PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine, quant_min=0, quant_max=qmax
    )
    obs(x)
    scale, zp = obs.calculate_qparams()
    torch.testing.assert_close(q.scale[:, 0], scale.float())
    assert q.zero_point[:, 0].tolist() == zp.tolist()


def test_int_per_token_and_group():
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.1, 0.2, -0.3, 0.0]])
    q = int_quantize(x, 8, granularity="token")
    assert q.scale.shape == (2, 1)
    assert q.scale[:, 0].tolist() == pytest.approx([4.0 / 127, 0.3 / 127])
    assert q.codes[0].tolist() == [32, -64, 16, 127]  # round(x * 127 / 4)
    g = int_quantize(x, 4, granularity="group", group_size=2)
    torch.testing.assert_close(g.scale, torch.tensor([[2 / 7, 4 / 7], [0.2 / 7, 0.3 / 7]]))
    assert g.codes[0].tolist() == [4, -7, 1, 7]  # round(1 * 7 / 2) = round(3.5) = 4 (half to even)
    torch.testing.assert_close(dequantize(g), x, atol=0.15, rtol=0)


def reference_activation_quant(x, bits):
    """The BitNet team's FAQ code, verbatim in math: per-token absmax."""
    qp = 2 ** (bits - 1) - 1
    scale = qp / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    codes = (x * scale).round().clamp_(-qp - 1, qp)
    return codes, codes / scale


@pytest.mark.parametrize("bits", [8, 4])
def test_bitnet_activation_quant_equals_reference_code(bits):
    x = torch.randn(3, 7, 96) * 5
    q = bitnet_activation_quantize(x, bits)
    codes, deq = reference_activation_quant(x, bits)
    assert torch.equal(q.codes.float(), codes)
    assert q.scale.shape == (3, 7, 1)
    torch.testing.assert_close(dequantize(q), deq, rtol=1e-6, atol=1e-7)
    assert q.codes.abs().max() == 2 ** (bits - 1) - 1  # the row max maps to Qp


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: ternary_quantize(x),
        lambda x: ternary_quantize(x, "channel"),
        lambda x: int_quantize(x, 4),
        lambda x: int_quantize(x, 8, symmetric=False, granularity="token"),
        lambda x: bitnet_activation_quantize(x),
    ],
)
@pytest.mark.parametrize("value", [0.0, 3.0, -2.5])
def test_zero_and_constant_inputs_are_finite(fn, value):
    x = torch.full((4, 8), value)
    q = fn(x)
    d = dequantize(q)
    assert torch.isfinite(q.scale).all() and torch.isfinite(d).all()
    if value == 0.0:
        assert (d == 0).all()
    else:
        torch.testing.assert_close(d, x, rtol=0.02, atol=0)


@pytest.mark.parametrize("value", [0.0, -2.5])
def test_binary_of_constant_follows_the_formula(value):
    # W - mean(W) is all zero, and sign(0) maps to +1: every code is +1, beta = max(|c|, eps).
    q = binary_quantize(torch.full((4, 8), value), "group", group_size=4)
    assert (q.codes == 1).all()
    assert torch.isfinite(q.scale).all()
    assert q.scale.flatten().tolist() == pytest.approx([max(abs(value), 1e-5)] * 8)


def test_inputs_are_not_modified():
    x = torch.randn(8, 8)
    before = x.clone()
    for fn in (ternary_quantize, binary_quantize, bitnet_activation_quantize):
        fn(x)
    int_quantize(x, 4, symmetric=False)
    assert torch.equal(x, before)


def test_bad_arguments_name_the_problem():
    x = torch.randn(4, 6)
    with pytest.raises(ConfigError, match="bits=9"):
        int_quantize(x, 9)
    with pytest.raises(ConfigError, match="group_size=4.*divisor of the last dimension \\(6\\)"):
        ternary_quantize(x, "group", group_size=4)
    with pytest.raises(ConfigError, match="granularity='row'"):
        ternary_quantize(x, "row")
    with pytest.raises(ConfigError, match="activation_bits=2"):
        bitnet_activation_quantize(x, 2)
