"""Passes by name: the registry of pass classes, and pipeline strings parsed into passes and printed back.

``"early-exit{layers=8,16,24 measure=top2-gap thresholds=0.4}"``: several passes are separated by commas at
the top level (``"a{...}, b{...}"``); inside braces (or parentheses), arguments are ``key=value`` separated
by spaces or ``;``; a value with commas is a list. :func:`pipeline_string` writes what
:func:`parse_pipeline` reads back to equal passes. The registry lives here, with the names it is read by,
so that :mod:`effx.passes.base` (which re-exports all of this) imports this module and not the reverse.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import PassConfigError

if TYPE_CHECKING:
    from .base import Pass

__all__ = [
    "construct",
    "format_value",
    "get_pass",
    "parse_pipeline",
    "parse_scalar",
    "pipeline_string",
    "register_pass",
    "registered_passes",
]

_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name`` (in pipelines and JSON)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute 'name' to be registered")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise TypeError(f"pass name {cls.name!r} is taken by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass class by its name."""
    return dict(_REGISTRY)


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; :class:`PassConfigError` listing the known names if none is."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none registered"
        raise PassConfigError(f"unknown pass {name!r}; known passes: {known}") from None


def construct(klass: type[Pass], kwargs: dict[str, Any]) -> Pass:
    """An instance of the pass ``klass`` from arguments as JSON or a pipeline string gives them (lists for
    tuples, a lone item for a 1-tuple); :class:`PassConfigError` names an unknown argument or a bad value."""
    fields = {f.name: f for f in dataclasses.fields(klass)}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise PassConfigError(
            f"pass {klass.name!r} has no argument(s) {unknown}; its arguments are {sorted(fields) or 'none'}"
        )
    hints = typing.get_type_hints(klass)
    coerced = {k: _coerce(v, hints.get(k)) for k, v in kwargs.items()}
    try:
        return klass(**coerced)
    except TypeError as e:
        raise PassConfigError(f"pass {klass.name!r}: {e}") from e


def _coerce(value: Any, hint: Any) -> Any:
    """Make JSON/pipeline values fit the field's type: lists become tuples, a lone item a 1-tuple."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    wants_tuple = origin is tuple or any(typing.get_origin(a) is tuple for a in args)
    if wants_tuple:
        if isinstance(value, list):
            return tuple(value)
        if not isinstance(value, tuple) and value is not None:
            return (value,)
    return value


# -- pipeline strings -----------------------------------------------------------------------------------

_NAME = re.compile(r"\s*([A-Za-z][\w-]*)\s*")


def parse_scalar(text: str) -> bool | int | float | str | None:
    """One value of a pipeline string: ``true``/``false``, ``none``/``null``, an int, a float, a quoted or
    bare string; ValueError if it is empty."""
    t = text.strip()
    if not t:
        raise ValueError("empty value")
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    return t


def _parse_args(pass_name: str, body: str) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for item in re.split(r"[;\s]+", body.strip()):
        if not item:
            continue
        if "=" not in item:
            raise PassConfigError(f"pass {pass_name!r}: argument {item!r} is not of the form key=value")
        key, _, raw = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise PassConfigError(f"pass {pass_name!r}: {key!r} is not an argument name")
        if key in args:
            raise PassConfigError(f"pass {pass_name!r}: argument {key!r} given twice")
        try:
            parts = [parse_scalar(p) for p in raw.split(",")]
        except ValueError:
            raise PassConfigError(f"pass {pass_name!r}: argument {key!r} has an empty value") from None
        args[key] = parts[0] if len(parts) == 1 else tuple(parts)
    return args


# a pass's arguments go in braces; parentheses do the same where braces are taken (lm-eval's --model_args
# reads any value with a brace as JSON)
_CLOSE = {"{": "}", "(": ")"}


def parse_pipeline(text: str) -> list[Pass]:
    """Parse ``"name{key=value ...}, name2, ..."`` into pass instances (validated); ``name(key=value ...)``
    is the same as ``name{key=value ...}``."""
    if not isinstance(text, str):
        raise PassConfigError(f"a pipeline is a string, got {type(text).__name__}")
    passes: list[Pass] = []
    pos = 0
    n = len(text)
    while pos < n:
        if text[pos:].strip() == "":
            break
        m = _NAME.match(text, pos)
        if not m:
            raise PassConfigError(
                f"pipeline {text!r}: expected a pass name at character {pos}: {text[pos:]!r}"
            )
        name = m.group(1)
        pos = m.end()
        args: dict[str, Any] = {}
        if pos < n and text[pos] in _CLOSE:
            opening, closing = text[pos], _CLOSE[text[pos]]
            close = text.find(closing, pos)
            if close < 0:
                raise PassConfigError(f"pipeline {text!r}: {opening!r} after {name!r} is never closed")
            if opening in text[pos + 1 : close]:
                raise PassConfigError(f"pipeline {text!r}: nested {opening!r} in the arguments of {name!r}")
            args = _parse_args(name, text[pos + 1 : close])
            pos = close + 1
        passes.append(construct(get_pass(name), args))
        rest = text[pos:].lstrip()
        pos = n - len(rest)
        if pos < n:
            if text[pos] != ",":
                raise PassConfigError(
                    f"pipeline {text!r}: expected ',' between passes at character {pos}, found {text[pos]!r}"
                )
            pos += 1
            if text[pos:].strip() == "":
                raise PassConfigError(f"pipeline {text!r}: trailing ',' with no pass after it")
    return passes


def format_value(value: Any) -> str:
    """A field value as a pipeline string writes it."""
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return str(value)


def pipeline_string(passes: Sequence[Pass]) -> str:
    """The pipeline string of ``passes`` (fields at their default left out); :func:`effx.parse_pipeline`
    reads it back to equal passes."""
    parts = []
    for p in passes:
        args = []
        for f in dataclasses.fields(p):
            value = getattr(p, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if value != default:
                args.append(f"{f.name}={format_value(value)}")
        parts.append(f"{p.name}{{{' '.join(args)}}}" if args else p.name)
    return ", ".join(parts)
