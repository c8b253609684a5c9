"""The run configuration: model, quantization, training, data and sampling in one tree.

`load_config(path, overrides)` reads a YAML file, applies dotted `key=value` overrides and
builds a validated `RunConfig`. Every unknown key is an error with a did-you-mean; every value
is checked against its field's type and range, and errors name the dotted key.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Union

import yaml

from .data.config import DataConfig
from .errors import BitNetError, ConfigError
from .models.config import PRESETS, ModelConfig
from .nn.qat_callbacks import TrainingStage
from .quant.config import QATConfig
from .train.config import TrainingConfig


@dataclass
class SampleConfig:
    """The text sample printed at the end of training (and `generate`'s defaults)."""

    prompt: str = "The "
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 40
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ConfigError("sample.max_new_tokens", self.max_new_tokens, "an integer >= 0")
        if not self.temperature >= 0:
            raise ConfigError("sample.temperature", self.temperature, "a number >= 0 (0: greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigError("sample.top_k", self.top_k, "a positive integer or None")


@dataclass
class RunConfig:
    """A whole run. `model_preset` names the base shape (`tiny`, `small`, `2b4t`) that the
    `model` section's fields override; `quantize` false trains the same architecture with
    plain `nn.Linear` layers (the full-precision baseline), ignoring `qat`. `diagnostics`
    logs ternary statistics (share of -1 / 0 / +1, flip rate, quantization error) at every
    log step of a quantized run. `stages` (a list of `TrainingStage`: steps, name, lr_factor,
    qat overrides) runs the training in stages; `qat_tuner` (a relative threshold, e.g. 0.05)
    holds progressive quantization while the validation loss is that much worse than its
    best. `init_from` (a checkpoint or run directory) starts the model from those weights,
    with a fresh optimizer and schedule: how a trained full-precision run is converted."""

    model_preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    quantize: bool = True
    diagnostics: bool = True
    qat: QATConfig = field(default_factory=QATConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    stages: list[TrainingStage] = field(default_factory=list)
    qat_tuner: float | None = None
    init_from: str = ""

    def __post_init__(self):
        t = self.qat_tuner
        if t is not None and not (isinstance(t, int | float) and t >= 0):
            raise ConfigError("qat_tuner", t, "a relative threshold >= 0 or None (off)")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- building from mappings
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(path: str, key: str, known) -> BitNetError:
    full = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean {(path + '.' if path else '') + close[0]!r}?)" if close else ""
    return BitNetError(f"unknown config key {full!r}{hint}")


def _split_optional(tp) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _coerce(path: str, value, tp):
    """`value` as type `tp` (str, int, float, bool, list[str], optional of those), or a
    ConfigError naming `path`. YAML quirks are absorbed: `1e-3` (a string to YAML 1.1) is a
    float, `none` / `null` is None for optional fields, a single string is a one-item list."""
    base, optional = _split_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(path, value, f"a value of type {getattr(base, '__name__', base)}")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, value, "true or false")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(path, value, "an integer" + (" or None" if optional else ""))
    if base is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(path, value, "a number" + (" or None" if optional else ""))
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, value, "a string")
    if base is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(path, value, "a mapping")
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(path, value, "a list of strings")
    return value


def build(cls, data: dict | None, path: str = ""):
    """An instance of dataclass `cls` from mapping `data`: unknown keys are errors (with a
    did-you-mean), values are coerced to the field types, nested dataclasses are built
    recursively, and a validation error of the class is re-raised under the dotted `path`."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(path or "config", data, "a mapping of keys to values")
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(path, str(key), names)
        sub = f"{path}.{key}" if path else key
        tp = hints[key]
        inner, optional = _split_optional(tp)
        item = typing.get_args(inner)[0] if typing.get_origin(inner) is list else None
        if value is None and optional:
            kwargs[key] = None
        elif is_dataclass(inner):
            if isinstance(value, str):  # shorthand: optimizer: sgd
                kwargs[key] = value
            else:
                kwargs[key] = build(inner, value, sub)
        elif item is not None and is_dataclass(item):
            if not isinstance(value, list):
                raise ConfigError(sub, value, f"a list of {item.__name__} mappings")
            item_fields = [f.name for f in fields(item)]
            bad = [v for v in value if isinstance(v, list) and len(v) != len(item_fields)]
            if bad:
                raise ConfigError(sub, bad[0], f"[{', '.join(item_fields)}] lists or mappings")
            kwargs[key] = [
                build(
                    item,
                    dict(zip(item_fields, v, strict=False)) if isinstance(v, list) else v,
                    f"{sub}[{i}]",
                )
                for i, v in enumerate(value)
            ]
        else:
            kwargs[key] = _coerce(sub, value, tp)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # Name the key as the user wrote it: the class's own prefix becomes `path`.
        if path and not e.field.startswith(path + "."):
            parts = e.field.split(".")
            rest = parts[-1] if parts[-1] in names else ".".join(parts[1:])
            raise ConfigError(f"{path}.{rest}", e.value, e.allowed) from None
        raise


def _field_type(key: str):
    """The type of dotted `key` in `RunConfig`, or a did-you-mean error."""
    cls, tp, path = RunConfig, None, ""
    for part in key.split("."):
        if cls is None or not is_dataclass(cls):
            raise BitNetError(f"unknown config key {key!r}: {path!r} has no sub-keys")
        names = {f.name for f in fields(cls)}
        if part not in names:
            raise _unknown(path, part, names)
        tp = _hints(cls)[part]
        path = f"{path}.{part}" if path else part
        inner, _ = _split_optional(tp)
        cls = inner if is_dataclass(inner) else None
    return tp


def apply_override(data: dict, item: str) -> None:
    """Apply one `dotted.key=value` to the nested mapping `data`. The value is read as YAML
    (numbers, booleans, lists, null) unless the field is a string or a list of strings."""
    if "=" not in item:
        raise BitNetError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    tp = _field_type(key)
    base, _ = _split_optional(tp)
    if base is str or (typing.get_origin(base) is list and typing.get_args(base) == (str,)):
        value: Any = raw
    else:
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node.get(part), str):  # `optimizer: sgd` shorthand, then a sub-key
            node[part] = {"name": node[part]}
        elif not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


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
    """A validated `RunConfig` from a nested mapping (a YAML file's content)."""
    data = dict(data)
    preset = data.get("model_preset", RunConfig.model_preset)
    if preset not in PRESETS:
        raise ConfigError("model_preset", preset, f"one of {', '.join(PRESETS)}")
    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError("model", model, "a mapping of ModelConfig fields")
    data["model"] = {**PRESETS[preset], **model}
    cfg = build(RunConfig, data)
    if cfg.data.seq_len > cfg.model.max_position_embeddings:
        raise ConfigError(
            "data.seq_len",
            cfg.data.seq_len,
            f"at most model.max_position_embeddings ({cfg.model.max_position_embeddings})",
        )
    for i, stage in enumerate(cfg.stages):
        # Each stage's overrides must make a valid QATConfig; store them coerced.
        merged = build(QATConfig, {**asdict(cfg.qat), **stage.qat}, f"stages[{i}].qat")
        stage.qat = {k: getattr(merged, k) for k in stage.qat}
    return cfg


def load_config(path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML `path` (or start from the defaults), apply `key=value` `overrides` in
    order, and validate everything."""
    data = read_yaml(path) if path else {}
    for item in overrides:
        apply_override(data, item)
    return config_from_dict(data)
