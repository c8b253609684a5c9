import pytest
import yaml

from bitnet_training import BitNetError, ConfigError
from bitnet_training.config import RunConfig, config_from_dict, load_config


def test_defaults_and_overrides():
    cfg = load_config(
        None,
        [
            "training.max_steps=5",
            "qat.weight_bits=1",
            "training.optimizer=sgd",
            "training.optimizer.momentum=0.5",
            "data.train_files=a.txt,b.txt",
            "data.source=files",
            "training.learning_rate=1e-3",
            "training.output_dir=123",
            "model.num_hidden_layers=2",
        ],
    )
    assert cfg.training.max_steps == 5 and cfg.qat.weight_bits == 1
    assert cfg.training.optimizer.name == "sgd" and cfg.training.optimizer.momentum == 0.5
    assert cfg.data.train_files == ["a.txt", "b.txt"] and cfg.training.learning_rate == 1e-3
    assert cfg.training.output_dir == "123"  # a string field keeps the raw text
    assert cfg.model.num_hidden_layers == 2 and cfg.model.hidden_size == 384  # tiny preset


def test_yaml_quirks(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("training:\n  learning_rate: 1e-3\n  max_steps: null\n  eval_every: none\n")
    cfg = load_config(str(f))  # YAML 1.1 reads 1e-3 as a string; it is a float here
    assert cfg.training.learning_rate == 1e-3 and cfg.training.eval_every is None


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "training.learning_rat=1",
            "unknown config key 'training.learning_rat' (did you mean 'training.learning_rate'?)",
        ),
        ("trainig.seed=1", "did you mean 'training'?"),
        ("training.batch_size=abc", "training.batch_size='abc' is invalid: expected an integer"),
        ("training.batch_size=0", "training.batch_size=0 is invalid: expected a positive integer"),
        ("qat.weight_bits=3.5", "qat.weight_bits=3.5 is invalid"),
        ("training.mixed_precision=no", "training.mixed_precision='no' is invalid"),
        ("quantize=maybe", "quantize='maybe' is invalid: expected true or false"),
        ("model_preset=huge", "model_preset='huge' is invalid"),
        ("training.max_steps.x=1", "'training.max_steps' has no sub-keys"),
        ("training.seed", "is not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(BitNetError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(BitNetError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))
    b = tmp_path / "b.yaml"
    b.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(BitNetError, match="not UTF-8 text"):
        load_config(str(b))
    m = tmp_path / "m.yaml"
    m.write_text("training:\n  seed: [1\n")
    with pytest.raises(BitNetError, match=r"m.yaml'.*line \d"):
        load_config(str(m))
    s = tmp_path / "s.yaml"
    s.write_text("- a\n- b\n")
    with pytest.raises(BitNetError, match="must hold a mapping"):
        load_config(str(s))
    n = tmp_path / "n.yaml"
    n.write_text("training: 5\n")
    with pytest.raises(ConfigError, match="training=5 is invalid"):
        load_config(str(n))


def test_printed_config_round_trips():
    cfg = load_config(None, ["training.max_steps=7", "model.num_hidden_layers=3"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and isinstance(again, RunConfig)


def test_shipped_config_loads():
    cfg = load_config("configs/tiny.yaml")
    assert cfg.model_preset == "tiny" and cfg.quantize and cfg.qat.weight_bits == 1.58
    assert cfg.training.scheduler.name == "two_stage"
