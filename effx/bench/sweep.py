"""The configurations ``effx bench`` measures: a base pipeline and the sweeps over its fields.

**Sweeps.** ``parse_sweep("early-exit.thresholds=0.5:0.95:0.05")`` is ``<pass>.<field>=<values>``: a range
``start:stop:step`` (``stop`` included when the steps land on it) or a comma list ``0.3,0.5,0.7``. A field
that holds a tuple takes a tuple per value with ``/`` inside it (``token-drop.keep=0.75/0.5,0.5/0.3``); a
single number gives a 1-tuple (one threshold for every exit). A singular field name reaches its plural
field when only that exists (``early-exit.threshold`` sets ``thresholds``). Several sweeps form a grid.
Each configuration is the base pipeline with the swept fields set; a swept pass the pipeline lacks is
added with its defaults. Bad sweeps raise :class:`BenchConfigError` (a ``PassConfigError``) naming the
sweep and what is wrong: unknown pass or field, a malformed range, ``step <= 0``, an empty range, more
configurations than ``max_configs``, or a value the pass rejects.

:func:`expand_configs` turns a base pipeline and its sweeps into :class:`BenchConfig` s;
:func:`pipeline_string` (from ``effx.passes``) writes passes back as a pipeline string.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import PassConfigError
from ..passes import get_pass, parse_pipeline
from ..passes.base import format_value, pipeline_string
from ..passes.pipeline import construct as _construct
from ..passes.pipeline import parse_scalar as _parse_scalar
from .errors import BenchConfigError

MAX_CONFIGS = 64


@dataclass(frozen=True)
class Sweep:
    """One swept field: ``values`` are already parsed (numbers, strings, tuples)."""

    pass_name: str
    field: str
    values: tuple[Any, ...]
    text: str


@dataclass(frozen=True)
class BenchConfig:
    """A configuration to measure: a name, its passes, and optionally an exit calibration target (the
    Program is calibrated with :meth:`effx.Program.calibrate` before it is measured)."""

    name: str
    passes: tuple = ()
    calibrate: float | None = None

    @property
    def pipeline(self) -> str:
        return pipeline_string(self.passes)


_SWEEP = re.compile(r"\s*([A-Za-z][\w-]*)\.([A-Za-z_]\w*)\s*=\s*(.*?)\s*$", re.S)


def _pass_fields(pass_name: str, sweep_text: str):
    try:
        klass = get_pass(pass_name)
    except PassConfigError as e:
        raise BenchConfigError(f"sweep {sweep_text!r}: {e}") from None
    return klass, {f.name: f for f in dataclasses.fields(klass)}


def _number(text: str, what: str, sweep_text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise BenchConfigError(f"sweep {sweep_text!r}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise BenchConfigError(f"sweep {sweep_text!r}: {what} {text!r} is not a finite number")
    return value


def _range_values(spec: str, sweep_text: str, max_values: int) -> tuple:
    parts = [p.strip() for p in spec.split(":")]
    if len(parts) != 3 or not all(parts):
        raise BenchConfigError(
            f"sweep {sweep_text!r}: a range is start:stop:step with three numbers, e.g. 0.5:0.95:0.05; "
            f"got {spec!r}"
        )
    start, stop, step = (
        _number(p, w, sweep_text) for p, w in zip(parts, ("start", "stop", "step"), strict=True)
    )
    if step <= 0:
        raise BenchConfigError(f"sweep {sweep_text!r}: step must be > 0, got {step}")
    if stop < start:
        raise BenchConfigError(
            f"sweep {sweep_text!r}: the range is empty: stop {stop} is below start {start}"
        )
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > max_values:
        raise BenchConfigError(
            f"sweep {sweep_text!r}: {count} values, more than the {max_values} configurations allowed; "
            "use a larger step"
        )
    if all(isinstance(v, int) for v in (start, stop, step)):
        return tuple(start + i * step for i in range(count))
    return tuple(round(start + i * step, 10) for i in range(count))


def _list_value(item: str, sweep_text: str, is_tuple: bool):
    if not item.strip():
        raise BenchConfigError(f"sweep {sweep_text!r}: an empty value in the list")
    if "/" in item and is_tuple:
        parts = item.split("/")
        if not all(p.strip() for p in parts):
            raise BenchConfigError(f"sweep {sweep_text!r}: an empty element in the tuple {item!r}")
        return tuple(_parse_scalar(p) for p in parts)
    return _parse_scalar(item)


def _is_tuple_field(klass, field: str) -> bool:
    hint = typing.get_type_hints(klass).get(field)
    return typing.get_origin(hint) is tuple or any(
        typing.get_origin(a) is tuple for a in typing.get_args(hint)
    )


def parse_sweep(text: str, *, max_configs: int = MAX_CONFIGS) -> Sweep:
    """Parse ``"<pass>.<field>=<start:stop:step | v1,v2,...>"`` into a :class:`Sweep`.

    >>> parse_sweep("neuron-mask.keep=0.3,0.5,0.7").values
    (0.3, 0.5, 0.7)
    """
    if not isinstance(text, str):
        raise BenchConfigError(f"a sweep is a string, got {type(text).__name__}")
    m = _SWEEP.fullmatch(text)
    if not m:
        raise BenchConfigError(
            f"sweep {text!r} is not of the form <pass>.<field>=<values>, "
            "e.g. early-exit.thresholds=0.5:0.95:0.05 or neuron-mask.keep=0.3,0.5,0.7"
        )
    pass_name, field, spec = m.groups()
    klass, fields = _pass_fields(pass_name, text)
    if field not in fields:
        if field + "s" in fields:  # early-exit.threshold -> thresholds
            field += "s"
        else:
            raise BenchConfigError(
                f"sweep {text!r}: pass {pass_name!r} has no field {field!r}; its fields are {sorted(fields)}"
            )
    if not spec:
        raise BenchConfigError(f"sweep {text!r}: no values after '='")
    if ":" in spec:
        values = _range_values(spec, text, max_configs)
    else:
        values = tuple(_list_value(v, text, _is_tuple_field(klass, field)) for v in spec.split(","))
        if len(values) > max_configs:
            raise BenchConfigError(
                f"sweep {text!r}: {len(values)} values, more than the {max_configs} configurations allowed"
            )
    if len(set(map(repr, values))) != len(values):
        raise BenchConfigError(f"sweep {text!r}: values repeat: {list(values)}")
    return Sweep(pass_name, field, values, text)


def _with_fields(passes: list, assigned: list[tuple[Sweep, Any]]) -> list:
    """``passes`` with the swept fields set: all fields of one pass at once, so a configuration is
    validated as a whole (``neuron-mask.keep`` with ``neuron-mask.score=random`` needs no profile)."""
    out = list(passes)
    by_pass: dict[str, list[tuple[Sweep, Any]]] = {}
    for sweep, value in assigned:
        by_pass.setdefault(sweep.pass_name, []).append((sweep, value))
    for pass_name, items in by_pass.items():
        klass, _ = _pass_fields(pass_name, items[0][0].text)
        index = next((i for i, p in enumerate(out) if p.name == pass_name), None)
        base = {} if index is None else out[index].config()
        try:
            new = _construct(klass, {**base, **{sw.field: v for sw, v in items}})
        except PassConfigError as e:
            texts = ", ".join(repr(sw.text) for sw, _ in items)
            shown = " ".join(f"{pass_name}.{sw.field}={format_value(v)}" for sw, v in items)
            hint = (
                f" ({pass_name} is not in the pipeline, so it was added with its defaults: give it in "
                "--passes with the arguments it needs)"
                if index is None
                else ""
            )
            raise BenchConfigError(f"sweep {texts}: {shown}: {e}{hint}") from None
        if index is None:
            out.append(new)
        else:
            out[index] = new
    return out


def expand_configs(
    base: str | Sequence = "",
    sweeps: Sequence[str | Sweep] = (),
    *,
    calibrate: float | None = None,
    max_configs: int = MAX_CONFIGS,
) -> list[BenchConfig]:
    """The configurations of ``base`` (a pipeline string or passes) under ``sweeps`` (their grid). Without
    sweeps, one configuration: the base pipeline itself. ``calibrate`` is the exit calibration target of
    every configuration with an ``early-exit`` pass (its thresholds are then chosen by calibration, so
    sweeping them as well is an error)."""

    if calibrate is not None and (
        isinstance(calibrate, bool) or not isinstance(calibrate, (int, float)) or not 0 < calibrate <= 1
    ):
        raise BenchConfigError(f"the calibration target is an agreement in (0, 1], got {calibrate!r}")
    passes = parse_pipeline(base) if isinstance(base, str) else list(base)
    parsed = [s if isinstance(s, Sweep) else parse_sweep(s, max_configs=max_configs) for s in sweeps]
    seen = set()
    for s in parsed:
        if (s.pass_name, s.field) in seen:
            raise BenchConfigError(f"sweep {s.text!r}: {s.pass_name}.{s.field} is swept twice")
        seen.add((s.pass_name, s.field))
        if calibrate is not None and (s.pass_name, s.field) == ("early-exit", "thresholds"):
            raise BenchConfigError(
                f"sweep {s.text!r}: calibration (target {calibrate}) chooses the exit thresholds; "
                "sweep them or calibrate, not both"
            )
    total = math.prod(len(s.values) for s in parsed)
    if total > max_configs:
        sizes = " x ".join(str(len(s.values)) for s in parsed)
        raise BenchConfigError(
            f"the sweeps make {total} configurations ({sizes}), more than max_configs={max_configs}"
        )
    if not parsed:
        grid = [("", passes)]
    else:
        grid = []
        for combo in itertools.product(*(s.values for s in parsed)):
            name = " ".join(
                f"{s.pass_name}.{s.field}={format_value(v)}" for s, v in zip(parsed, combo, strict=True)
            )
            grid.append((name, _with_fields(passes, list(zip(parsed, combo, strict=True)))))
    configs = []
    for name, current in grid:
        exits = any(p.name == "early-exit" for p in current)
        target = calibrate if exits else None
        name = name or pipeline_string(current) or "dense (pipeline)"
        configs.append(
            BenchConfig(name if target is None else f"{name}, calibrated {target}", tuple(current), target)
        )
    if calibrate is not None and all(c.calibrate is None for c in configs):
        raise BenchConfigError(
            f"a calibration target ({calibrate}) needs an early-exit pass in the pipeline or a sweep"
        )
    return configs
