import numpy as np
import pytest
import torch

from bitnet_training import BitLinear, QATConfig
from bitnet_training.quant.lsq import lsq_quantize
from bitnet_training.quant.observers import (
    MinMaxObserver,
    MovingAverageObserver,
    PercentileObserver,
)


def _batches(n=5, shape=(4, 7, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * (1 + i) for i in range(n)]


def _np_rows(b, per_channel):
    a = b.numpy().astype(np.float64)
    return a.reshape(-1, a.shape[-1]) if per_channel else a.reshape(-1, 1)


@pytest.mark.parametrize("per_channel", [False, True])
def test_observers_against_numpy(per_channel):
    batches = _batches()
    ch = 6 if per_channel else None
    mm, ema, pct = MinMaxObserver(ch), MovingAverageObserver(ch, 0.1), PercentileObserver(ch, 99.0)
    for b in batches:
        mm(b), ema(b), pct(b)
    rows = [_np_rows(b, per_channel) for b in batches]
    squeeze = (lambda v: v) if per_channel else (lambda v: v[0])
    # min-max: over everything seen
    all_rows = np.concatenate(rows)
    np.testing.assert_allclose(mm.min_val.numpy(), squeeze(all_rows.min(0)), rtol=1e-6)
    np.testing.assert_allclose(mm.max_val.numpy(), squeeze(all_rows.max(0)), rtol=1e-6)
    # EMA: first batch sets, then lo <- lo + m (batch_lo - lo)
    lo, hi = rows[0].min(0), rows[0].max(0)
    for r in rows[1:]:
        lo, hi = lo + 0.1 * (r.min(0) - lo), hi + 0.1 * (r.max(0) - hi)
    np.testing.assert_allclose(ema.min_val.numpy(), squeeze(lo), rtol=1e-5)
    np.testing.assert_allclose(ema.max_val.numpy(), squeeze(hi), rtol=1e-5)
    # percentile: the mean over batches of each batch's 1st and 99th percentiles
    lo = np.mean([np.percentile(r, 1.0, axis=0) for r in rows], axis=0)
    hi = np.mean([np.percentile(r, 99.0, axis=0) for r in rows], axis=0)
    np.testing.assert_allclose(pct.min_val.numpy(), squeeze(lo), rtol=1e-5)
    np.testing.assert_allclose(pct.max_val.numpy(), squeeze(hi), rtol=1e-5)
    assert int(mm.batches) == 5 and int(mm.samples) == 20


def test_asymmetric_qparams_match_torch_ao():
    from torch.ao.quantization import MinMaxObserver as TorchMinMax

    ours, theirs = MinMaxObserver(), TorchMinMax(dtype=torch.quint8)
    for b in _batches():
        ours(b + 1.5)
        theirs(b + 1.5)
    s, zp = ours.qparams(8, symmetric=False)
    ts, tzp = theirs.calculate_qparams()
    torch.testing.assert_close(s, ts[0] if ts.ndim else ts, rtol=1e-6, atol=0)
    assert int(zp) == int(tzp)


def test_symmetric_qparams_follow_the_bitnet_grid():
    obs = MinMaxObserver()
    obs(torch.tensor([-3.0, 1.0, 2.54]))
    s, zp = obs.qparams(8, symmetric=True)
    assert s.item() == pytest.approx(3.0 / 127) and int(zp) == 0


def _static_layer(**kw):
    torch.manual_seed(0)
    cfg = dict(
        activation_observer="minmax",
        activation_symmetric=False,
        calibration_samples=4,
        calibration_frequency=10,
    )
    return BitLinear(6, 3, bias=False, config=QATConfig(**{**cfg, **kw}))


def test_static_activations_use_frozen_ranges_and_clipped_ste():
    layer = _static_layer()
    layer(torch.rand(4, 6))  # 4 samples: the calibration window is used up, ranges freeze
    lo, hi = layer.act_observer.min_val.item(), layer.act_observer.max_val.item()
    x = torch.tensor([[-1.0, 0.2, 0.5, 0.9, 3.0, 0.0]], requires_grad=True)
    y = layer(x)
    assert (layer.act_observer.min_val.item(), layer.act_observer.max_val.item()) == (lo, hi)
    s, zp = layer.act_observer.qparams(8, False)
    xq = ((x.detach() / s).round() + zp).clamp(0, 255).sub(zp) * s
    w_q = layer.quantized_weight()
    torch.testing.assert_close(y, xq @ (w_q.codes * w_q.scale).t(), rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    inside = ((x.detach() / s).round() + zp >= 0) & ((x.detach() / s).round() + zp <= 255)
    assert not inside[0, 0] and not inside[0, 4]  # below 0 (min clamps at 0) and above max
    expected = (g @ (w_q.codes * w_q.scale)) * inside  # clipped STE: zero outside the range
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


def test_calibration_windows_reopen_and_freeze():
    layer = _static_layer(calibration_until=25)
    obs = layer.act_observer
    for step in range(40):
        layer.set_progress(step)
        layer(torch.full((2, 6), float(step)))  # 2 samples per forward, 4 per window
    # Windows at steps 0, 10, 20 (not 30: calibration_until=25), 2 forwards each.
    assert int(obs.batches) == 6 and obs.max_val.item() == 21.0
    layer.eval()
    layer(torch.full((2, 6), 99.0))
    assert int(obs.batches) == 6  # evaluation never calibrates
    frozen = _static_layer(online_calibration=False)
    for step in range(30):
        frozen.set_progress(step)
        frozen(torch.full((2, 6), float(step)))
    assert int(frozen.act_observer.batches) == 2 and frozen.act_observer.max_val.item() == 1.0


def test_observer_state_travels_in_state_dict():
    layer = _static_layer(activation_per_channel=True)
    layer(torch.randn(4, 6))
    state = layer.state_dict()
    assert {"act_observer.min_val", "act_observer.max_val", "act_observer.remaining"} <= set(state)
    fresh = _static_layer(activation_per_channel=True)
    fresh.load_state_dict(state)
    x = torch.randn(5, 6) * 3
    torch.testing.assert_close(fresh(x), layer(x))


def test_lsq_gradients_match_the_paper():
    torch.manual_seed(0)
    bits, qn, qp = 4, 8, 7
    x = (torch.randn(50) * 3).requires_grad_()
    s = torch.tensor(0.4, requires_grad=True)
    y = lsq_quantize(x, s, bits)
    v = x.detach() / s.detach()
    torch.testing.assert_close(y.detach(), v.clamp(-qn, qp).round() * s.detach())
    g = torch.randn(50)
    (y * g).sum().backward()
    inside = (v > -qn) & (v < qp)
    # eq. 3: ds = -v + round(v) inside, -Qn below, Qp above; times g = 1 / sqrt(N * Qp).
    d = torch.where(inside, -v + v.round(), torch.where(v <= -qn, -float(qn), float(qp)))
    expected = (g * d).sum() / (50 * qp) ** 0.5
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, g * inside.float())


def test_lsq_layer_initializes_from_calibration_and_learns():
    layer = _static_layer(learnable_scales=True, activation_symmetric=True)
    x = torch.randn(4, 6)
    layer(x).sum().backward()
    assert bool(layer.act_scale_ready)
    assert layer.act_scale.item() == pytest.approx(x.abs().max().item() / 127, rel=1e-5)
    assert layer.act_scale.grad is not None and layer.act_scale.grad.abs() > 0


def test_observer_config_validation():
    from bitnet_training import ConfigError

    for kw in (
        dict(activation_observer="max"),
        dict(learnable_scales=True),
        dict(activation_observer="ema", observer_momentum=0.0),
        dict(activation_observer="minmax", learnable_scales=True, activation_symmetric=False),
    ):
        with pytest.raises(ConfigError):
            QATConfig(**kw)


def test_four_bit_static_activations_per_channel_percentile():
    torch.manual_seed(0)
    layer = BitLinear(
        6,
        3,
        bias=False,
        config=QATConfig(
            activation_bits=4,
            activation_observer="percentile",
            observer_percentile=99.0,
            activation_per_channel=True,
            activation_symmetric=True,
            calibration_samples=8,
        ),
    )
    calib = torch.randn(8, 10, 6)
    layer(calib)
    obs = layer.act_observer
    rows = calib.reshape(-1, 6).numpy().astype(np.float64)
    np.testing.assert_allclose(obs.max_val.numpy(), np.percentile(rows, 99.0, axis=0), rtol=1e-5)
    x = torch.randn(4, 6) * 2
    scale, _ = obs.qparams(4, symmetric=True)
    xq = (x / scale).round().clamp(-8, 7) * scale  # 4-bit grid [-8, 7], per input feature
    w = layer.quantized_weight()
    torch.testing.assert_close(layer(x), xq @ (w.codes * w.scale).t(), rtol=1e-5, atol=1e-5)
