import pytest

from bitnet_training import ConfigError
from bitnet_training.train import OptimizerConfig, SchedulerConfig, TrainingConfig


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
    assert TrainingConfig(mixed_precision=False).mixed_precision == "fp32"
    with pytest.raises(ConfigError, match="training.optimizer.name"):
        OptimizerConfig(name="lamb")
    with pytest.raises(ConfigError, match="training.optimizer.beta2"):
        OptimizerConfig(beta2=1.0)
    with pytest.raises(ConfigError, match="training.scheduler.stage_two_lr_factor"):
        SchedulerConfig(stage_two_lr_factor=0)
