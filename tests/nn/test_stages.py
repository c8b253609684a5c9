import json

import pytest
import torch

from bitnet_training import BitLinear, QATConfig
from bitnet_training.nn import MultiStage, QATControl, QuantizationTuner, TrainingStage
from bitnet_training.optim import SchedulerConfig
from bitnet_training.train import Callback, Trainer, TrainerState, TrainingConfig

STAGES = [
    TrainingStage(
        3, "fp", qat={"enable_weight_quantization": False, "enable_activation_quantization": False}
    ),
    TrainingStage(3, "ternary", lr_factor=0.5),
    TrainingStage(2, "4-bit acts", lr_factor=0.25, qat={"activation_bits": 4}),
]


class Record(Callback):
    order = -5  # after MultiStage has applied the stage and its LR factor

    def __init__(self):
        self.seen = []

    def on_step_begin(self, trainer):
        layer = trainer.model.model.layers[0].mlp.up_proj
        self.seen.append(
            (
                layer.config.enable_weight_quantization,
                layer.config.activation_bits,
                trainer.optimizer.param_groups[0]["lr"],
            )
        )


def _cfg(tmp_path, name, **kw):
    return TrainingConfig(
        output_dir=str(tmp_path / name),
        batch_size=2,
        max_steps=9,
        learning_rate=1e-3,
        scheduler=SchedulerConfig("constant"),
        log_every=1,
        mixed_precision="fp32",
        save_every=4,
        **kw,
    )


def test_stage_transitions_and_lr_factors(tmp_path, micro_model, token_windows):
    rec = Record()
    r = Trainer(
        micro_model(),
        _cfg(tmp_path, "a"),
        token_windows(),
        None,
        [QATControl(), MultiStage(STAGES), rec],
    ).train()
    assert rec.seen == [(False, 8, 1e-3)] * 3 + [(True, 8, 5e-4)] * 3 + [(True, 4, 2.5e-4)] * 3
    assert [h["stage"] for h in r.history if h["kind"] == "train"] == [0] * 3 + [1] * 3 + [2] * 3
    # The log shows the rate each step used: the schedule's times the stage's factor.
    assert [h["lr"] for h in r.history if h["kind"] == "train"] == [seen[2] for seen in rec.seen]


def test_resume_mid_stage_is_exact(tmp_path, micro_model, token_windows):
    data = token_windows()

    def callbacks(*extra):
        return [QATControl(), MultiStage(STAGES), *extra]

    full = Trainer(micro_model(), _cfg(tmp_path, "full"), data, None, callbacks()).train()

    class Stop(Callback):
        def on_step_end(self, trainer):
            trainer.state.should_stop = trainer.state.step == 4

    part = Trainer(micro_model(), _cfg(tmp_path, "part"), data, None, callbacks(Stop())).train()
    rest = Trainer(micro_model(seed=3), _cfg(tmp_path, "part"), data, None, callbacks())
    r2 = rest.train(resume_from="latest")
    losses = [h["loss"] for r in (part, r2) for h in r.history if h["kind"] == "train"]
    assert losses == [h["loss"] for h in full.history if h["kind"] == "train"]
    state = json.loads(
        (tmp_path / "part" / "checkpoint-00000004" / "trainer_state.json").read_text()
    )
    assert state["callbacks"]["MultiStage"] == {"stage": 1, "name": "ternary"}


def test_tuner_holds_and_releases():
    layer = BitLinear(4, 4, config=QATConfig(weight_schedule={"end_step": 100}))
    trainer = type("T", (), {})()
    trainer.model, trainer.state, trainer.steps_per_epoch = (
        torch.nn.Sequential(layer),
        TrainerState(),
        1,
    )
    control, tuner = QATControl(), QuantizationTuner(threshold=0.05)
    trainer.callbacks = [control, tuner]
    control.setup(trainer)
    tuner.setup(trainer)

    def evaluate(loss, steps=0):
        for _ in range(steps):
            trainer.state.step += 1
            tuner.on_step_end(trainer)
        metrics = {"val_loss": loss}
        tuner.on_evaluate(trainer, metrics)
        return metrics["qat_tuner_hold"]

    assert evaluate(2.0) == 0  # the first evaluation sets the best
    assert evaluate(2.09, steps=10) == 0  # within 5% of 2.0
    assert evaluate(2.2, steps=10) == 1  # worse by more than 5%: hold
    assert evaluate(2.15, steps=10) == 1  # still too high: keep holding
    assert control.held_steps == 10
    assert evaluate(2.08, steps=10) == 0  # back within the threshold: release
    assert control.held_steps == 20 and control.schedule_step(trainer) == 40 - 20
    assert [d["decision"] for d in tuner.decisions] == [
        "continue",
        "continue",
        "hold",
        "keep holding",
        "release",
    ]
    layer.set_progress(200)  # once quantization has finished tightening, never hold
    trainer.state.step = 300
    assert evaluate(9.0) == 0


def test_tuner_needs_control(tmp_path, micro_model, token_windows):
    from bitnet_training import BitNetError

    with pytest.raises(BitNetError, match="needs a QATControl"):
        Trainer(
            micro_model(qat=False),
            _cfg(tmp_path, "t"),
            token_windows(),
            None,
            [QuantizationTuner()],
        ).train()
