"""Load a Config from defaults < YAML file < dotted CLI overrides, strictly typed.

Unknown keys and values of the wrong type fail with the dotted path of the field. The merged result is
checked once (`Config.check`) before anything else happens.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bigmodel_dist.config.paths import absolute_path, with_absolute_paths
from bigmodel_dist.config.schema import Config
from bigmodel_dist.core.errors import ConfigError, UserInputError
from bigmodel_dist.core.fileio import write_text_atomically


def load_config(path: str | Path | None, overrides: Sequence[str] = (), base_dir: Path | None = None) -> Config:
    """Build the checked Config from an optional YAML file and `key.sub=value` overrides. Relative paths
    in it (and `path` itself) mean: relative to `base_dir`, the directory the command was run in by
    default; the Config holds them absolute (`config/paths.py`)."""
    base = Path.cwd() if base_dir is None else base_dir
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(absolute_path(str(path), base)))
    for override in overrides:
        dotted, value = _parse_override(override)
        _set_dotted(raw, dotted, value)
    config = _build(Config, raw, prefix="")
    config.check()
    return with_absolute_paths(config, base)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(raw: dict[str, Any]) -> Config:
    """The inverse of `to_dict` (e.g. a config shipped to Ray workers), checked like a loaded one. Its
    paths were made absolute where it was loaded; a relative one left in `raw` is an error of the caller."""
    config = _build(Config, raw, prefix="")
    config.check()
    return config


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML, atomically (readers never see half a file)."""
    write_text_atomically(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserInputError(f"config file {path}: not found; pass a YAML file such as configs/gpt2-tiny.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserInputError(f"config file {path}:{where} is not valid YAML; fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"config file {path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _parse_override(text: str) -> tuple[str, Any]:
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise UserInputError(f"override {text!r}: expected --section.field=value, e.g. --train.max_steps=20")
    dotted, value_text = body.split("=", 1)
    try:
        value = yaml.safe_load(value_text) if value_text else ""
    except yaml.YAMLError:
        value = value_text
    return dotted.strip(), value


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(keys[: i + 1]), "is a value, not a section; override a field inside a section")
        node = child
    node[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"must be a mapping (section), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}", f"unknown key; valid keys here: {sorted(fields)}")
    values = {key: _coerce(hints[key], raw[key], f"{prefix}{key}") for key in raw}
    return cls(**values)


def _coerce(annotation: Any, value: Any, path: str) -> Any:
    """Convert a parsed YAML value to the annotated type, or raise naming the field."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _build(annotation, value, prefix=f"{path}.")
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [t for t in options if t is not type(None)]
        for option in inner[:-1]:  # the first type the value fits, in the order written (int | str)
            try:
                return _coerce(option, value, path)
            except ConfigError:
                continue
        return _coerce(inner[-1], value, path)
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {value!r}")
        return {_coerce(key_type, k, path): _coerce(value_type, v, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        items = value if isinstance(value, list) else [value] if isinstance(value, str) else None
        if items is None:
            raise ConfigError(path, f"must be a list, got {value!r}")
        return [_coerce(item_type, item, f"{path}[{i}]") for i, item in enumerate(items)]
    return _coerce_scalar(annotation, value, path)


def _coerce_scalar(annotation: type, value: Any, path: str) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads "6e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # nan passes every comparison check; inf is no timeout, no limit
                raise ConfigError(path, f"must be a finite number, got {value!r}")
            return number
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(path, f"expected {annotation.__name__}, got {value!r}")
