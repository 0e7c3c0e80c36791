"""One dataclass per job that is at once YAML, CLI flags and documentation.

Each field carries a one-clause help text in `field(metadata={"help": ...})` (`option(default, help)`): the
CLI's option list and the YAML comments; the class docstring explains the fields. A config is built from defaults,
then a YAML file, then `--key value` / `key=value` overrides; unknown keys and ill-typed values are
errors that name the key, the source and what was expected. Numbers must be finite, and config files
are read with limits (size, UTF-8 text, YAML aliases) and unique keys (a key written twice in one mapping is
refused with both lines), so a damaged or hostile file fails fast in one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from steerlens.errors import SteerlensError

T = TypeVar("T")
MAX_CONFIG_BYTES = 1 << 20
MAX_ALIASES = 20  # real configs use a few; a "billion laughs" needs many aliases of aliases

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = 4
_SHORT.maxlevel = 2


class ConfigError(SteerlensError, ValueError):
    """A config file or override is wrong; the message says where and how."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses more than `MAX_ALIASES` aliases while composing, before any expansion."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"more than {MAX_ALIASES} aliases (*name); refused rather than expanded",
                    self.peek_event().start_mark,
                )
        return super().compose_node(parent, index)

    def compose_mapping_node(self, anchor: Any) -> Any:
        """A mapping as written, refused when a key appears twice in it: YAML requires unique keys, and PyYAML
        would keep the last one silently. Keys merged in by `<<` may be overridden (they are not written here)."""
        node = super().compose_mapping_node(anchor)
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)  # as Python sees it: `1` and `0x1`, `yes` and `true` collide
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # unhashable: the constructor refuses it with its own message
                continue
            if first is not key_node:
                a, b = first.start_mark.line + 1, key_node.start_mark.line + 1
                where = f"on line {a} twice" if a == b else f"on lines {a} and {b}"
                if first.value == key_node.value:
                    problem = f"duplicate key {_show(key)} {where}"
                else:  # written differently, read the same
                    problem = f"duplicate key {_show(key)} {where} (written {first.value!r} and {key_node.value!r})"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
        return node


def _parse_yaml(text: str, source: str) -> Any:
    """`text` as YAML (safe types only); any YAML problem is a one-line ConfigError naming `source`."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        if isinstance(err, yaml.MarkedYAMLError) and mark is not None and err.problem:
            context = f"{err.context}: " if err.context else ""
            where = f"line {mark.line + 1}, column {mark.column + 1}: {context}{err.problem}"
        else:
            where = " ".join(str(err).split()).replace(' in "<unicode string>",', " at")
        raise ConfigError(f"{source}: not valid YAML ({where})") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML (nested too deeply)") from None


def read_config(path: Path) -> dict[Any, Any]:
    """The mapping in the YAML file `path`; a missing, oversized, binary or malformed file is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"config file {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; a config file is a short YAML text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); a config file is YAML text") from None
    content = _parse_yaml(text, str(path))
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(
            f"{path}: expected a mapping of keys to values at the top level, got {type(content).__name__}"
        )
    return content


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
            raise ConfigError(f"{source}: {name} must be one of {list(args)}, got {_show(value)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (int, str)) and not isinstance(value, bool):  # "a,b" or 3 on the command line
            value = [v.strip() for v in str(value).split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {name} must be a list, got {_show(value)}")
        item = args[0] if args else Any
        items = [_coerce(f"{name}[{i}]", v, item, source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be a mapping, got {_show(value)}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is int and isinstance(value, str) and re.fullmatch(r"[-+]?[0-9]+", value.strip()):
        return int(value)
    number = _number(value) if hint is float else None
    if number is not None:
        if not math.isfinite(number):
            raise ConfigError(f"{source}: {name} must be a finite number, got {_show(value)}")
        return number
    if hint in (str, Path) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return hint(str(value))
    expected = "true or false" if hint is bool else getattr(hint, "__name__", hint)
    raise ConfigError(f"{source}: {name} must be {expected}, got {_show(value)}")


def _number(value: Any) -> float | None:
    """`value` as a float (an int, a float, or a numeric string: YAML 1.1 reads 1e-3 as a string), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        return math.inf
    except ValueError:
        return None


def _show(value: Any) -> str:
    """A short one-line repr, bounded however large or deeply nested `value` is."""
    return _SHORT.repr(value)


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
    sources = []
    if path is not None:
        path = Path(path)
        sources.append(str(path))
        for key, value in read_config(path).items():
            if key not in hints:
                raise _unknown(cls, str(key), str(path))
            values[key] = _coerce(key, value, hints[key], str(path))
    raw = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    if raw:
        sources.append("command line")
    for key, value in raw.items():
        key = key.replace("-", "_")
        if key not in hints:
            raise _unknown(cls, key, "command line")
        values[key] = _coerce(key, _flag_value(key, value, hints[key]), hints[key], "command line")
    origin = " + ".join(sources) or "defaults"
    try:
        return cls(**values)
    except ConfigError as err:  # the class's own checks, already "Class: problem"
        raise ConfigError(f"{origin}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{origin}: {cls.__name__}: {err}") from err


def _flag_value(key: str, value: Any, hint: Any) -> Any:
    """A command-line value read as YAML (numbers, lists, null); text fields keep a scalar as typed."""
    if not isinstance(value, str) or hint is str:
        return value
    parsed = _parse_yaml(value, f"command line: --{key.replace('_', '-')}")
    keep_text = str in typing.get_args(hint) and parsed is not None and not isinstance(parsed, (list, dict))
    return value if keep_text else parsed


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
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        )
        hint = hints[f.name]
        kind = (
            "|".join(map(str, typing.get_args(hint)))
            if typing.get_origin(hint) is Literal
            else getattr(hint, "__name__", str(hint).replace("typing.", ""))
        )
        rows.append(f"--{f.name.replace('_', '-')} ({kind}, default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(rows)
