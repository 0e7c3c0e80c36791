"""One dataclass per job that is at once YAML, CLI flags and documentation.

Each field carries its help text in `field(metadata={"help": ...})`. A config is built from defaults,
then a YAML file, then `--key value` / `key=value` overrides; unknown keys and ill-typed values are
errors that name the key, the source and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import yaml

from steerlens.errors import SteerlensError

T = TypeVar("T")


class ConfigError(SteerlensError, ValueError):
    """A config file or override is wrong; the message says where and how."""


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A documented config field: `lr: float = option(1e-3, "AdamW learning rate")`."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """Check `value` against the type hint `hint`, converting where it is unambiguous."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, arg, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{source}: {name}: cannot be None")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {name} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (int, str)) and not isinstance(value, bool):  # "a,b" or 3 on the command line
            value = [v.strip() for v in str(value).split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {name} must be a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(name, v, item, source) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is int and isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    if hint is str:
        return str(value)
    if hint is Path:
        return Path(str(value))
    raise ConfigError(f"{source}: {name} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _unknown(cls: type, key: str, source: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key.replace("-", "_"), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
    return ConfigError(f"{source}: unknown key {key!r} for {cls.__name__}{hint}")


def parse_overrides(args: Sequence[str]) -> dict[str, str]:
    """Turn `["--lr", "1e-3", "--steps=5", "seed=1", "--no-vllm"]` into raw key/value strings."""
    out: dict[str, str] = {}
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        if arg.startswith("--"):
            key = arg[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                value, i = items[i + 1], i + 1
            elif key.startswith("no-"):
                key, value = key[3:], "false"
            else:
                value = "true"
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            raise ConfigError(f"command line: cannot read {arg!r}; write --key value or key=value")
        out[key.replace("-", "_")] = value
        i += 1
    return out


def build_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] | dict[str, Any] = ()) -> T:
    """Defaults, then the YAML file at `path`, then overrides; every value checked against its type."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        for key, value in data.items():
            if key not in hints:
                raise _unknown(cls, key, str(path))
            values[key] = _coerce(key, value, hints[key], str(path))
    raw = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    for key, value in raw.items():
        key = key.replace("-", "_")
        if key not in hints:
            raise _unknown(cls, key, "command line")
        parsed = yaml.safe_load(value) if isinstance(value, str) and hints[key] is not str else value
        values[key] = _coerce(key, parsed, hints[key], "command line")
    try:
        config = cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{cls.__name__}: {err}") from err
    return config


def to_yaml(config: Any) -> str:
    """The config as YAML, each field preceded by its help text as a comment."""
    lines = []
    for f in dataclasses.fields(config):
        if f.metadata.get("help"):
            lines.append(f"# {f.metadata['help']}")
        value = getattr(config, f.name)
        value = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        lines.append(yaml.safe_dump({f.name: value}, default_flow_style=False, width=1000, sort_keys=False).strip())
    return "\n".join(lines) + "\n"


def describe(cls: type) -> str:
    """Every option with its type, default and help: the CLI's epilog and the docs."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        hint = hints[f.name]
        kind = ("|".join(map(str, typing.get_args(hint))) if typing.get_origin(hint) is Literal
                else getattr(hint, "__name__", str(hint).replace("typing.", "")))
        rows.append(f"--{f.name.replace('_', '-')} ({kind}, default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(rows)
