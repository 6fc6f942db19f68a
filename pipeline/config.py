"""Typed stage configs: YAML files (with `extends`), `--set a.b=value` overrides, validation.

Each stage declares a `StrictModel` subclass, loads it with `load_config` and writes the
resolved config (every default filled in) beside its output with `save_resolved`:

    config = load_config(TrainConfig, Path("configs/train.yaml"), ["optim.lr=1e-4"])
    save_resolved(config, out_dir)

Precedence, lowest first: model defaults < `base` < the `extends` chain < the file < overrides.
Tests: `pytest tests/test_config.py`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import reprlib
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic
import yaml
from pydantic import ConfigDict, Field

from pipeline.fsio import write_text

T = TypeVar("T", bound=pydantic.BaseModel)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]

OVERRIDE = "--set override"


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the file, the dotted key and the fix."""


class StrictModel(pydantic.BaseModel):
    """Base of every config class: unknown keys are errors, and so are bad assignments later."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float; plain YAML 1.1 keeps it a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_overrides(overrides: list[str]) -> dict:
    """`["a.b=3", "a.c=[1,2]", "d=x"]` -> `{"a": {"b": 3, "c": [1, 2]}, "d": "x"}`."""
    merged: dict = {}
    for item in overrides:
        merged = _merge(merged, _parse_override(item))
    return merged


def _parse_override(item: str) -> dict:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"{OVERRIDE} {item!r}: expected dotted.key=value, e.g. optim.lr=1e-4")
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{OVERRIDE} {item!r}: value is not valid YAML ({err})") from None
    for part in reversed(parts):
        value = {part: value}
    return value


def load_config(
    model: type[T],
    path: Path | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
) -> T:
    """Merge `base`, the YAML file and its `extends` chain, and overrides; validate into `model`."""
    layers = [(base or {}, "base")]
    if path is not None:
        layers += _read_chain(Path(path), ())
    layers += [(_parse_override(item), f"{OVERRIDE} {item!r}") for item in overrides or []]

    # Remember which layer last set each key, so an error can name the file to fix.
    merged: dict = {}
    sources: dict[tuple[str, ...], str] = {}
    for data, source in layers:
        merged = _merge(merged, data)
        _record_sources(data, source, (), sources)

    try:
        return model.model_validate(merged)
    except pydantic.ValidationError as err:
        fallback = str(path) if path is not None else "<no file>"
        lines = [_describe(error, model, sources, fallback) for error in err.errors()]
        header = f"invalid {model.__name__} config ({len(lines)} error(s)):"
        raise ConfigError("\n  ".join([header, *lines])) from None


def _read_chain(path: Path, chain: tuple[Path, ...]) -> list[tuple[dict, str]]:
    """Layers of `path` and everything it extends, most basic first; `chain` holds the includers."""
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"{path}: `extends` cycle: {cycle}")
    data = _read_yaml(path, chain[-1] if chain else None)
    parents = data.pop("extends", None) or []
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: extends: expected a file name or a list of them")
    layers = []
    for parent in parents:
        layers += _read_chain(path.parent / parent, (*chain, path.resolve()))
    return [*layers, (data, str(path))]


def _read_yaml(path: Path, includer: Path | None) -> dict:
    where = f" (extended from {includer})" if includer else ""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or err
        raise ConfigError(f"{path}{at}: YAML syntax error: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def _merge(low: dict, high: dict) -> dict:
    """Deep merge: mappings merge key by key; anything else in `high` replaces `low`."""
    out = dict(low)
    for key, value in high.items():
        both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both_dicts else value
    return out


def _record_sources(data: dict, source: str, prefix: tuple, sources: dict) -> None:
    for key, value in data.items():
        sources[(*prefix, str(key))] = source
        if isinstance(value, dict):
            _record_sources(value, source, (*prefix, str(key)), sources)


def _describe(error: dict, model: type, sources: dict, fallback: str) -> str:
    """One pydantic error as `source: dotted.key: reason (got value)`."""
    loc = tuple(str(part) for part in error["loc"])
    prefixes = (loc[:n] for n in range(len(loc), 0, -1))
    source = next((sources[p] for p in prefixes if p in sources), fallback)
    dotted = ".".join(loc) or "<top level>"
    if error["type"] == "extra_forbidden":
        valid = _fields_at(model, error["loc"][:-1])
        level = f"under {'.'.join(loc[:-1])!r}" if len(loc) > 1 else "at top level"
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{source}: unknown key {dotted!r}; valid keys {level}: {', '.join(valid)}{hint}"
    value = error.get("input")
    got = "" if isinstance(value, dict) else f" (got {reprlib.repr(value)})"
    return f"{source}: {dotted}: {error['msg']}{got}"


def _fields_at(model: type, loc: tuple) -> list[str]:
    """Field names of the config class found at `loc`; list indices and dict keys step into
    the element type."""
    node: Any = model
    for part in loc:
        node = _submodel(node)
        if node is None:
            return []
        if part in node.model_fields:
            node = node.model_fields[part].annotation
    node = _submodel(node)
    return list(node.model_fields) if node else []


def _submodel(annotation: Any) -> type[pydantic.BaseModel] | None:
    """The model class inside `X`, `X | None`, `list[X]`, `dict[str, X]`, else None."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if found := _submodel(arg):
            return found
    return None


def save_resolved(config: pydantic.BaseModel, out_dir: Path, name: str = "config.yaml") -> Path:
    """Write `config` with every default filled in to `out_dir/name`, atomically."""
    dest = Path(out_dir) / name
    header = f"# resolved {type(config).__name__}, config_hash {config_hash(config)}\n"
    body = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    write_text(dest, header + body)  # fsio.write_text goes through atomic_path
    return dest


def config_hash(config: pydantic.BaseModel, *extra: str) -> str:
    """12 hex chars of sha256 over the key-sorted JSON dump of `config` and `extra`."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256("\0".join([canonical, *extra]).encode()).hexdigest()[:12]
