"""Timed calls and interleaved runners: :func:`timed` times one call (and its first token),
:func:`interleave` times every runner on every input back to back, the order rotating, so that machine
noise hits them alike. ``effx bench`` measures with them, and so do the scripts in ``benchmarks/``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import BenchConfigError


@dataclass(frozen=True)
class Timed:
    """One timed call: what it returned, its wall time, and, when it was given an ``on_token`` callback,
    the time to the callback's first call (time to first token)."""

    output: Any
    seconds: float
    first_token_s: float | None = None


def timed(fn: Callable[..., Any], *args, on_token: bool = False, **kwargs) -> Timed:
    """``fn(*args, **kwargs)`` timed with ``time.perf_counter``. With ``on_token=True`` it also gets an
    ``on_token`` keyword (effx ``generate`` calls it for every token) and ``first_token_s`` is set."""
    stamps: list[float] = []
    if on_token:
        kwargs["on_token"] = lambda _tok: stamps.append(time.perf_counter())
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    end = time.perf_counter()
    return Timed(out, end - start, stamps[0] - start if stamps else None)


def interleave(
    runners: dict[str, Callable[..., Any]],
    inputs: Sequence[tuple],
    *,
    repeats: int = 1,
    on_token: bool = False,
    warmup: tuple | None = None,
    progress: bool = True,
    bar=None,
    desc: str = "timing",
) -> dict[str, list[list[Timed]]]:
    """Time every runner on every input the way ``effx bench`` does: for each repeat and input, all runners
    back to back (the order rotates from input to input and repeat to repeat, so no runner always goes
    first), so that machine noise hits them alike. ``runner(*input)`` is called; ``on_token`` as in
    :func:`timed`. ``warmup``: an input every runner is called on once, untimed, first (first calls allocate
    and pick kernels). Returns ``{name: [[Timed per repeat] per input]}``; see :func:`total_seconds` and
    :func:`first_outputs`. A progress bar counts the calls (``bar``: update this tqdm instead)."""
    if not isinstance(repeats, int) or repeats < 1:
        raise BenchConfigError(f"repeats must be an integer >= 1, got {repeats!r}")
    names = list(runners)
    m = len(names)
    own_bar = bar is None
    if own_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=m * len(inputs) * repeats, desc=desc, unit="call", disable=not progress)
    if warmup is not None:
        for name in names:
            runners[name](*warmup)
    out: dict[str, list[list[Timed]]] = {name: [[] for _ in inputs] for name in names}
    for r in range(repeats):
        for p, args in enumerate(inputs):
            for j in range(m):
                name = names[(p + r + j) % m]
                bar.set_postfix_str(f"repeat {r + 1}, input {p + 1}: {name[:40]}")
                out[name][p].append(timed(runners[name], *args, on_token=on_token))
                bar.update()
    if own_bar:
        bar.close()
    return out


def total_seconds(runs: list[list[Timed]]) -> float:
    """Seconds over all inputs, each input's median over its repeats."""
    return sum(statistics.median(t.seconds for t in per_input) for per_input in runs)


def first_outputs(runs: list[list[Timed]]) -> list[Any]:
    """What the runner returned for each input, first repeat."""
    return [per_input[0].output for per_input in runs]
