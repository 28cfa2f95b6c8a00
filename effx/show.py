"""Where each generated token came from, for ``effx generate --show`` and ``effx chat --show``.

A :class:`Tracer` is called once per emitted token (as ``generate``'s ``on_token``, batch 1) and reads the
run-time stats that the same ``generate`` call is filling, so it needs nothing from the runtime beyond
them and works on both backends:

* exit depth (lossy early exits): the layers the token went through (``stats["exit_layers"]``; the first
  token comes from the prefill, which runs every layer);
* accepted drafts (prompt lookup, self-speculative exits, a draft branch): a verification round emits its
  accepted drafts and then the model's own token, so the first ``accepted`` tokens of each round are
  drafts, named by the source whose count rose (``lookup``, ``exit``, ``branch``);
* a vocabulary-reduced head's fallback to the full head (decoding one token per step: the fallback count
  rises on that step). In rounds that verify several positions the count covers rejected positions too, so
  fallbacks are not marked there.

:func:`render` colours the tokens on a terminal and marks them in plain text otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import EffxError

__all__ = ["MODES", "Mark", "ShowError", "Tracer", "check_mode", "legend", "pieces", "render", "use_colour"]

MODES = ("exits", "paths")


@dataclass(frozen=True)
class Mark:
    """What the runtime decided for one token: ``depth`` (layers it went through, None without lossy
    exits), ``draft`` (the draft source that proposed it, when a verified draft), ``fallback`` (the reduced
    head fell back to the full head; None when unknown or there is no reduced head)."""

    depth: int | None = None
    draft: str | None = None
    fallback: bool | None = None


class Tracer:
    """Per-token :class:`Mark` s of one batch-1 ``generate`` call, read from its ``stats`` as it runs."""

    def __init__(self, stats: dict, num_layers: int):
        self.stats, self.num_layers = stats, num_layers
        self.marks: list[Mark] = []
        self._round, self._accepted, self._left, self._source = None, 0, 0, None
        self._sources: dict[str, int] = {}
        self._fallbacks = 0

    def on_token(self, token=None) -> Mark:
        """Call once per emitted token (after the step that produced it); returns its mark."""
        s = self.stats
        i = len(self.marks)
        depth = None
        exits = s.get("exit_layers")
        if exits is not None:
            depth = int(exits[i - 1][0]) if 0 < i <= len(exits) else self.num_layers
            if self.marks and self.marks[0].depth is None:  # the loop records exits from the second token on:
                self.marks[0] = Mark(self.num_layers, self.marks[0].draft, self.marks[0].fallback)  # the first ran every layer
        draft = None
        steps = s.get("steps")
        if steps is not None:
            if steps != self._round:  # a new verification round: its accepted drafts come first
                self._round = steps
                self._left = s.get("accepted", 0) - self._accepted
                self._accepted = s.get("accepted", 0)
                now = {name: v["accepted"] for name, v in s.get("sources", {}).items()}
                rose = [name for name, v in now.items() if v > self._sources.get(name, 0)]
                self._source = rose[0] if rose else "draft"
                self._sources = now
            if self._left > 0:
                draft = self._source
                self._left -= 1
        fallback = None
        if "head_fallbacks" in s and steps is None:
            fallback = s["head_fallbacks"] > self._fallbacks
            self._fallbacks = s["head_fallbacks"]
        mark = Mark(depth, draft, fallback)
        self.marks.append(mark)
        return mark


class ShowError(EffxError):
    """A ``--show`` mode that cannot show anything for this pipeline."""


def check_mode(mode: str, decode_mode: str) -> None:
    """``ShowError`` unless ``mode`` can show something for a plan of ``decode_mode``."""
    if mode not in MODES:
        raise ShowError(f"--show takes one of {', '.join(MODES)}, got {mode!r}")
    if mode == "exits" and decode_mode != "lossy":
        raise ShowError(
            "--show exits: the pipeline has no lossy early exits (--show paths shows drafts and fallbacks)"
        )


def use_colour(stream) -> bool:
    """Colours on a terminal, unless ``NO_COLOR`` is set (https://no-color.org)."""
    import os

    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def pieces(decode, ids: list[int]) -> list[str]:
    """The text each token adds (``decode(ids[: i + 1])`` less ``decode(ids[:i])``; a token that completes
    a character shown by the next one gets the empty string)."""
    out, shown = [], ""
    for i in range(len(ids)):
        text = decode(ids[: i + 1])
        if text.startswith(shown):
            out.append(text[len(shown) :])
            shown = text
        else:
            out.append("")
    if out:
        out[-1] += decode(ids)[len(shown) :] if decode(ids).startswith(shown) else ""
    return out


_RESET = "\033[0m"
_DEPTH_COLOURS = ("\033[32m", "\033[33m", "\033[34m", "\033[35m")  # shallow to deep
_DRAFT = "\033[4;36m"  # underlined cyan
_FALLBACK = "\033[41;97m"  # white on red


def _depth_style(depth: int, num_layers: int) -> str:
    """A colour per depth band: shallow exits green, deeper ones yellow, blue, magenta; the full model none."""
    if depth >= num_layers:
        return ""
    return _DEPTH_COLOURS[depth * len(_DEPTH_COLOURS) // num_layers]


def render(pieces: list[str], marks: list[Mark], mode: str, *, num_layers: int, colour: bool) -> str:
    """The tokens' text ``pieces`` with their marks: ``exits`` shows exit depths, ``paths`` every
    decision. Colours on a terminal (``colour=True``); else a mark after each token that left the default
    path: ``‹L10›`` (left at the exit of layer 10, as the pipeline names it: 11 layers run), ``‹d:lookup›`` (an accepted draft of that source), ``‹f›``
    (the reduced head fell back to the full head)."""
    check_mode(mode, "lossy")
    out = []
    for piece, m in zip(pieces, marks, strict=True):
        exited = m.depth is not None and m.depth < num_layers
        if colour:
            style = _depth_style(m.depth, num_layers) if exited else ""
            if mode == "paths" and m.draft:
                style += _DRAFT
            if mode == "paths" and m.fallback:
                style += _FALLBACK
            out.append(f"{style}{piece}{_RESET}" if style else piece)
            continue
        tags = [f"L{m.depth - 1}"] if exited else []
        if mode == "paths":
            if m.draft:
                tags.append(f"d:{m.draft}")
            if m.fallback:
                tags.append("f")
        out.append(piece + (f"‹{' '.join(tags)}›" if tags else ""))
    return "".join(out)


def legend(marks: list[Mark], mode: str, *, num_layers: int, colour: bool) -> str:
    """One line on what the marks mean, with the share of tokens of each kind."""
    n = len(marks) or 1
    parts = []
    depths = sorted({m.depth for m in marks if m.depth is not None})
    for d in depths:
        count = sum(m.depth == d for m in marks)
        if d >= num_layers:
            parts.append(f"all {num_layers} layers {count / n:.0%}")
            continue
        style = _depth_style(d, num_layers)
        name = f"{style}exit at layer {d - 1}{_RESET}" if colour else f"‹L{d - 1}› exit at layer {d - 1}"
        parts.append(f"{name} {count / n:.0%}")
    if mode == "paths":
        drafts = sum(1 for m in marks if m.draft)
        if drafts:
            name = f"{_DRAFT}accepted draft{_RESET}" if colour else "‹d:source› accepted draft"
            parts.append(f"{name} {drafts / n:.0%}")
        known = [m for m in marks if m.fallback is not None]
        if known:
            name = f"{_FALLBACK}full-head fallback{_RESET}" if colour else "‹f› full-head fallback"
            parts.append(f"{name} {sum(m.fallback for m in known) / len(known):.0%}")
    if not parts:
        return f"[effx] {len(marks)} tokens, every one from the dense path"
    return f"[effx] {len(marks)} tokens: " + "; ".join(parts)
