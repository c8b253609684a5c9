import json
import math

import pytest
import torch

from bitnet_training.optim import (
    SchedulerConfig,
    build_optimizer,
    build_scheduler,
    parameter_groups,
)
from bitnet_training.train import TrainingConfig


def _opt(lr=1.0, wd=0.1):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = TrainingConfig(learning_rate=lr)
    cfg.optimizer.weight_decay = wd
    return build_optimizer(model, cfg.optimizer, cfg.learning_rate)


def _run(sched_cfg, total, lr=1.0):
    opt = _opt(lr)
    sched = build_scheduler(opt, sched_cfg, total, lr)
    lrs, wds = [], []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        wds.append(opt.param_groups[0]["weight_decay"])
        opt.step()
        sched.step()
    return lrs, wds, opt


def test_parameter_groups_decay_matrices_only():
    model = torch.nn.Sequential(
        torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)
    )
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2} and len(decay["params"]) == 2
    assert {p.ndim for p in no_decay["params"]} == {1} and len(no_decay["params"]) == 3


def test_two_stage_values_at_chosen_steps():
    # 100 steps, 10 warm-up: linear decay 1 -> 0 over steps 10..100, x 0.5 from step 50,
    # weight decay 0.1 before step 50 and 0 from it; no-decay group stays at 0.
    cfg = SchedulerConfig(name="two_stage", warmup_steps=10, stage_two_lr_factor=0.5)
    lrs, wds, opt = _run(cfg, 100, lr=2e-3)
    assert lrs[0] == pytest.approx(2e-3 * 1 / 10)
    assert lrs[9] == pytest.approx(2e-3)
    assert lrs[10] == pytest.approx(2e-3)
    assert lrs[49] == pytest.approx(2e-3 * (1 - 39 / 90))
    assert lrs[50] == pytest.approx(2e-3 * (1 - 40 / 90) * 0.5)  # the drop
    assert lrs[99] == pytest.approx(2e-3 * (1 - 89 / 90) * 0.5)
    assert wds[:50] == [0.1] * 50 and wds[50:] == [0.0] * 50
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_cosine_matches_torch():
    cfg = SchedulerConfig(name="cosine", eta_min=0.1, t_max=20)
    ours, _, _ = _run(cfg, 20, lr=1.0)
    opt = _opt(1.0)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=0.1)
    theirs = []
    for _ in range(20):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_linear_and_constant_with_warmup():
    lin, _, _ = _run(SchedulerConfig(name="linear", warmup_steps=4, eta_min=0.2), 14)
    assert lin[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lin[4] == 1.0 and lin[9] == pytest.approx(0.2 + 0.8 * 0.5)
    const, wds, _ = _run(SchedulerConfig(name="constant", warmup_steps=2), 6)
    assert const == pytest.approx([0.5, 1, 1, 1, 1, 1]) and set(wds) == {0.1}


def test_state_dict_is_json_and_resumes_the_curve():
    cfg = SchedulerConfig(name="two_stage", warmup_steps=3)
    opt = _opt()
    sched = build_scheduler(opt, cfg, 20, 1.0)
    for _ in range(7):
        opt.step()
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))
    opt_state = opt.state_dict()
    opt2 = _opt()
    sched2 = build_scheduler(opt2, SchedulerConfig(name="constant"), 999, 1.0)  # replaced by load
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    for _ in range(13):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
        assert opt.param_groups[0]["weight_decay"] == opt2.param_groups[0]["weight_decay"]
    assert math.isclose(opt.param_groups[0]["lr"], 0.0, abs_tol=0.05)
