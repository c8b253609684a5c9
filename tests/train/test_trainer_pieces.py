"""The Trainer receives built pieces: optimizer, scheduler, loss_fn, metrics, callbacks that
contribute losses and see gradients, a rank-aware sampler, and a state_dict."""

import json
import math

import pytest
import torch

from bitnet_training import BitNetError
from bitnet_training.callback import Callback, collect_callbacks, merge_callbacks
from bitnet_training.data import ResumableBatchSampler
from bitnet_training.optim import SchedulerConfig
from bitnet_training.train import LossMetrics, Metric, Trainer, TrainingConfig, model_loss


def _cfg(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        batch_size=2,
        log_every=1,
        mixed_precision="fp32",
        save_total_limit=None,
        gradient_clip_norm=None,
    )
    return TrainingConfig(**{**base, **kw})


def _losses(result):
    return [h["loss"] for h in result.history if h["kind"] == "train"]


def test_given_optimizer_and_scheduler_are_used(tmp_path, micro_model, token_windows):
    model = micro_model(qat=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    r = Trainer(
        model, _cfg(tmp_path, max_steps=3), token_windows(), optimizer=opt, scheduler=sched
    ).train()
    assert [h["lr"] for h in r.history if h["kind"] == "train"] == [0.5, 0.25, 0.125]


def test_loss_fn_and_metrics_plug_in(tmp_path, micro_model, token_windows):
    calls = []

    def doubled(model, batch):
        calls.append(batch["input_ids"].shape)
        return 2 * model_loss(model, batch)

    class TokenCount(Metric):
        def reset(self):
            self.n = 0

        def update(self, batch, loss, n_targets):
            self.n += int(n_targets)

        def compute(self, eval_data):
            return {"val_targets": self.n}

    val = token_windows(4, 16, seed=2)
    model = micro_model(qat=False)
    plain = Trainer(model, _cfg(tmp_path / "a", max_steps=1), token_windows(), val).evaluate()
    t = Trainer(
        model,
        _cfg(tmp_path / "b", max_steps=1),
        token_windows(),
        val,
        loss_fn=doubled,
        metrics=[LossMetrics(), TokenCount()],
    )
    m = t.evaluate()
    assert m["val_loss"] == pytest.approx(2 * plain["val_loss"])
    assert m["val_targets"] == 4 * 15 and calls


def test_aux_loss_and_gradient_hooks(tmp_path, micro_model, token_windows):
    seen = {}

    class L2(Callback):
        def aux_loss(self, trainer):
            return 0.5 * trainer.model.lm_head.weight.square().sum()

        def on_after_backward(self, trainer):
            seen["grad"] = trainer.model.lm_head.weight.grad.clone()

        def on_optimizer_step(self, trainer):
            seen["stepped"] = trainer.model.lm_head.weight.grad is not None

    def zero_loss(model, batch):
        return 0.0 * model(**batch).loss

    model = micro_model(qat=False)
    w = model.lm_head.weight.detach().clone()
    cfg = _cfg(tmp_path, max_steps=1)
    Trainer(model, cfg, token_windows(), callbacks=[L2()], loss_fn=zero_loss).train()
    torch.testing.assert_close(seen["grad"], w)  # d(0.5 |w|^2)/dw = w, the only loss term
    assert seen["stepped"]


def test_callbacks_are_collected_from_modules_and_replaced_by_key():
    class Clock(Callback):
        def __init__(self, tag):
            self.tag = tag

    class Layer(torch.nn.Linear):
        def trainer_callbacks(self):
            return [Clock("module")]

    net = torch.nn.Sequential(Layer(2, 2), torch.nn.Sequential(Layer(2, 2)))
    found = collect_callbacks(net)
    assert [c.tag for c in found] == ["module"]  # one per key
    merged = merge_callbacks(found, [Clock("user")])
    assert [c.tag for c in merged] == ["user"]


def test_resume_applies_a_changed_schedule_at_the_saved_step(
    tmp_path, micro_model, token_windows, caplog
):
    # On main before the recipe issue, a resumed run kept the checkpoint's schedule: a
    # raised max_steps continued at the old schedule's final LR (0 for two_stage/linear)
    # and a changed learning_rate was silently replaced by the checkpoint's.
    data = token_windows(20, 16)
    sched = SchedulerConfig("linear")
    Trainer(
        micro_model(), _cfg(tmp_path, max_steps=4, scheduler=sched), data
    ).train()  # linear decay over 4 steps: LR 0 at the end
    cfg = _cfg(tmp_path, max_steps=8, learning_rate=3e-3, scheduler=sched)
    with caplog.at_level("WARNING"):
        r = Trainer(micro_model(), cfg, data).train(resume_from="latest")
    lrs = [h["lr"] for h in r.history if h["kind"] == "train"]
    # The new schedule (peak 3e-3, linear over 8 steps) at steps 4..7.
    assert lrs == pytest.approx([3e-3 * (1 - t / 8) for t in range(4, 8)])
    assert "changed settings" in caplog.text and "learning_rate" in caplog.text


def test_state_dict_round_trips(tmp_path, micro_model, token_windows):
    t = Trainer(micro_model(), _cfg(tmp_path, max_steps=2), token_windows())
    t.train()
    st = t.state_dict()
    json.dumps(st)  # JSON-serializable
    u = Trainer(micro_model(), _cfg(tmp_path / "u", max_steps=2), token_windows())
    u._setup()
    u.load_state_dict(st)
    assert u.state.step == 2 and u.sampler.state_dict() == t.sampler.state_dict()
    assert set(st["callbacks"]) >= {"LRScheduling", "QATControl"}


def test_data_parallel_ranks_see_the_single_process_batch():
    one = ResumableBatchSampler(23, 4, seed=3)
    ranks = [ResumableBatchSampler(23, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == 5
    it1, its = iter(one), [iter(s) for s in ranks]
    for _ in range(12):  # across epoch boundaries
        assert next(it1) == next(its[0]) + next(its[1])
    with pytest.raises(BitNetError, match="rank 2 is outside world_size 2"):
        ResumableBatchSampler(23, 2, rank=2, world_size=2)


def test_only_rank_zero_writes_logs(tmp_path, micro_model, token_windows):
    r = Trainer(micro_model(), _cfg(tmp_path, max_steps=1), token_windows(), rank=1, world_size=2)
    result = r.train()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert math.isfinite(_losses(result)[0])
