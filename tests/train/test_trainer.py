import json
import math
import os
import signal

import pytest
import torch
from torch import nn

from bitnet_training import BitNetError
from bitnet_training.optim import SchedulerConfig
from bitnet_training.train import (
    Callback,
    EarlyStopping,
    Trainer,
    TrainerState,
    TrainingCallbacks,
    TrainingConfig,
)


def _cfg(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        batch_size=2,
        log_every=1,
        mixed_precision="fp32",
        save_total_limit=None,
    )
    return TrainingConfig(**{**base, **kw})


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class MaskedWindows(torch.utils.data.Dataset):
    """Windows whose labels hide a different number of positions each, so micro-batches
    have unequal target counts and a per-batch mean would weigh them wrongly."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = self.base[i]
        labels = item["labels"].clone()
        labels[: 1 + (i * 5) % (len(labels) - 2)] = -100
        return {"input_ids": item["input_ids"], "labels": labels}


def test_accumulation_equals_one_big_batch(tmp_path, micro_model, token_windows):
    data = MaskedWindows(token_windows(8, 16))
    sgd = dict(
        optimizer="sgd",
        learning_rate=0.1,
        gradient_clip_norm=None,
        max_steps=1,
        scheduler="constant",
    )
    sgd_cfg = dict(momentum=0.0)
    a = micro_model(qat=True)
    cfg_a = _cfg(tmp_path / "a", batch_size=2, gradient_accumulation_steps=2, **sgd)
    cfg_a.optimizer.momentum = sgd_cfg["momentum"]
    cfg_a.optimizer.weight_decay = 0.0
    Trainer(a, cfg_a, data).train()
    b = micro_model(qat=True)
    cfg_b = _cfg(tmp_path / "b", batch_size=4, gradient_accumulation_steps=1, **sgd)
    cfg_b.optimizer.momentum = 0.0
    cfg_b.optimizer.weight_decay = 0.0
    Trainer(b, cfg_b, data).train()
    # Reference: the gradient of one batch of the same 4 sequences, by hand.
    c = micro_model(qat=True)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:4].tolist()
    batch = torch.utils.data.default_collate([data[i] for i in order])
    c(**batch).loss.backward()
    with torch.no_grad():
        for p in c.parameters():
            p -= 0.1 * p.grad
    pa, pb, pc = _params(a), _params(b), _params(c)
    moved = max((pa[k] - _params(micro_model())[k]).abs().max() for k in pa)
    assert moved > 1e-4
    for k in pa:
        torch.testing.assert_close(pa[k], pc[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pb[k], pc[k], rtol=1e-5, atol=1e-6)


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            trainer.state.should_stop = True


def _losses(result):
    return [h["loss"] for h in result.history if h["kind"] == "train"]


@pytest.mark.parametrize("stop_at", [3, 6])  # mid-epoch, and just after the epoch boundary
def test_resume_is_bit_exact(tmp_path, micro_model, token_windows, stop_at):
    data, val = token_windows(20, 16), token_windows(4, 16, seed=2)
    kw = dict(
        max_steps=9,
        gradient_accumulation_steps=2,
        eval_every=3,
        save_every=3,
        mixed_precision="bf16",
        scheduler=SchedulerConfig("two_stage", warmup_steps=2),
    )
    full_trainer = Trainer(micro_model(), _cfg(tmp_path / "full", **kw), data, val)
    full = full_trainer.train()
    assert full.steps == 9  # 5 optimizer steps per epoch: the run crosses an epoch

    first = Trainer(micro_model(), _cfg(tmp_path / "part", **kw), data, val, [StopAt(stop_at)])
    r1 = first.train()
    assert r1.steps == stop_at
    fresh = micro_model(seed=123)  # different init: everything must come from the checkpoint
    r2 = Trainer(fresh, _cfg(tmp_path / "part", **kw), data, val).train(resume_from="latest")
    assert r2.steps == 9
    assert _losses(r1) + _losses(r2) == _losses(full)  # bit-identical, not approximately
    assert r2.metrics["val_loss"] == full.metrics["val_loss"]
    for k, v in _params(full_trainer.model).items():
        assert torch.equal(v, _params(fresh)[k]), k


def test_resume_keeps_the_measured_matmul(tmp_path, micro_model, token_windows, monkeypatch):
    """bf16 with integer_matmul auto: the GEMM each layer shape measured faster is saved in
    the checkpoint, and a resumed run (a new process, which may measure otherwise) runs it,
    so the run's numbers are those of an uninterrupted one."""
    from bitnet_training.quant import gemm

    def measuring(integer):  # a process where the integer (or float) GEMM measures faster
        monkeypatch.setattr(gemm, "_PATHS", {})
        monkeypatch.setattr(gemm, "_measure_path", lambda *a: integer)

    data = token_windows(12, 16)
    kw = dict(max_steps=4, save_every=2, mixed_precision="bf16")
    measuring(True)
    full = Trainer(micro_model(), _cfg(tmp_path / "full", **kw), data).train()
    measuring(True)
    r1 = Trainer(micro_model(), _cfg(tmp_path / "part", **kw), data, callbacks=[StopAt(2)]).train()
    measuring(False)
    r2 = Trainer(micro_model(seed=3), _cfg(tmp_path / "part", **kw), data).train("latest")
    assert _losses(r1) + _losses(r2) == _losses(full)
    assert set(gemm.paths().values()) == {"integer"}
    measuring(False)  # the other GEMM: other numbers (what resuming without the state gives)
    other = Trainer(micro_model(), _cfg(tmp_path / "other", **kw), data).train()
    assert _losses(other)[0] != _losses(full)[0]


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def setup(self, trainer):
        self.events.append("setup")

    def on_train_begin(self, trainer):
        self.events.append("train_begin")

    def on_step_begin(self, trainer):
        self.events.append(f"step_begin:{trainer.state.step + 1}")

    def on_step_end(self, trainer):
        self.events.append(f"step_end:{trainer.state.step}")

    def on_log(self, trainer, logs):
        self.events.append(f"log:{logs['step']}")

    def on_evaluate(self, trainer, metrics):
        self.events.append(f"evaluate:{metrics['step']}")

    def on_save(self, trainer, path):
        self.events.append(f"save:{os.path.basename(path)}")

    def on_train_end(self, trainer, result):
        self.events.append("train_end")


def test_callback_order(tmp_path, micro_model, token_windows):
    rec = Recorder()
    cfg = _cfg(tmp_path, max_steps=4, log_every=2, eval_every=2, save_every=4)
    Trainer(micro_model(), cfg, token_windows(), token_windows(2, seed=3), [rec]).train()
    assert rec.events == [
        "setup",
        "train_begin",
        "step_begin:1",
        "step_end:1",
        "step_begin:2",
        "step_end:2",
        "log:2",
        "evaluate:2",
        "step_begin:3",
        "step_end:3",
        "step_begin:4",
        "step_end:4",
        "log:4",
        "evaluate:4",
        "save:checkpoint-00000004",
        "train_end",
    ]


def test_early_stopping_counts_evaluations_without_improvement():
    stopper = EarlyStopping(patience=2, metric="val_loss", min_delta=0.01)
    trainer = type("T", (), {"state": TrainerState()})()
    stops = []
    for v in [3.0, 2.5, 2.495, 2.6]:
        stopper.on_evaluate(trainer, {"val_loss": v})
        stops.append(trainer.state.should_stop)
    # 2.495 is within min_delta of 2.5 (no improvement), 2.6 worse -> stop at the 4th.
    assert stops == [False, False, False, True]
    assert stopper.best == 2.5


def test_early_stopping_ends_training(tmp_path, micro_model, token_windows):
    cfg = _cfg(
        tmp_path,
        max_steps=50,
        eval_every=1,
        early_stopping_patience=2,
        early_stopping_min_delta=100.0,
    )
    r = Trainer(micro_model(), cfg, token_windows(), token_windows(2, seed=3)).train()
    assert r.steps == 3  # first evaluation sets the best; two more without improvement


class Regression(nn.Module):
    """Not a language model: the Trainer must train any module that returns a loss."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x, y):
        return {"loss": nn.functional.mse_loss(self.lin(x).squeeze(-1), y)}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=8, poison=None):
        self.x, self.y, self.poison = torch.randn(n, 4), torch.randn(n), poison

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i].clone()
        if self.poison is not None and i in self.poison:
            x[0] = 1e5  # squared error overflows fp16's range: inf gradients
        return {"x": x, "y": self.y[i]}


def test_fp16_loss_scaling_skips_step_with_inf_gradient(tmp_path):
    model = Regression()
    data = Pairs(8, poison=set(range(8)))  # every batch overflows in fp16
    cfg = _cfg(
        tmp_path,
        mixed_precision="fp16",
        max_steps=2,
        batch_size=4,
        init_scale=1024.0,
        backoff_factor=0.25,
        gradient_clip_norm=None,
        scheduler="constant",
    )
    before = _params(model)
    r = Trainer(model, cfg, data).train()
    for k, v in _params(model).items():
        assert torch.equal(v, before[k]), f"{k} changed although every step overflowed"
    scales = [h["loss_scale"] for h in r.history if h["kind"] == "train"]
    assert scales == [1024.0 * 0.25, 1024.0 * 0.25**2]


def test_fp16_loss_scaling_trains_when_finite(tmp_path):
    model = Regression()
    cfg = _cfg(
        tmp_path,
        mixed_precision="fp16",
        max_steps=3,
        batch_size=4,
        init_scale=1024.0,
        growth_interval=1,
        gradient_clip_norm=None,
    )
    before = _params(model)
    r = Trainer(model, cfg, Pairs(8)).train()
    assert not torch.equal(_params(model)["lin.weight"], before["lin.weight"])
    assert [h["loss_scale"] for h in r.history if h["kind"] == "train"] == [2048.0, 4096.0, 8192.0]


def test_sigint_saves_then_stops(tmp_path, micro_model, token_windows):
    class Interrupt(Callback):
        def on_step_end(self, trainer):
            if trainer.state.step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    r = Trainer(
        micro_model(), _cfg(tmp_path, max_steps=10), token_windows(), None, [Interrupt()]
    ).train()
    assert r.interrupted and r.signal == signal.SIGINT and r.steps == 2
    assert os.path.basename(r.last_checkpoint) == "checkpoint-00000002"
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_model_without_loss_is_a_clear_error(tmp_path, token_windows):
    class NoLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(320, 4)

        def forward(self, input_ids, labels=None):
            return self.e(input_ids)

    with pytest.raises(BitNetError, match="no scalar loss"):
        Trainer(NoLoss(), _cfg(tmp_path, max_steps=1), token_windows()).train()


def test_too_little_data_is_a_clear_error(tmp_path, micro_model, token_windows):
    with pytest.raises(BitNetError, match="fewer than one batch"):
        Trainer(micro_model(), _cfg(tmp_path, batch_size=64), token_windows(4)).train()


def test_builder_and_result(tmp_path, micro_model, token_windows):
    cbs = (
        TrainingCallbacks.builder()
        .add_early_stopping(patience=3)
        .add_lr_scheduler("cosine", warmup_steps=1)
        .add_model_checkpointing(save_every=2)
        .add_metrics_logging(log_every=2)
        .build()
    )
    assert [type(c).__name__ for c in cbs] == [
        "EarlyStopping",
        "LRScheduling",
        "Checkpointing",
        "MetricsLogging",
    ]
    cfg = _cfg(tmp_path, max_steps=4, eval_every=2)
    r = Trainer(micro_model(), cfg, token_windows(), token_windows(2, seed=3), cbs).train()
    out = tmp_path / "run"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-00000002",
        "checkpoint-00000004",
    ]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    kinds = [(json.loads(x)["kind"], json.loads(x)["step"]) for x in lines]
    assert kinds == [("train", 2), ("eval", 2), ("train", 4), ("eval", 4)]
    assert r.best_checkpoint is not None and math.isfinite(r.best_metric)
    assert (out / "best").read_text().strip() == os.path.basename(r.best_checkpoint)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
