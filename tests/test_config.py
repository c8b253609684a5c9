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
        ("qat.integer_matmul=1", "qat.integer_matmul=1 is invalid: expected auto, true or false"),
        ("qat.integer_matmul=yes!", "qat.integer_matmul='yes!' is invalid: expected auto, true"),
        ("qat.saved_activations=x_q", "qat.saved_activations='x_q' is invalid: expected auto"),
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


# ---------------------------------------------------------------- one declaration per key
def test_readme_holds_the_generated_table():
    from pathlib import Path

    from bitnet_training.config import config_table

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = config_table()
    assert "\n" + table + "\n" in readme  # exactly, as its own block
    rows = table.splitlines()[2:]
    assert all(row.rstrip(" |").split(" | ")[-1].strip() for row in rows)  # each has a meaning
    assert "| `training.scheduler.warmup_steps` | `0` | an integer >= 0 |" in table


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("training: {batch_size: '3'}", "training.batch_size='3' is invalid: expected an integer"),
        ("training: {batch_size: 1.5}", "training.batch_size=1.5 is invalid"),
        ("quantize: 'yes'", "quantize='yes' is invalid: expected true or false"),
        ("qat: {weight_bits: true}", "qat.weight_bits=True is invalid"),
        ("training: {learning_rate: .inf}", "training.learning_rate=inf is invalid"),
        ("training: {scheduler: {warmup_steps: -1}}", "training.scheduler.warmup_steps=-1 is "
         "invalid: expected an integer >= 0"),
        ("data: {val_fraction: 1}", "data.val_fraction=1 is invalid: expected a number in [0, 1)"),
        ("stages: [{steps: 0}]", "stages[0].steps=0 is invalid: expected a positive integer"),
        ("stages: [{name: x}]", "stages[0].steps is missing: expected a positive integer"),
        ("training: {lerning_rate: 1}", "unknown config key 'training.lerning_rate' (did you "
         "mean 'training.learning_rate'?)"),
        ("qat: {weight_schedule: {shap: linear}}", "unknown config key "
         "'qat.weight_schedule.shap' (did you mean 'qat.weight_schedule.shape'?)"),
        ("stages: [{steps: 2, qat: {wieght_bits: 1}}]", "unknown config key "
         "'stages[0].qat.wieght_bits' (did you mean 'stages[0].qat.weight_bits'?)"),
        ("stages: [{steps: 2, qat: {weight_bits: 3.3}}]", "stages[0].qat.weight_bits=3.3 is "
         "invalid"),
        ("stages: [{steps: 2, qat: {norm_placement: input}}]", "stages[0].qat.norm_placement="
         "'input' is invalid: expected the run's value"),
        ("training: {batch_size: 0, seed: -1}", "training.batch_size=0 is invalid"),
    ],
)  # fmt: skip
def test_strict_values_and_one_line_errors(tmp_path, yaml_text, message):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text + "\n")
    with pytest.raises(BitNetError) as e:
        load_config(str(f))
    assert message in str(e.value)
    assert "\n" not in str(e.value) and "pydantic" not in str(e.value)


def test_forms_yaml_and_overrides_give():
    cfg = load_config(
        None,
        [
            "training.learning_rate=1",  # an int is a number
            "qat.activation_observer=none",
            "training.mixed_precision=fp16",
            "training.scheduler=cosine",
            "qat.weight_bit_stages=[[100, 4], [0, 8]]",
            "stages=[[2, warm, 1.0, {activation_bits: 4}], {steps: 3}]",
            "data.augment.mask_token_id=null",
        ],
    )
    assert cfg.training.learning_rate == 1.0 and isinstance(cfg.training.learning_rate, float)
    assert cfg.qat.activation_observer is None and cfg.training.mixed_precision == "fp16"
    assert cfg.training.scheduler.name == "cosine" and cfg.training.scheduler.warmup_steps == 0
    assert [(s.step, s.bits) for s in cfg.qat.weight_bit_stages] == [(0, 8), (100, 4)]
    assert cfg.stages[0].name == "warm" and cfg.stages[0].qat == {"activation_bits": 4}
    assert cfg.stages[1].steps == 3
    with pytest.raises(ConfigError, match="training.mixed_precision='no' is invalid"):
        load_config(None, ["training.mixed_precision=no"])  # a word, not YAML's false


def test_python_construction_and_assignment():
    from bitnet_training.nn import TrainingStage
    from bitnet_training.optim import SchedulerConfig
    from bitnet_training.quant import QATConfig
    from bitnet_training.quant.schedule import BitStage
    from bitnet_training.train import TrainingConfig

    assert SchedulerConfig("cosine", warmup_steps=20).warmup_steps == 20
    assert TrainingStage(3, "ternary", lr_factor=0.5).name == "ternary"
    assert BitStage(0, 8.0).bits == 8
    t = TrainingConfig(learning_rate=1e-3, optimizer={"name": "sgd"})
    assert t.optimizer.name == "sgd" and t.to_dict()["optimizer"]["name"] == "sgd"
    with pytest.raises(TypeError):
        SchedulerConfig("cosine", name="linear")
    cfg = load_config(None, [])
    cfg.data.train_files = ["a.txt"]
    cfg.init_from = "runs/x"
    assert cfg.data.train_files == ["a.txt"] and cfg.init_from == "runs/x"
    with pytest.raises(ConfigError, match=r"^training.batch_size=0 is invalid"):
        cfg.training.batch_size = 0
    assert cfg.training.batch_size == 16
    q = QATConfig(per_channel=True)
    with pytest.raises(ConfigError, match="QATConfig.group_size=64"):
        q.group_size = 64  # a cross-field rule: the value is not kept
    assert q.group_size is None
    with pytest.raises(ConfigError, match="QATConfig.group_size=8"):
        q.replace(group_size=8)
    assert q.replace(weight_bits=4).weight_bits == 4 and q.weight_bits == 1.58


def test_declared_qat_settings():
    from bitnet_training.quant import QATConfig

    for kwargs, message in [
        ({"norm_placement": "pre"}, "QATConfig.norm_placement='pre' is invalid: expected model, "
         "input or subln"),
        ({"weight_decay_on": "all"}, "QATConfig.weight_decay_on='all' is invalid: expected "
         "matrices or linear"),
        ({"latent_clip": 0}, "QATConfig.latent_clip=0 is invalid: expected a positive number or "
         "None"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError) as e:
            QATConfig(**kwargs)
        assert str(e.value) == message
    assert QATConfig(norm_placement="input").input_norm


# ---------------------------------------------------------------- nothing silently ignored
def test_train_files_imply_files_and_refuse_other_sources():
    from bitnet_training.data.config import DataConfig

    assert load_config(None, ["data.train_files=notes.txt"]).data.source == "files"
    assert DataConfig(train_files=["a.txt"]).source == "files"
    assert load_config(None, ["data.train_files=a.gz", "data.source=stream"]).data.source == (
        "stream"
    )
    for source in ("embedded", "shards"):
        with pytest.raises(BitNetError) as e:
            load_config(None, [f"data.source={source}", "data.train_files=a.txt"])
        assert str(e.value).startswith(f"data.train_files and data.source={source} exclude")


def test_qat_keys_without_quantization_are_refused():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["quantize=false", "qat.weight_bits=1"])
    assert str(e.value) == (
        "qat.weight_bits=1 is invalid: expected its default (1.58) when quantize is false"
    )
    with pytest.raises(ConfigError, match=r"^stages=.* expected \[\] when quantize is false"):
        load_config(None, ["quantize=false", "stages=[{steps: 2}]"])
    with pytest.raises(ConfigError, match="^qat_tuner=0.05 is invalid: expected None when"):
        load_config(None, ["quantize=false", "qat_tuner=0.05"])
    plain = load_config(None, ["quantize=false"])
    assert config_from_dict(plain.to_dict()) == plain  # stored: every qat key, at its default


def test_moved_settings_name_their_new_key():
    for override, message in [
        ("training.optimizer.latent_clip=2",
         "'training.optimizer.latent_clip' moved: set qat.latent_clip instead"),
        ("training.optimizer.name=qat_adamw", "training.optimizer.name='qat_adamw' moved: set "
         "training.optimizer.name=adamw with qat.weight_decay_on=linear instead"),
        ("training.optimizer=qat_sgd", "training.optimizer.name='qat_sgd' moved: set "
         "training.optimizer.name=sgd with qat.weight_decay_on=linear instead"),
        ("qat.input_norm=true", "'qat.input_norm' moved: set qat.norm_placement=input instead"),
    ]:  # fmt: skip
        with pytest.raises(BitNetError) as e:
            load_config(None, [override])
        assert str(e.value) == message
    # A run config stored by an older version holds the moved keys at their old defaults.
    old = load_config(None, []).to_dict()
    old["training"]["optimizer"]["latent_clip"] = None
    old["qat"]["input_norm"] = False
    assert config_from_dict(old) == load_config(None, [])
    old["qat"]["input_norm"] = True
    with pytest.raises(BitNetError, match="'qat.input_norm' moved"):
        config_from_dict(old)


def test_pretrained_excludes_other_model_keys(tmp_path):
    cfg = load_config(None, ["model.pretrained=ckpt/llama"])
    assert cfg.model.pretrained == "ckpt/llama"
    for other, key in [("model.hidden_size=64", "model.hidden_size"),
                       ("model_preset=small", "model_preset")]:  # fmt: skip
        with pytest.raises(BitNetError) as e:
            load_config(None, ["model.pretrained=ckpt/llama", other])
        assert str(e.value) == (
            f"{key} and model.pretrained exclude each other: the architecture comes from the "
            "pretrained model"
        )
    assert config_from_dict(cfg.to_dict()) == cfg  # a stored config holds every key
    f = tmp_path / "printed.yaml"
    f.write_text(cfg.to_yaml())  # --print-config's output loads back
    assert load_config(str(f)) == cfg


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["training.optimizer.momentum=0.5"], "training.optimizer.momentum=0.5 has no effect"),
        (["training.optimizer=sgd", "training.optimizer.beta2=0.9"], "only with adamw"),
        (["training.scheduler.decay_fraction=0.5"], "only with the wsd schedule"),
        (["training.scheduler=constant", "training.scheduler.eta_min=1e-5"], "not constant"),
        (["data.shards_dir=x"], "only with data.source=shards"),
        (["quantize=false", "diagnostics=false"], "only with quantize=true"),
        (["qat.observer_percentile=99.0"], "qat.activation_observer=percentile"),
        (["training.agc_eps=0.01"], "only with agc_clip_factor"),
        (["training.mixed_precision=bf16", "training.init_scale=1024"], "only with fp16"),
        (["qat.integer_matmul=false", "qat.gemm=onednn"], "qat.integer_matmul true or auto"),
        (["qat.fused=false", "qat.gemm=onednn"], r"qat.fused=true and qat.integer_matmul"),
        (["qat.fused=false", "qat.saved_activations=codes"], "only with qat.fused=true"),
        (
            ["qat.activation_observer=minmax", "qat.saved_activations=values"],
            "no qat.activation_observer",
        ),
    ],
)
def test_settings_without_effect_are_refused(overrides, message):
    with pytest.raises(BitNetError, match=message):
        load_config(None, overrides)


def test_a_config_printed_before_integer_matmul_auto_loads(tmp_path):
    """`qat.integer_matmul: true` was the default: an earlier version's printed config holds
    it, with `qat.fused: false` too, and loads back."""
    data = RunConfig().to_dict()
    data["qat"].update(fused=False, integer_matmul=True)
    f = tmp_path / "old.yaml"
    f.write_text(yaml.safe_dump(data))
    cfg = load_config(str(f))
    assert cfg.qat.integer_matmul is True and not cfg.qat.fused
    assert load_config(None, ["qat.integer_matmul=false"]).qat.integer_matmul is False
    assert load_config(None, []).qat.integer_matmul == "auto"


def test_settings_with_effect_and_defaults_load():
    cfg = load_config(
        None,
        [
            "training.optimizer=sgd",
            "training.optimizer.momentum=0.5",
            "training.optimizer.beta1=0.9",  # AdamW's, at its default: harmless
            "training.scheduler=wsd",
            "training.scheduler.decay_fraction=0.5",
        ],
    )
    assert cfg.training.optimizer.momentum == 0.5 and cfg.training.scheduler.decay_fraction == 0.5


def test_stage_settings_fixed_for_the_run_are_refused():
    with pytest.raises(ConfigError, match="fixed for the whole run"):
        load_config(None, ["stages=[{steps: 2, qat: {latent_clip: 0.5}}]"])


def test_stored_configs_of_older_versions_migrate():
    from bitnet_training.config import migrate_stored

    old = RunConfig().to_dict()
    old["training"]["optimizer"].update(name="qat_adamw", latent_clip=2.0)
    old["qat"].pop("norm_placement")
    old["qat"]["input_norm"] = True
    cfg = config_from_dict(migrate_stored(old))
    assert cfg.training.optimizer.name == "adamw" and cfg.qat.weight_decay_on == "linear"
    assert cfg.qat.latent_clip == 2.0 and cfg.qat.norm_placement == "input"


def test_a_yaml_list_override():
    cfg = load_config(None, ["data.train_files=[a.txt, b.txt]"])
    assert cfg.data.train_files == ["a.txt", "b.txt"]
