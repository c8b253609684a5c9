"""Progressive quantization, bit stages and quantization noise inside BitLinear."""

import pytest
import torch
import torch.nn.functional as F

from bitnet_training import BitLinear, QATConfig
from bitnet_training.quant import fake_quantize, quantize
from bitnet_training.quant.functional import dequantize


def _layer(**cfg):
    torch.manual_seed(0)
    return BitLinear(64, 32, bias=False, config=QATConfig(**cfg))


def _reference(layer, x, lam_w, lam_a):
    """x + lambda * stopgrad(q(x) - x), on both sides, by the formula."""
    cfg = layer.config
    w = layer.weight
    wq = dequantize(quantize(w.detach(), layer.weight_spec()), torch.float32)
    w_eff = w + lam_w * (wq - w).detach()
    xq = fake_quantize(x.detach(), cfg.activation_spec())
    x_eff = x + lam_a * (xq - x).detach()
    return F.linear(x_eff, w_eff)


@pytest.mark.parametrize("lam_w, lam_a", [(0.0, 0.0), (0.3, 0.7), (1.0, 0.5), (0.5, 1.0)])
def test_blend_matches_formula_and_gradients(lam_w, lam_a):
    layer = _layer(weight_schedule={"end_step": 10}, activation_schedule={"end_step": 10})
    layer.weight_blend, layer.activation_blend = lam_w, lam_a
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    ref_layer = _layer()
    x2 = x.detach().clone().requires_grad_()
    ref = _reference(ref_layer, x2, lam_w, lam_a)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, ref_layer.weight.grad, rtol=1e-5, atol=1e-5)


def test_lambda_zero_is_full_precision_and_one_is_bitnet():
    layer = _layer(weight_schedule={"end_step": 100}, activation_schedule={"end_step": 100})
    x = torch.randn(4, 64)
    layer.set_progress(0)
    assert (layer.weight_blend, layer.activation_blend) == (0.0, 0.0)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-6, atol=1e-6)
    layer.set_progress(100)
    torch.testing.assert_close(layer(x), _layer()(x), rtol=0, atol=0)


def test_bit_stages_switch_the_weight_grid():
    layer = _layer(weight_bit_stages=[(0, 8), (10, 4), (20, 1.58)])
    layer.set_progress(5)
    assert layer.weight_spec().bits == 8
    layer.set_progress(10)
    assert layer.weight_spec().bits == 4
    with torch.no_grad():
        ref = dequantize(quantize(layer.weight, layer.weight_spec()), torch.float32)
    x = torch.randn(2, 64)
    ref_out = F.linear(fake_quantize(x, layer.config.activation_spec()), ref)
    torch.testing.assert_close(layer(x), ref_out, rtol=1e-4, atol=1e-4)
    layer.set_progress(25)
    assert layer.weight_spec().bits == 1.58 and layer.stage_bits is None


def _effective_weight(layer):
    """The weight the forward used: recovered from a linear probe with identity input and
    activation quantization off."""
    x = torch.eye(64)
    return layer(x).t()


def test_quant_noise_quantizes_a_fraction_of_blocks():
    p, block = 0.3, 8
    layer = _layer(
        quant_noise=p, quant_noise_block_size=block, enable_activation_quantization=False
    )
    w = layer.weight.detach()
    wq = dequantize(quantize(w, layer.weight_spec()), torch.float32)
    torch.manual_seed(1)
    fractions = []
    for _ in range(40):
        w_eff = _effective_weight(layer).detach()
        blocks_q = (w_eff - wq).abs().reshape(32, -1, block).amax(-1) < 1e-6
        blocks_fp = (w_eff - w).abs().reshape(32, -1, block).amax(-1) < 1e-6
        assert bool((blocks_q | blocks_fp).all())  # every block is one or the other, whole
        fractions.append(blocks_q.float().mean().item())
    mean = sum(fractions) / len(fractions)
    assert abs(mean - p) < 4 * (p * (1 - p) / (256 * 40)) ** 0.5  # 256 blocks per draw
    layer.eval()  # off at evaluation: everything quantized
    torch.testing.assert_close(_effective_weight(layer), wq, rtol=0, atol=1e-6)


def test_quant_noise_is_seeded():
    layer = _layer(quant_noise=0.5, enable_activation_quantization=False)
    torch.manual_seed(7)
    a = _effective_weight(layer)
    torch.manual_seed(7)
    b = _effective_weight(layer)
    torch.manual_seed(8)
    c = _effective_weight(layer)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_noise_factor_statistics():
    nf = 0.5
    layer = _layer(noise_factor=nf, enable_activation_quantization=False, per_channel=True)
    q = quantize(layer.weight.detach(), layer.weight_spec())
    wq = dequantize(q, torch.float32)
    scale = q.scale.reshape(-1, 1).expand_as(wq)
    torch.manual_seed(3)
    noise = torch.stack([(_effective_weight(layer).detach() - wq) / scale for _ in range(50)])
    # U(-1/2, 1/2) * noise_factor, in units of each row's quantization step.
    assert noise.abs().max() <= nf / 2 + 1e-5
    assert abs(noise.mean().item()) < 0.01
    assert noise.var().item() == pytest.approx(nf**2 / 12, rel=0.03)
    layer.eval()
    torch.testing.assert_close(_effective_weight(layer), wq, rtol=0, atol=1e-6)
