"""Dataclass configs loaded from YAML and overridden from the command line (for the examples).

A config is a (nested) dataclass. :func:`load` reads a YAML file into it,
checking every key and value against the dataclass fields, then applies
``KEY=VALUE`` overrides whose keys are dotted paths (``checkpoint.keep_last=3``)
and whose values are parsed as YAML (``null``, ``true``, ``[1, 2]``, ``1e-3``).
Errors are :class:`ConfigError` and name the file (or the override) and the
key, with a suggestion for a misspelt one ("did you mean 'keep_last'?").

This is not part of jckpt: it is a generic loader that the examples use (and
that needs PyYAML, which jckpt does not). Copy it, or use any loader that
builds dataclasses -- ``jckpt.config.CheckpointConfig`` validates its own values
in its constructor, and the ``ValueError`` it raises names the field in its
``key`` attribute, which :func:`from_dict` places under the section's path.

Example::

    @dataclasses.dataclass(frozen=True)
    class Experiment:
        steps: int = 100
        checkpoint: CheckpointConfig = CheckpointConfig()

    cfg = load(Experiment, "run.yaml", ["checkpoint.every_n_steps=50"])
    cfg = parse_args(Experiment)  # --config run.yaml --set steps=200 checkpoint.keep_last=2
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

import yaml

__all__ = [
    "ConfigError",
    "apply_override",
    "from_dict",
    "load",
    "parse_args",
    "to_dict",
    "to_yaml",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid.

    Attributes:
      source: where the value came from (a file path, ``override 'KEY=VALUE'``, ...).
      key: the dotted key path of the offending entry ("" for the whole config).
      problem: what is wrong with it.
    """

    def __init__(self, problem: str, *, key: str = "", source: str | None = None):
        self.problem, self.key, self.source = problem, key, source
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {problem}" if where else problem)

    def located(self, *, key_prefix: str = "", source: str | None = None) -> ConfigError:
        """The same error, with its key under ``key_prefix`` and ``source`` filled in."""
        key = ".".join(part for part in (key_prefix, self.key) if part)
        return ConfigError(self.problem, key=key, source=self.source or source)


def _invalid(key: str, problem: str) -> ConfigError:
    return ConfigError(problem, key=key)


# ------------------------------------------------------------- dict <-> config


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as e:
        raise TypeError(
            f"cannot resolve the field types of {cls.__qualname__} ({e}); define config "
            "dataclasses at module level"
        ) from e


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _unknown_key(key: str, name: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return _invalid(key, f"unknown key; {hint}known keys: {', '.join(known)}")


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string; accept numeric strings for numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked (and converted where lossless) against the type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _invalid(key, f"must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else _invalid(
            key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    if value is None:
        raise _invalid(key, f"must not be null (expected {_type_name(tp)})")
    if origin is Literal:
        if value in args:
            return value
        raise _invalid(key, f"must be one of {', '.join(map(repr, args))}; got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _invalid(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _invalid(key, f"expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _invalid(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        item = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(item, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _invalid(key, f"expected true or false, got {value!r}")
    if tp is int:
        number = _number(value)
        if isinstance(number, int) and not isinstance(number, bool):
            return number
        if isinstance(number, float) and number.is_integer():
            return int(number)
        raise _invalid(key, f"expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        number = _number(value)
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            return float(number)
        raise _invalid(key, f"expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _invalid(key, f"expected a string, got {type(value).__name__} {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _invalid(key, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    fields, hints = _fields(cls), _hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown_key(key, str(name), list(fields))
        kwargs[name] = _coerce(hints[name], value, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        # A validation error that names its field (``key``, e.g. jckpt.config.ConfigError)
        # is placed under this section's path; any other names the section.
        field = getattr(e, "key", "")
        if isinstance(field, str) and field:
            problem = getattr(e, "problem", str(e))
            raise _invalid(f"{prefix}.{field}" if prefix else field, str(problem)) from None
        raise _invalid(prefix, str(e)) from e


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, source: str = "<dict>") -> T:
    """Builds the dataclass ``cls`` from nested mappings, checking keys and types.

    Missing keys take the field defaults; nested dataclasses are built from
    nested mappings; numbers convert where lossless (``1.0`` for an int field).

    Raises:
      ConfigError: unknown key, wrong type or invalid value (names ``source`` and the key).
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}",
                          source=source)
    try:
        return _build(cls, data, "")
    except ConfigError as e:
        raise e.located(source=source) from None


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts (tuples become lists), ready for YAML or JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def to_yaml(config: Any) -> str:
    """The config as a YAML document that :func:`load` reads back to an equal config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ------------------------------------------------------------------ overrides


def _field_type(cls: type, path: Sequence[str], key: str) -> Any:
    """The declared type at a dotted path, checking that every part exists."""
    tp: Any = cls
    for i, name in enumerate(path):
        candidates = [tp] + list(typing.get_args(tp))
        dc = next((c for c in candidates if dataclasses.is_dataclass(c)), None)
        if dc is None:
            parent = ".".join(path[:i])
            raise _invalid(key, f"{parent!r} is not a section ({_type_name(tp)}); it has no key {name!r}")
        if name not in _fields(dc):
            raise _unknown_key(".".join(path[: i + 1]), name, list(_fields(dc)))
        tp = _hints(dc)[name]
    return tp


def _parse_value(tp: Any, text: str) -> Any:
    """The override text as YAML, except that string fields keep the text verbatim."""
    strings = tp is str or (
        typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)
    )
    if strings and text.strip() not in ("null", "~", "Null", "NULL", ""):
        return text
    return yaml.safe_load(text) if text.strip() else None


def apply_override(cls: type, data: dict[str, Any], override: str) -> dict[str, Any]:
    """``data`` (nested dicts for ``cls``) with one ``KEY=VALUE`` override applied.

    Raises:
      ConfigError: no ``=``, an unknown key path, or a value YAML cannot parse.
    """
    source = f"override {override!r}"
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("expected KEY=VALUE, e.g. checkpoint.every_n_steps=50", source=source)
    path = key.split(".")
    try:
        tp = _field_type(cls, path, key)
        try:
            value = _parse_value(tp, text)
        except yaml.YAMLError as e:
            raise _invalid(key, f"cannot parse the value as YAML: {e}") from None
    except ConfigError as e:
        raise e.located(source=source) from None
    out = dict(data)
    node = out
    for name in path[:-1]:
        child = node.get(name)
        node[name] = dict(child) if isinstance(child, Mapping) else {}
        node = node[name]
    node[path[-1]] = value
    return out


def load(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Reads the YAML file ``path`` (or the defaults) into ``cls``, then applies ``overrides``.

    Each override is checked on its own, so an error names the file or the
    override it came from.

    Args:
      cls: the config dataclass.
      path: a YAML file holding a mapping; None: start from the defaults.
      overrides: ``KEY=VALUE`` strings, keys as dotted paths, values as YAML.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ConfigError: invalid YAML, unknown key, wrong type or invalid value.
    """
    if path is None:
        config = from_dict(cls, {}, source="defaults")
    else:
        source = os.fspath(path)
        with open(source, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ConfigError(f"invalid YAML: {e}", source=source) from None
        config = from_dict(cls, data, source=source)
    for override in overrides:
        data = apply_override(cls, to_dict(config), override)
        config = from_dict(cls, data, source=f"override {override!r}")
    return config


def parse_args(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    description: str | None = None,
    default_config: str | os.PathLike | None = None,
) -> T:
    """Builds ``cls`` from the command line, for scripts.

    Accepts ``--config FILE``, ``--set KEY=VALUE ...`` (repeatable) and bare
    ``KEY=VALUE`` arguments; ``--print-config`` prints the result as YAML and
    exits.  Errors print the usage and the :class:`ConfigError` and exit with 2.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="YAML config file")
    parser.add_argument(
        "--set", dest="sets", action="append", nargs="+", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set checkpoint.every_n_steps=50",
    )
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="same as --set")
    args = parser.parse_args(argv)
    overrides = [o for group in args.sets for o in group] + list(args.overrides)
    try:
        config = load(cls, args.config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.print_config:
        print(to_yaml(config), end="")
        parser.exit(0)
    return config
