"""Loading a run configuration: YAML + `dotted.key=value` overrides -> the dataclasses of train/config.py, every key
and type checked with a one-line `ConfigError` naming the dotted key, then validated; and the resolved configuration
written back as YAML.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from model.config import ConfigError
from train.config import Config


def _yaml_keys(value: Any) -> Any:
    """Python keywords are fields with a trailing underscore (`async_`); YAML spells them without it."""
    if isinstance(value, dict):
        return {(k[:-1] if k.endswith("_") else k): _yaml_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_keys(v) for v in value]
    return value


def config_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML that `load_config` reads back to an equal Config."""
    return yaml.safe_dump(_yaml_keys(cfg.to_dict()), sort_keys=False)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; returns the (possibly converted) value or raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, item_tp, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, f"{key}.{k}"): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return build(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        number = value
        if isinstance(value, str):
            # YAML 1.1 reads `3e-4` (no dot) as a string; accept what Python reads as a number.
            with contextlib.suppress(ValueError):
                number = float(value)
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")  # a bug in the dataclass, not in the YAML


def _closest_hint(key: str, names: list[str], prefix: str) -> str:
    known = [n[:-1] if n.endswith("_") else n for n in names]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {prefix}{close[0]}? (python -m train --help lists every key)"
    return f"known keys here: {', '.join(known)}"


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types with the dotted key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names and f"{key}_" in names:  # Python keywords (`async`) are fields with a trailing _
            key = f"{key}_"
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key; {_closest_hint(key, names, prefix)}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like dotted.key=value (e.g. train.max_steps=50)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{text}: an override must look like dotted.key=value (e.g. train.max_steps=50)")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path[: i + 1])}: is a value, not a section; cannot set {text}")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """YAML file (or None for all defaults) + overrides -> validated Config."""
    data: dict[str, Any] = {}
    name = "run"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"{path}: config file not found; pass an existing YAML file such as configs/tiny-cpu.yaml"
            )
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start : e.start + 1]!r}); save the config "
                "as UTF-8 YAML"
            ) from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, moe:, train:, ...)")
        data = loaded or {}
        name = path.stem
    data = apply_overrides(data, overrides or [])
    data.setdefault("name", name)
    return build(Config, data).validate()
