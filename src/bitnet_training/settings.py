"""The base of every config section: each setting is declared once, as a pydantic field.

A field's annotation (`int`, `float`, `bool`, `str`, `list[str]`, a `Literal` of choices, a
nested section, `| None`), its default, its bounds (`Field(gt=, ge=, lt=, le=)`) and its
one-line `description` are the whole declaration. From it come YAML loading and `key=value`
overrides (`bitnet_training.config`), `--print-config` (`to_dict`), the README's config table
(`table`) and the error messages: pydantic's `ValidationError` becomes our one-line
`ConfigError` naming the dotted key, the value and what `describe` says the field allows.
Validation is strict ("3" is not an int, 1.5 is not an int, "yes" is not a bool); the forms a
YAML file or a command line gives are read in one place, `Section._read`.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, ClassVar, Literal, Union

import annotated_types as at
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import BitNetError, ConfigError

_UNSET = object()


class Refused(ValueError):
    """Raised inside validation for a problem other than a bad value (an unknown or moved
    key). `text` is the message, with `{key}` for the full dotted key of `field` and `{path}`
    for its section's prefix (`training.`)."""

    def __init__(self, field: str, text: str):
        super().__init__(text)
        self.field, self.text = field, text


class _Constructor(type(BaseModel)):
    """Calling a section class from Python: fields may be given positionally (as with a
    dataclass), and an invalid value raises our one-line error, not pydantic's. (A metaclass,
    not `__init__`: pydantic calls a custom `__init__` for nested sections too.)"""

    def __call__(cls, *args: Any, **kwargs: Any):
        names = list(cls.model_fields)
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__} takes at most {len(names)} positional values")
        for name, value in zip(names, args, strict=False):
            if name in kwargs:
                raise TypeError(f"{cls.__name__} got two values for {name!r}")
            kwargs[name] = value
        try:
            return super().__call__(**kwargs)
        except ValidationError as e:
            raise user_error(cls, e, cls._path) from None


class Section(BaseModel, metaclass=_Constructor):
    """A config section. Subclasses declare fields; cross-field rules are `model_validator`s
    that raise `ConfigError(field, value, allowed)` with the field's name in the section.

    Class settings: `_path` names the section in errors when it is built on its own
    (`TrainingConfig(batch_size=0)`: `training.batch_size=0 is invalid`); `_shorthand` is the
    field a bare string sets (`optimizer: sgd`); `_as_list` accepts a list of every field's
    value in order (`[step, bits]`); `_moved` maps a former key to (its former default, where
    the setting went): the former default is dropped (a stored config of an older version),
    anything else is refused with the new place. Fields may also be given positionally."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        validate_assignment=True,
        allow_inf_nan=False,
        protected_namespaces=(),
    )
    _path: ClassVar[str] = ""
    _shorthand: ClassVar[str | None] = None
    _as_list: ClassVar[bool] = False
    _moved: ClassVar[dict[str, tuple[Any, str]]] = {}

    def __setattr__(self, name: str, value: Any) -> None:
        old = self.__dict__.get(name, _UNSET)
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            if old is not _UNSET:  # a cross-field rule failed after the value was stored
                self.__dict__[name] = old
            raise user_error(type(self), e, self._path) from None

    def to_dict(self) -> dict:
        """Every field as plain YAML / JSON values (sections as nested mappings)."""
        return self.model_dump()

    @model_validator(mode="before")
    @classmethod
    def _read(cls, data: Any) -> Any:
        """The forms YAML and `key=value` give, as the fields' types: a bare string for a
        section with a shorthand, a list for a list section, `none` / `null` for None,
        `1e-3` (a string to YAML 1.1) for a float, `a.txt,b.txt` for a list of strings, an
        empty YAML section for its defaults. Unknown keys are refused with a did-you-mean."""
        if isinstance(data, str) and cls._shorthand:
            data = {cls._shorthand: data}
        elif isinstance(data, list | tuple) and cls._as_list:
            names = list(cls.model_fields)
            if len(data) != len(names):
                raise ConfigError("", list(data), f"[{', '.join(names)}] lists or mappings")
            data = dict(zip(names, data, strict=True))
        if not isinstance(data, dict):
            return data
        out = {}
        for key, value in data.items():
            field = cls.model_fields.get(key)
            if field is None:
                if key in cls._moved:
                    old, where = cls._moved[key]
                    if value == old:  # an older version's stored default: no effect
                        continue
                    raise Refused(str(key), "'{key}' moved: set " + where + " instead")
                raise Refused(str(key), unknown_key(cls, str(key)))
            out[key] = _read_value(str(key), value, field.annotation, field.metadata)
        return out


def _read_value(key: str, value: Any, tp: Any, metadata: list) -> Any:
    base, optional = split_optional(tp)
    if value is None and not optional and section_of(base) is base:
        return {}
    if optional and isinstance(value, str) and value.lower() in ("none", "null"):
        return None
    choices = typing.get_args(base) if typing.get_origin(base) is Literal else ()
    if isinstance(value, bool) and any(_is_number(c) for c in choices):
        # pydantic would read True as the choice 1 of a numeric Literal
        raise ConfigError(key, value, describe(tp, metadata))
    if base is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if base == list[str] and isinstance(value, str):
        return [v for v in value.split(",") if v]
    return value


# ---------------------------------------------------------------- types and their words
def split_optional(tp: Any) -> tuple[Any, bool]:
    """(`tp` without None, whether None is allowed)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        rest = args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007
        return rest, len(args) < len(typing.get_args(tp))
    return tp, False


def section_of(tp: Any) -> type[Section] | None:
    """The section class `tp` holds (itself, optional or in a list), or None."""
    base, _ = split_optional(tp)
    if typing.get_origin(base) is list:
        base = typing.get_args(base)[0]
    return base if isinstance(base, type) and issubclass(base, Section) else None


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _num(x: Any) -> str:
    if isinstance(x, bool):
        return str(x).lower()  # as YAML and the command line spell it
    return f"{x:g}" if isinstance(x, float) else str(x)


def describe(tp: Any, metadata: list | tuple = (), type_only: bool = False) -> str:
    """What a field of type `tp` with constraints `metadata` allows, in words: `a positive
    integer`, `a number in (0, 1]`, `adamw or sgd`. `type_only`: only the type (for a value
    of the wrong type)."""
    base, optional = split_optional(tp)
    none = " or None" if optional else ""
    if typing.get_origin(base) is Literal:
        choices = [_num(c) for c in typing.get_args(base)] + (["None"] if optional else [])
        if len(choices) > 3:
            return "one of " + ", ".join(choices)
        return ", ".join(choices[:-1]) + " or " + choices[-1]
    if base is bool:
        return "true or false" + none
    if base in (int, float):
        noun = "an integer" if base is int else "a number"
        lo = [(m.gt, "(") for m in metadata if isinstance(m, at.Gt)]
        lo += [(m.ge, "[") for m in metadata if isinstance(m, at.Ge)]
        hi = [(m.lt, ")") for m in metadata if isinstance(m, at.Lt)]
        hi += [(m.le, "]") for m in metadata if isinstance(m, at.Le)]
        if type_only or not (lo or hi):
            return noun + none
        if lo and hi:
            return f"{noun} in {lo[0][1]}{_num(lo[0][0])}, {_num(hi[0][0])}{hi[0][1]}" + none
        if lo == [(0, "(")]:
            return f"a positive {noun.split()[-1]}" + none
        (v, kind), op = (lo or hi)[0], {"(": ">", "[": ">=", ")": "<", "]": "<="}
        return f"{noun} {op[kind]} {_num(v)}" + none
    if base is str:
        short = not type_only and any(isinstance(m, at.MinLen) for m in metadata)
        return ("a non-empty string" if short else "a string") + none
    if base == list[str]:
        return "a list of strings (comma-separated on the command line)" + none
    item = section_of(base)
    if item is not None and base is not item:
        if item._as_list:
            return f"a list of [{', '.join(item.model_fields)}] lists or mappings"
        return f"a list of {item.__name__} mappings"
    if item is not None:
        name = "a name or a mapping" if item._shorthand else "a mapping"
        return f"{name} of {item.__name__} keys" + none
    if typing.get_origin(base) is dict or base is dict:
        return "a mapping" + none
    return getattr(base, "__name__", str(base)) + none


# ---------------------------------------------------------------- errors
def _join(key: str, parts: list) -> str:
    for p in parts:
        if isinstance(p, int):
            key += f"[{p}]"
        elif p:
            key = f"{key}.{p}" if key else str(p)
    return key


def _target(cls: type[Section], loc: list) -> tuple[Any, list]:
    """The type and constraints of the field at pydantic location `loc` below `cls`."""
    owner, tp, metadata = cls, cls, []
    for part in loc:
        if isinstance(part, int):
            continue
        if owner is None or part not in owner.model_fields:
            break
        field = owner.model_fields[part]
        tp, metadata, owner = field.annotation, field.metadata, section_of(field.annotation)
    return tp, metadata


def user_error(cls: type[Section], exc: ValidationError, path: str = "") -> BitNetError:
    """The first error of `exc` (validating `cls`, itself at dotted `path`) as our one-line
    error naming the full dotted key. An error about a whole list item names the list."""
    err = exc.errors(include_url=False)[0]
    loc, cause = list(err["loc"]), (err.get("ctx") or {}).get("error")
    if loc and isinstance(loc[-1], int) and not getattr(cause, "field", ""):
        loc = loc[:-1]
    key = _join(path, loc)
    if isinstance(cause, ConfigError):
        return ConfigError(_join(key, [cause.field]) or "config", cause.value, cause.allowed)
    if isinstance(cause, Refused):
        text = cause.text.format(key=_join(key, [cause.field]), path=f"{key}." if key else "")
        return BitNetError(text)
    if isinstance(cause, BitNetError):
        return cause
    tp, metadata = _target(cls, loc)
    if err["type"] == "missing":
        return BitNetError(f"{key} is missing: expected {describe(tp, metadata)}")
    type_only = err["type"].endswith(("_type", "_parsing"))
    return ConfigError(key or "config", err.get("input"), describe(tp, metadata, type_only))


def validate(cls: type[Section], data: Any, path: str = "") -> Section:
    """`cls` from mapping `data`; an error names its key below `path`."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise user_error(cls, e, path) from None


def field_type(cls: type[Section], key: str) -> Any:
    """The annotation of dotted `key` below section `cls` (Any for a moved key, which
    validation refuses or drops); an unknown key is an error with a did-you-mean."""
    owner, tp, path = cls, None, ""
    for part in key.split("."):
        if owner is None:
            raise BitNetError(f"unknown config key {key!r}: {path!r} has no sub-keys")
        if part in owner._moved:
            return Any
        if part not in owner.model_fields:
            prefix = f"{path}." if path else ""
            raise BitNetError(unknown_key(owner, part).format(key=prefix + part, path=prefix))
        tp = owner.model_fields[part].annotation
        path = f"{path}.{part}" if path else part
        owner = section_of(tp) if typing.get_origin(split_optional(tp)[0]) is not list else None
    return tp


def unknown_key(owner: type[Section], part: str) -> str:
    """The message template (see `Refused`) for unknown key `part` of `owner`."""
    close = difflib.get_close_matches(part, list(owner.model_fields), n=1)
    return "unknown config key '{key}'" + (
        f" (did you mean '{{path}}{close[0]}'?)" if close else ""
    )


# ---------------------------------------------------------------- the table
def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    v = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(v, Section):
        return ""
    if v is None:
        return "`null`"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, str):
        return f"`{v}`" if v else '`""`'
    return f"`{_num(v) if not isinstance(v, list) else v}`"


def rows(cls: type[Section], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, default, allowed, description) of every field below `cls`, depth first."""
    out = []
    for name, field in cls.model_fields.items():
        key = prefix + name
        allowed = describe(field.annotation, field.metadata).replace("|", "\\|")
        desc = (field.description or "").replace("|", "\\|")
        out.append((f"`{key}`", _default(field), allowed, desc))
        sub = section_of(field.annotation)
        if sub is not None:
            is_list = typing.get_origin(split_optional(field.annotation)[0]) is list
            out += rows(sub, f"{key}[]." if is_list else f"{key}.")
    return out


def table(cls: type[Section]) -> str:
    """The markdown table of every key below `cls`: key, default, allowed values, meaning."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows(cls)]
    return "\n".join(lines) + "\n"
