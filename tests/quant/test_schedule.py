import math

import pytest

from bitnet_training import ConfigError, QATConfig
from bitnet_training.quant.schedule import BitStage, QuantizationSchedule, bits_at


@pytest.mark.parametrize(
    "shape, expected",
    [
        ("linear", [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]),
        (
            "cosine",
            [
                0.0,
                0.0,
                (1 - math.cos(math.pi / 4)) / 2,
                0.5,
                (1 - math.cos(3 * math.pi / 4)) / 2,
                1.0,
                1.0,
            ],
        ),
        ("step", [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]),
    ],
)
def test_schedule_values_at_chosen_steps(shape, expected):
    s = QuantizationSchedule(shape, start_step=10, end_step=50)
    steps = [0, 10, 20, 30, 40, 50, 99]
    assert [s.value(t) for t in steps] == pytest.approx(expected)


def test_sigmoid_runs_from_0_to_1_symmetrically():
    s = QuantizationSchedule("sigmoid", start_step=0, end_step=100, sharpness=10)
    assert s.value(0) == 0.0 and s.value(100) == 1.0 and s.value(50) == pytest.approx(0.5)
    assert s.value(25) == pytest.approx(1 - s.value(75))
    assert s.value(10) < 0.25 * s.value(25) * 4  # slow start
    vals = [s.value(t) for t in range(101)]
    assert vals == sorted(vals)


def test_epochs_resolve_to_steps():
    s = QuantizationSchedule("linear", start_epoch=2, end_epoch=8)
    r = s.resolve(steps_per_epoch=10)
    assert (r.start_step, r.end_step) == (20, 80) and r.value(50) == pytest.approx(0.5)
    with pytest.raises(ConfigError):
        s.value(3)  # epochs need the run's steps per epoch first


def test_bit_stages():
    stages = [BitStage(0, 8), BitStage(100, 4), BitStage(200, 2), BitStage(300, 1.58)]
    assert [bits_at(stages, t, 1.58) for t in (0, 99, 100, 250, 300, 10**6)] == [
        8,
        8,
        4,
        2,
        1.58,
        1.58,
    ]
    assert bits_at([BitStage(50, 8)], 10, 1.58) == 1.58


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(weight_schedule={"shape": "exp"}), "QATConfig.weight_schedule.shape"),
        (
            dict(weight_schedule={"start_step": 10, "end_step": 5}),
            "QATConfig.weight_schedule.end_step",
        ),
        (dict(weight_bit_stages=[[0, 3.3]]), "QATConfig.weight_bit_stages[0].bits"),
        (dict(quant_noise=0.0), "QATConfig.quant_noise"),
        (dict(quant_noise=1.5), "QATConfig.quant_noise"),
        (dict(noise_factor=-1), "QATConfig.noise_factor"),
        (dict(quant_noise_block_size=0), "QATConfig.quant_noise_block_size"),
    ],
)
def test_progressive_config_validation(kwargs, field):
    with pytest.raises(ConfigError) as e:
        QATConfig(**kwargs)
    assert e.value.field == field


def test_progressive_flag():
    assert not QATConfig().progressive
    assert QATConfig(weight_schedule={"end_step": 10}).progressive
    assert QATConfig(weight_bit_stages=[(0, 8)]).weight_bit_stages == [BitStage(0, 8)]
