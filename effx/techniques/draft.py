"""What a draft source is, for the verifier of ``effx.runtime.speculative``: a technique with a ``draft``
hook returns a :class:`DraftSource`, which proposes tokens each round that the Program verifies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..arrays import Array
    from ..runtime.speculative import Speculation

__all__ = ["Draft", "DraftSource"]


@dataclass
class Draft:
    """What a source proposes for one round.

    ``tokens [batch, m]`` the drafts (any token id past a row's count), ``counts`` (per row, a list of ints)
    how many of them the row really proposes. ``hidden`` (or None): ``(hidden, cos, sin)`` of the verifier's
    inputs (the last token and the first ``m - 1`` drafts) after the layers up to ``through``, whose cache
    entries the source has already written; then ``bonus`` is False (the last draft is not an input).
    ``probs [batch, m, vocab]`` (or None): the distribution each draft was drawn from, for a source that
    samples its drafts when the run samples; None means each draft is certain (one-hot: a greedy or
    looked-up draft). Speculative sampling's rejection rule reads it (:mod:`effx.runtime.rejection`).
    """

    tokens: Array
    counts: list[int]
    hidden: tuple[Array, Array, Array] | None = None
    through: int = -1
    bonus: bool = True
    probs: Array | None = None


class DraftSource:
    """Proposes tokens for the verifier. ``name`` keys its statistics; ``draft`` is the most tokens it
    proposes in a round."""

    name = "draft"
    draft = 8
    # whether the source reads the model's last-layer features (``Speculation.prompt_features``, ``settled``)
    features = False
    # what one draft step costs, in dense decode steps: a source that sets it (by ``start``) drafts only as
    # far as a round pays, per row (effx.runtime.pacing); None drafts up to ``draft`` every round
    cost: float | None = None

    def start(self, spec: Speculation) -> None:
        """Called once after the prefill and the first token."""

    def propose(self, spec: Speculation, n: int) -> Draft | None:
        """Up to ``n`` drafts per row for the rows of ``spec.active``, or None when nothing is proposed."""
        raise NotImplementedError

    def appended(self, spec: Speculation, row: int, tokens: list[int]) -> None:
        """Row ``row`` has emitted ``tokens``."""

    def verified(self, spec: Speculation, counts: list[int], accepted: list[int]) -> None:
        """This source drafted the round just verified: per row, ``counts`` drafts, ``accepted`` kept."""

    def settled(self, spec: Speculation, start: int, kept: list[int], features: Array) -> None:
        """After every round (whichever source drafted): per row, the slots ``start .. start + kept[b] - 1``
        hold verified tokens, and ``features [batch, width, hidden]`` are the model's last-layer outputs
        (before the head) at the round's slots from ``start`` (valid up to each row's ``kept``)."""

    def sync(self, spec: Speculation) -> None:
        """Before a compaction: bring any cache of the source's own to ``spec.length`` slots."""

    def compacted(self, spec: Speculation, start: int, index: Array) -> None:
        """The verifier compacted its cache (``KVCache.compact(start, index)``): do the same to any of the
        source's own."""
