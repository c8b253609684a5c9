import pytest
import torch
from torch import nn

from bitnet_training.optim import (
    SchedulerConfig,
    adaptive_clip_grad_,
    build_scheduler,
    clip_gradients,
)


def test_agc_against_its_formula():
    torch.manual_seed(0)
    w = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    w.grad = torch.randn(4, 6) * torch.tensor([[0.01], [0.1], [1.0], [10.0]])
    b.grad = torch.randn(4) * 5
    gw, gb = w.grad.clone(), b.grad.clone()
    lam, eps = 0.05, 1e-3
    adaptive_clip_grad_([w, b], lam, eps)
    for i in range(4):  # one unit per output row: ||G_i|| <= lam * max(||W_i||, eps)
        wn, gn = max(w[i].norm().item(), eps), gw[i].norm().item()
        expected = gw[i] * (lam * wn / gn) if gn / wn > lam else gw[i]
        torch.testing.assert_close(w.grad[i], expected)
    wn, gn = max(b.norm().item(), eps), gb.norm().item()  # a vector is one unit
    torch.testing.assert_close(b.grad, gb * (lam * wn / gn) if gn / wn > lam else gb)
    assert w.grad[0].norm() == pytest.approx(gw[0].norm().item())  # small gradient untouched


def test_agc_eps_floor_for_zero_weights():
    w = torch.zeros(2, 3, requires_grad=True)
    w.grad = torch.ones(2, 3)
    adaptive_clip_grad_([w], 0.1, eps=1e-3)
    torch.testing.assert_close(w.grad.norm(dim=1), torch.full((2,), 1e-4))


def test_clip_by_value_then_norm():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor([5.0, -0.5, 2.0])
    norm = clip_gradients([p], max_norm=1.0, max_value=1.0)
    assert norm.item() == pytest.approx((1 + 0.25 + 1) ** 0.5)  # measured after value clip
    torch.testing.assert_close(p.grad, torch.tensor([1.0, -0.5, 1.0]) / 1.5)


def test_wsd_schedule():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = build_scheduler(
        opt, SchedulerConfig("wsd", warmup_steps=2, decay_fraction=0.25), 10, 1.0
    )
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warm-up 2, stable 6 (8 steps after warm-up, the last 2 decay), decay 2.
    assert lrs == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 1.0, 0.5])
