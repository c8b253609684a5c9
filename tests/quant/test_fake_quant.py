"""Straight-through estimators against their analytic gradients and PyTorch's fake_quantize."""

import pytest
import torch

from bitnet_training.errors import ConfigError
from bitnet_training.quant import (
    FakeQuantize,
    QuantSpec,
    dequantize,
    fake_quantize,
    quantize,
    ternary_quantize,
)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(),
        QuantSpec(bits=1, granularity="channel"),
        QuantSpec(bits=4, granularity="token"),
        QuantSpec(bits=3, symmetric=False, granularity="group", group_size=8),
    ],
)
def test_forward_is_dequantized_and_gradient_is_identity(spec):
    x = torch.randn(6, 32, requires_grad=True)
    y = fake_quantize(x, spec)
    torch.testing.assert_close(y, dequantize(quantize(x.detach(), spec)))
    g = torch.randn(6, 32)
    y.backward(g)
    assert torch.equal(x.grad, g)  # d(x + stopgrad(q(x) - x)) / dx = 1


def test_clipped_ste_zeroes_gradient_where_ternary_clamps():
    w = torch.tensor([1.0, -0.2, 0.9, -3.0], requires_grad=True)
    # gamma = 1.275; |w| / gamma = [0.78, 0.16, 0.71, 2.35]: only -3.0 lies beyond 1.5 gamma.
    fake_quantize(w, QuantSpec(ste="clipped")).sum().backward()
    assert w.grad.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_clipped_ternary_equals_torch_fake_quantize_forward_and_gradient():
    w = torch.randn(64, 64, requires_grad=True)
    gamma = ternary_quantize(w.detach()).scale.item()
    ours = fake_quantize(w, QuantSpec(ste="clipped"))
    w2 = w.detach().clone().requires_grad_()
    ref = torch.fake_quantize_per_tensor_affine(w2, gamma, 0, -1, 1)
    torch.testing.assert_close(ours, ref)
    g = torch.randn(64, 64)
    ours.backward(g)
    ref.backward(g)
    assert torch.equal(w.grad, w2.grad)
    assert (w.grad == 0).any()  # some weights lie beyond 1.5 gamma


def test_clipped_binary_uses_hardtanh_range():
    w = torch.tensor([0.3, -0.1, 0.5, 0.1, 2.0], requires_grad=True)
    # alpha = 0.56, beta = 0.6: |w - alpha| = [0.26, 0.66, 0.06, 0.46, 1.44]
    fake_quantize(w, QuantSpec(bits=1, ste="clipped")).sum().backward()
    assert w.grad.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_fake_quantize_module_enabled_switch():
    fq = FakeQuantize(QuantSpec(bits=4, granularity="token"))
    x = torch.randn(3, 16)
    assert not torch.equal(fq(x), x)
    fq.enabled = False
    assert torch.equal(fq(x), x)
    assert "bits=4" in repr(fq)


def test_quant_spec_validation():
    with pytest.raises(ConfigError, match="bits=1.5"):
        QuantSpec(bits=1.5)
    with pytest.raises(ConfigError, match="group_size"):
        QuantSpec(granularity="group")
    with pytest.raises(ConfigError, match="ste='soft'"):
        QuantSpec(ste="soft")
    with pytest.raises(ConfigError, match="symmetric"):
        QuantSpec(bits=1.58, symmetric=False)
