"""The run configuration: model, quantization, training, data and sampling in one tree.

`load_config(path, overrides)` reads a YAML file, applies dotted `key=value` overrides and
builds a validated `RunConfig`. Each key is declared once, as a field of a section (see
`settings.py`): unknown keys are errors with a did-you-mean, values are checked against the
field's type and range, and errors name the dotted key. `config_table()` is the README's table.
"""

from __future__ import annotations

import typing
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, model_validator

from .data.config import DataConfig
from .distributed.config import DistributedConfig
from .errors import BitNetError, ConfigError
from .loss.config import DistillConfig, LossConfig, TeacherConfig
from .models.config import PRESETS, ModelConfig
from .models.export_targets import TARGETS
from .nn.qat_callbacks import TrainingStage
from .peft.config import METHOD_KEYS, PEFTConfig
from .quant.config import QATConfig
from .settings import Section, field_type, section_of, split_optional, table, validate
from .train.config import TrainingConfig


class SampleConfig(Section):
    """The text sample printed at the end of training (and `generate`'s defaults)."""

    _path = "sample"

    prompt: str = Field("The ", description="the text the sample continues")
    max_new_tokens: int = Field(200, ge=0, description="tokens to generate (0: no sample)")
    temperature: float = Field(0.8, ge=0, description="softmax temperature (0: greedy)")
    top_k: int | None = Field(40, gt=0, description="sample from the k likeliest (None: all)")
    seed: int = Field(0, ge=0, description="the sampling seed")


class RunConfig(Section):
    """A whole run: the model, how it is quantized, trained, fed and sampled."""

    model_preset: Literal[tuple(PRESETS)] = Field(
        "tiny",
        description="base shape (tiny: 6.5 M parameters, small, 2b4t); model keys override "
        "its values (their defaults below are tiny's)",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="the architecture")
    quantize: bool = Field(
        True,
        description="false: the same architecture with nn.Linear (the full-precision "
        "baseline); qat, stages and qat_tuner must then keep their defaults",
    )
    diagnostics: bool = Field(
        True, description="ternary statistics (share of -1/0/+1, flips, error) in each log"
    )
    export_target: Literal[TARGETS] = Field(
        "none",
        description="the format the run will be exported to (hf, ternary, gguf-tq2_0, ...): "
        "what it cannot hold (llama.cpp's SiLU / tied / 256-wide layers, 4-row packing) is "
        "refused before training starts",
    )
    qat: QATConfig = Field(default_factory=QATConfig, description="quantization (BitNet b1.58)")
    peft: PEFTConfig = Field(
        default_factory=PEFTConfig, description="parameter-efficient fine-tuning (adapters)"
    )
    loss: LossConfig = Field(
        default_factory=LossConfig,
        description="the training objective (cross-entropy, distillation)",
    )
    teacher: TeacherConfig = Field(
        default_factory=TeacherConfig, description="the frozen teacher of distillation"
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="distributed training under torchrun: DDP, FSDP2, tensor parallel",
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="how the Trainer runs"
    )
    data: DataConfig = Field(default_factory=DataConfig, description="the training text")
    sample: SampleConfig = Field(
        default_factory=SampleConfig, description="the end-of-training sample"
    )
    stages: list[TrainingStage] = Field(
        default_factory=list, description="train in stages, each with its own qat and LR factor"
    )
    qat_tuner: float | None = Field(
        None,
        ge=0,
        description="hold progressive quantization while the validation loss is this much "
        "(relative) worse than its best (None: off)",
    )
    init_from: str = Field(
        "",
        description="start from this run's or checkpoint's weights, with a fresh optimizer "
        "and schedule (how a full-precision run is converted)",
    )

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        # The preset is the base the `model` keys override (an unknown name: refused below).
        preset = data.get("model_preset", "tiny") if isinstance(data, dict) else None
        model = (data.get("model") or {}) if preset in PRESETS else None
        return {**data, "model": {**PRESETS[preset], **model}} if isinstance(model, dict) else data

    @model_validator(mode="after")
    def _check(self):
        if not self.model.pretrained and self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(
                "data.seq_len",
                self.data.seq_len,
                f"at most model.max_position_embeddings ({self.model.max_position_embeddings})",
            )
        if not self.quantize:
            default = dict(QATConfig())
            for name, value in self.qat:
                if value != default[name]:
                    raise ConfigError(
                        f"qat.{name}",
                        value,
                        f"its default ({default[name]!r}) when quantize is false",
                    )
            for name, off in (("stages", []), ("qat_tuner", None)):
                if getattr(self, name) != off:
                    raise ConfigError(name, getattr(self, name), f"{off} when quantize is false")
        for i, stage in enumerate(self.stages):
            # Each stage's overrides must make a valid QATConfig; keep them validated.
            merged = validate(QATConfig, {**dict(self.qat), **stage.qat}, f"stages[{i}].qat")
            stage.__dict__["qat"] = {k: getattr(merged, k) for k in stage.qat}
        return self

    def to_yaml(self) -> str:
        """The config as YAML (`--print-config`); `load_config` reads it back. With
        `model.pretrained` the model keys that would be refused beside it are left out."""
        d = self.to_dict()
        if self.model.pretrained:
            del d["model_preset"]
            d["model"] = {"pretrained": self.model.pretrained}
        return yaml.safe_dump(d, sort_keys=False)


def config_table() -> str:
    """The README's configuration table (markdown): every key with its default, what it
    allows and what it does, from the declarations."""
    return table(RunConfig)


# ---------------------------------------------------------------- reading
def apply_override(data: dict, item: str) -> None:
    """Apply one `dotted.key=value` to the nested mapping `data`. The value is read as YAML
    (numbers, booleans, lists, null) unless the field takes strings (a string, a list of
    strings, a choice of words)."""
    if "=" not in item:
        raise BitNetError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    base, _ = split_optional(field_type(RunConfig, key))
    words = typing.get_origin(base) is Literal and all(isinstance(c, str) for c in get_args(base))
    if base == list[str] and raw.strip().startswith("["):  # a YAML list: [a.txt, b.txt]
        value: Any = yaml.safe_load(raw)
    elif base is str or base == list[str] or words:  # `no` stays a word, not YAML's false
        value = raw
    else:
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
    *path, last = key.split(".")
    node, owner = data, RunConfig
    for part in path:
        owner = section_of(owner.model_fields[part].annotation)
        if isinstance(node.get(part), str) and owner._shorthand:  # `optimizer: sgd`, then a key
            node[part] = {owner._shorthand: node[part]}
        elif not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    target = section_of(owner.model_fields[last].annotation) if last in owner.model_fields else None
    if target and target._shorthand and isinstance(value, str) and isinstance(node.get(last), dict):
        value = {**node[last], target._shorthand: value}  # a name keeps the keys given before
    node[last] = value


def read_yaml(path: str) -> dict:
    """The mapping in YAML file `path`; a missing, binary or malformed file is a one-line
    `BitNetError`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise BitNetError(f"config file {path!r} does not exist") from None
    except IsADirectoryError:
        raise BitNetError(f"config file {path!r} is a directory") from None
    except UnicodeDecodeError:
        raise BitNetError(f"config file {path!r} is not UTF-8 text") from None
    except OSError as e:
        raise BitNetError(f"cannot read config file {path!r}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise BitNetError(f"config file {path!r}: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BitNetError(
            f"config file {path!r} must hold a mapping of sections, not a list or value"
        )
    return data


def config_from_dict(data: dict) -> RunConfig:
    """A validated `RunConfig` from a nested mapping (a YAML file's content, or a stored
    run config: `to_dict()` of a checkpoint, every key present)."""
    return validate(RunConfig, data)


def migrate_stored(data: dict) -> dict:
    """A stored run config of an older version with its moved settings moved (what a user
    writes is refused with the new key instead): `training.optimizer.latent_clip` ->
    `qat.latent_clip`, `training.optimizer.name: qat_adamw | qat_sgd` -> `adamw | sgd` with
    `qat.weight_decay_on: linear`, `qat.input_norm: true` -> `qat.norm_placement: input`."""
    import copy

    data = copy.deepcopy(data)
    opt = (data.get("training") or {}).get("optimizer")
    qat = data.setdefault("qat", {}) if isinstance(data.get("qat", {}), dict) else {}
    if isinstance(opt, dict):
        if opt.get("latent_clip") is not None:
            qat["latent_clip"] = opt.pop("latent_clip")
        if opt.get("name") in ("qat_adamw", "qat_sgd"):
            opt["name"] = opt["name"][4:]
            qat["weight_decay_on"] = "linear"
    if qat.get("input_norm"):
        del qat["input_norm"]
        qat["norm_placement"] = "input"
    return data


def load_config(path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML `path` (or start from the defaults), apply `key=value` `overrides` in
    order, and validate everything."""
    data = read_yaml(path) if path else {}
    for item in overrides:
        apply_override(data, item)
    refuse_ignored(data)
    cfg = config_from_dict(data)
    refuse_without_effect(data, cfg)
    return cfg


# Keys that only act in some settings: (key, applies(cfg), when it applies). A key the user
# gives where it would do nothing is refused, so no setting is silently ignored.
CONDITIONAL_KEYS: list[tuple[str, Any, str]] = [
    ("diagnostics", lambda c: c.quantize, "quantize=true"),
    *(
        (
            f"distributed.{k}",
            lambda c: c.distributed.gradient_compression == "powersgd",
            "distributed.gradient_compression=powersgd",
        )
        for k in ("powersgd_rank", "powersgd_start_step")
    ),
    ("loss.penalty_params", lambda c: bool(c.loss.l1 or c.loss.l2), "loss.l1 or loss.l2 > 0"),
    *(
        (f"loss.{k}", lambda c: c.loss.objective == "contrastive", "loss.objective=contrastive")
        for k in ("temperature", "pooling")
    ),
    *(
        (f"loss.{k}", lambda c: c.loss.objective == "lm", "loss.objective=lm")
        for k in ("label_smoothing", "z_loss", "chunk_size")
    ),
    *(
        (f"training.{k}", lambda c: c.training.wandb != "off", "training.wandb on")
        for k in ("wandb_project", "wandb_name")
    ),
    *(
        (f"loss.distill.{k}", lambda c: bool(c.teacher.pretrained), "teacher.pretrained")
        for k in DistillConfig.model_fields
    ),
    ("training.optimizer.momentum", lambda c: c.training.optimizer.name == "sgd", "sgd"),
    ("training.optimizer.nesterov", lambda c: c.training.optimizer.name == "sgd", "sgd"),
    *(
        (f"training.optimizer.{k}", lambda c: c.training.optimizer.name != "sgd", "adamw")
        for k in ("beta1", "beta2", "eps")
    ),
    (
        "training.scheduler.t_max",
        lambda c: c.training.scheduler.name in ("linear", "cosine", "two_stage"),
        "the linear, cosine or two_stage schedule",
    ),
    (
        "training.scheduler.eta_min",
        lambda c: c.training.scheduler.name != "constant",
        "a decaying schedule (not constant)",
    ),
    (
        "training.scheduler.stage_two_lr_factor",
        lambda c: c.training.scheduler.name == "two_stage",
        "the two_stage schedule",
    ),
    (
        "training.scheduler.stage_two_weight_decay",
        lambda c: c.training.scheduler.name == "two_stage",
        "the two_stage schedule",
    ),
    (
        "training.scheduler.decay_fraction",
        lambda c: c.training.scheduler.name == "wsd",
        "the wsd schedule",
    ),
    ("training.agc_eps", lambda c: c.training.agc_clip_factor is not None, "agc_clip_factor"),
    *(
        (f"training.{k}", lambda c: c.training.mixed_precision in ("fp16", "auto"), "fp16")
        for k in ("init_scale", "growth_factor", "backoff_factor", "growth_interval")
    ),
    (
        "training.early_stopping_min_delta",
        lambda c: c.training.early_stopping_patience is not None,
        "training.early_stopping_patience",
    ),
    (
        "training.dataloader_workers",
        lambda c: c.data.source == "stream",
        "data.source=stream",
    ),
    ("data.shards_dir", lambda c: c.data.source == "shards", "data.source=shards"),
    ("data.sampling", lambda c: c.data.source == "shards", "data.source=shards"),
    ("data.shuffle_buffer", lambda c: c.data.source == "stream", "data.source=stream"),
    (
        "data.jsonl_field",
        lambda c: c.data.source == "stream" or bool(c.data.val_files),
        "data.source=stream or data.val_files (JSON lines)",
    ),
    (
        "data.val_fraction",
        lambda c: c.data.source in ("embedded", "files") and not c.data.val_files,
        "data.source embedded or files without data.val_files",
    ),
    (
        "qat.observer_momentum",
        lambda c: c.qat.activation_observer == "ema",
        "qat.activation_observer=ema",
    ),
    (
        "qat.observer_percentile",
        lambda c: c.qat.activation_observer == "percentile",
        "qat.activation_observer=percentile",
    ),
    *(
        (f"qat.{k}", lambda c: c.qat.activation_observer is not None, "qat.activation_observer")
        for k in (
            "online_calibration",
            "calibration_frequency",
            "calibration_samples",
            "calibration_until",
        )
    ),
    (
        "qat.quant_noise_block_size",
        lambda c: c.qat.quant_noise is not None,
        "qat.quant_noise",
    ),
    *(
        (f"peft.{k}", lambda c, m=methods: c.peft.method in m, f"peft.method {' / '.join(methods)}")
        for k, methods in METHOD_KEYS.items()
    ),
    # `true` was the default before `auto`: the printed configs of earlier versions hold it.
    ("qat.integer_matmul", lambda c: c.qat.fused or c.qat.integer_matmul is True, "qat.fused=true"),
    (
        "qat.saved_activations",
        lambda c: (
            c.qat.fused
            and c.qat.enable_activation_quantization
            and c.qat.activation_observer is None
        ),
        "qat.fused=true with dynamic activation quantization (no qat.activation_observer)",
    ),
    (
        "qat.gemm",
        lambda c: c.qat.fused and c.qat.integer_matmul is not False,
        "qat.fused=true and qat.integer_matmul true or auto",
    ),
    (
        "qat.weight_bits",
        lambda c: c.qat.enable_weight_quantization,
        "qat.enable_weight_quantization=true",
    ),
    (
        "qat.activation_bits",
        lambda c: c.qat.enable_activation_quantization,
        "qat.enable_activation_quantization=true",
    ),
    ("training.save_every", lambda c: not c.training.save_best_only, "save_best_only=false"),
    ("data.augment.span_length", lambda c: c.data.augment.span_prob > 0, "augment.span_prob > 0"),
    (
        "data.augment.mask_token_id",
        lambda c: c.data.augment.mask_prob > 0,
        "data.augment.mask_prob > 0",
    ),
    ("sample.top_k", lambda c: c.sample.temperature > 0, "sample.temperature > 0 (sampling)"),
]


def _given(data: dict, key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _value(cfg: Section, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _shown(value) -> str:
    """A value as the user writes it on the command line (true / false / null, lists)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value)


def refuse_without_effect(data: dict, cfg: RunConfig) -> None:
    """Refuse a key the user wrote (in `data`) with a value other than its default that `cfg`
    would not use (`CONDITIONAL_KEYS`): e.g. `training.optimizer.momentum` with AdamW,
    `data.shards_dir` without shards. (A printed config holds every key at its value: the
    defaults among them load back.)"""
    defaults = RunConfig()
    for key, applies, when in CONDITIONAL_KEYS:
        if _given(data, key) and not applies(cfg) and _value(cfg, key) != _value(defaults, key):
            raise BitNetError(
                f"{key}={_shown(_value(cfg, key))} has no effect here: it applies only with {when}"
            )


def refuse_ignored(data: dict) -> None:
    """Refuse keys a user gave that the run would ignore: `model_preset` or other model keys
    beside `model.pretrained` (the architecture comes from the pretrained model), and
    `data.train_files` with `data.source` embedded or shards. (Stored run configs hold every
    key, so this checks what a user wrote, not `config_from_dict`'s input.)"""
    model, d = data.get("model"), data.get("data")
    if isinstance(model, dict) and model.get("pretrained"):
        other = [f"model.{k}" for k in model if k != "pretrained"]
        other += ["model_preset"] if "model_preset" in data else []
        if other:
            raise BitNetError(
                f"{other[0]} and model.pretrained exclude each other: the architecture comes "
                "from the pretrained model"
            )
    if isinstance(d, dict) and d.get("train_files") and d.get("source") in ("embedded", "shards"):
        raise BitNetError(
            f"data.train_files and data.source={d['source']} exclude each other: train on "
            "files with data.source=files or stream (or leave data.source out)"
        )
