"""How a config key is declared and checked: a dataclass field with its help and rules (:func:`_opt`), the rule
check every section runs after construction, and the type check of values read from TOML or ``--set``.
Used by :mod:`fedlora.config` (the schema) for its own keys and for the options plugins declare."""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import field, fields
from typing import Any, Mapping

from fedlora import registry
from fedlora.errors import ConfigError

# Upper bounds that keep a typo (a count in the billions) from becoming an allocation failure or a run that never
# ends: far above any real experiment, far below what breaks. train.max_length is also checked against the
# model's own position limit once the model is known (experiment.check_max_length).
MAX_COUNT = 1_000_000  # rounds, steps, clients
MAX_BATCH = 65_536  # examples per batch
MAX_TOKENS = 1_048_576  # tokens per example
MAX_THREADS = 1_024  # torch CPU threads
MAX_SECONDS = 7 * 24 * 3600.0  # a week


def _opt(default: Any, help: str, **rules: Any) -> Any:
    """A dataclass field with a help string and validation rules (choices, ge, gt, le, lt)."""
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


def _check_value(key: str, value: Any, rules: Mapping[str, Any]) -> None:
    """Check one value against its rules: ``choices`` (a tuple, or a registry whose names are the choices), and the
    bounds ``ge``, ``gt``, ``le``, ``lt`` for every number in it; numbers must be finite."""
    if value is None:
        return
    choices = rules.get("choices")
    if isinstance(choices, registry.Registry):
        choices = choices.names()
    if choices is not None and value not in choices:
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of: {', '.join(map(str, choices))}")
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{key} = {value!r} is not a finite number")
        for rule, ok, word in (("ge", item >= rules.get("ge", item), ">="),
                               ("gt", "gt" not in rules or item > rules["gt"], ">"),
                               ("le", item <= rules.get("le", item), "<="),
                               ("lt", "lt" not in rules or item < rules["lt"], "<")):
            if not ok:
                raise ConfigError(f"{key} = {value!r} is out of range; it must be {word} {rules[rule]}")


def _check_rules(section: str, obj: Any) -> None:
    for f in fields(obj):
        if f.name != "extra":
            _check_value(f"{section}.{f.name}", getattr(obj, f.name), f.metadata)


class _Section:
    """Mixin: validate the rules in field metadata after construction."""

    SECTION = ""

    def __post_init__(self) -> None:
        _check_rules(self.SECTION, self)


def _closest(word: str, options: list[str]) -> str:
    near = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the type hint of ``key`` and convert lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key} = {value!r} has the wrong type; expected {_type_name(hint)}")
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected a list of {_type_name(item_type)}")
        return tuple(_coerce(key, v, item_type) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} = {value!r} has the wrong type; expected {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint) if h is not type(None))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
