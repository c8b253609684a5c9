import pytest

from bitnet_training import ConfigError
from bitnet_training.optim import OptimizerConfig, SchedulerConfig
from bitnet_training.train import TrainingConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(learning_rate=0), "training.learning_rate"),
        (dict(batch_size=0), "training.batch_size"),
        (dict(batch_size=2.5), "training.batch_size"),
        (dict(gradient_accumulation_steps=-1), "training.gradient_accumulation_steps"),
        (dict(mixed_precision="fp8"), "training.mixed_precision"),
        (dict(backoff_factor=1.5), "training.backoff_factor"),
        (dict(growth_factor=1.0), "training.growth_factor"),
        (dict(save_total_limit=0), "training.save_total_limit"),
        (dict(gradient_clip_norm=-1.0), "training.gradient_clip_norm"),
        (dict(best_mode="up"), "training.best_mode"),
        (dict(device="tpu"), "training.device"),
    ],
)
def test_training_config_rejects(kwargs, field):
    with pytest.raises(ConfigError) as e:
        TrainingConfig(**kwargs)
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}=")


def test_nested_configs_and_shorthands():
    assert TrainingConfig(optimizer="sgd").optimizer == OptimizerConfig(name="sgd")
    assert TrainingConfig(scheduler="cosine").scheduler.name == "cosine"
    assert TrainingConfig(optimizer={"name": "sgd", "momentum": 0.5}).optimizer.momentum == 0.5
    assert TrainingConfig(mixed_precision=False).mixed_precision == "fp32"
    with pytest.raises(ConfigError, match="training.optimizer.name"):
        OptimizerConfig(name="lamb")
    with pytest.raises(ConfigError, match="training.optimizer.beta2"):
        OptimizerConfig(beta2=1.0)
    with pytest.raises(ConfigError, match="training.scheduler.stage_two_lr_factor"):
        SchedulerConfig(stage_two_lr_factor=0)


def test_rng_round_trip_through_json():
    import json
    import random

    import numpy as np
    import torch

    from bitnet_training.train.rng import capture_rng, restore_rng

    tensors, jsonable = capture_rng()
    jsonable = json.loads(json.dumps(jsonable))
    a = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(tensors, jsonable)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def test_precision_auto_on_cpu_is_bf16():
    import torch

    from bitnet_training.train.precision import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
