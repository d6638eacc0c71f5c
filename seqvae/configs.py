"""Dataclass configs: strict conversion from JSON and from `--section.key=value` overrides.

The config classes live beside what they configure (`DrawConfig` in draw.py, `TrainConfig`
in train.py, ...). This module only knows how to read and write dataclasses: every key is
checked against the dataclass fields and every value against the field's type, so a typo
or a wrong type is a clear error, never a silent default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Union

__all__ = ["ConfigError", "to_dict", "from_dict", "parse_value", "apply_override", "check", "configure"]


class ConfigError(ValueError):
    """A config key or value that is not what the dataclass expects."""


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_inner(tp: Any) -> Any | None:
    """X for Optional[X] / X | None, else None."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _type_name(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} or none"
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"comma-separated {_type_name(args[0])}s"
        return f"{len(args)} comma-separated values ({', '.join(_type_name(a) for a in args)})"
    return getattr(tp, "__name__", str(tp))


def parse_value(text: str, tp: Any, key: str) -> Any:
    """Parse a command-line string as a value of type tp, or raise ConfigError."""
    inner = _optional_inner(tp)
    if inner is not None:
        if text.strip().lower() in ("none", "null", ""):
            return None
        return parse_value(text, inner, key)
    if typing.get_origin(tp) is tuple:
        parts = [p.strip() for p in text.strip().strip("()[]").split(",") if p.strip()]
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(p, args[0], key) for p in parts)
        if len(parts) != len(args):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {text!r}")
        return tuple(parse_value(p, a, key) for p, a in zip(parts, args))
    t = text.strip()
    if tp is bool:
        if t.lower() in _TRUE:
            return True
        if t.lower() in _FALSE:
            return False
        raise ConfigError(f"{key}: expected true or false, got {text!r}")
    if tp is int:
        try:
            return int(t)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if tp is float:
        try:
            value = float(t)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {text!r}")
        return value
    if tp is str:
        return t
    raise ConfigError(f"{key}: values of type {_type_name(tp)} cannot be set from the command line")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check a JSON value against tp (lists become tuples); raise ConfigError if it does not fit."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _coerce(value, inner, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (a JSON object), got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) dataclass config; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass cls from a dict, refusing unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a JSON object, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid keys are {', '.join(prefix + n for n in sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def apply_override(cfg: Any, assignment: str) -> Any:
    """Return a copy of cfg with one `section.key=value` (or `key=value`) assignment applied."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    path, text = assignment.split("=", 1)
    path = path.strip().lstrip("-")
    keys = path.split(".")
    return _apply(cfg, keys, text, path)


def _apply(cfg: Any, keys: list[str], text: str, full: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cfg)}
    head = keys[0]
    if head not in names:
        raise ConfigError(f"unknown config key {full!r}: {head!r} is not one of {', '.join(sorted(names))}")
    current = getattr(cfg, head)
    if len(keys) == 1:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"{full!r} is a section; set one of its keys, e.g. {full}.{dataclasses.fields(current)[0].name}=...")
        value = parse_value(text, _hints(type(cfg))[head], full)
        return dataclasses.replace(cfg, **{head: value})
    if not dataclasses.is_dataclass(current):
        raise ConfigError(f"unknown config key {full!r}: {head!r} has no sub-keys")
    return dataclasses.replace(cfg, **{head: _apply(current, keys[1:], text, full)})


def describe_fields(cls: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default, one line of help) of each field of a config dataclass; the help is
    the comment written after the field in its source, so it is stated once, where the field is."""
    import inspect
    import re

    source = inspect.getsource(cls)
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        found = re.search(rf"^\s+{f.name}\s*:[^\n]*?#\s*(.+?)\s*$", source, re.M)
        hint = hints[f.name]  # int -> "int"; int | None -> "int | None"
        kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        out.append((f.name, kind, "none" if default is None else str(default), found.group(1) if found else ""))
    return out


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds (for the configs' validate methods)."""
    if not condition:
        raise ConfigError(message)


def configure(config_cls: type, config: Any, options: dict[str, Any]) -> Any:
    """A validated `config_cls` from a config (None: the defaults) and keyword options that
    replace its fields; a model's constructor calls this, so its fields are declared once."""
    if config is None:
        config = config_cls()
    elif not isinstance(config, config_cls):
        raise TypeError(f"expected a {config_cls.__name__}, got {type(config).__name__}")
    if options:
        names = [f.name for f in dataclasses.fields(config_cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)}: the options are the fields of {config_cls.__name__} "
                f"({', '.join(names)})"
            )
        config = dataclasses.replace(config, **options)
    return config.validate()
