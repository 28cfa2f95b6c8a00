"""Adaptive draft lengths: draft only as far as a round is expected to pay, per row.

A round with ``n`` drafts costs ``1 + (width_cost + draft_cost) * n`` dense steps (a verify step one token
wider costs ``width_cost`` more: about 0.05 on SmolLM2 in float32, ``docs/drafting.md``, and 0.2 on its
4-bit weights, :func:`width_cost`; a draft step costs
``draft_cost``, the source's own) and emits ``1 + a_1 + a_1 a_2 + ... + a_1 ... a_n`` tokens, where
``a_j`` is the chance that draft ``j`` is accepted once the drafts before it were. A plain step costs 1
and emits 1. Each row drafts the length with the most tokens per unit of cost, and none when no length
beats a plain step by ``margin`` (5%: the cost model is rough, and a round that only breaks even still
pays the source's bookkeeping); a row that stopped drafting tries one draft after ``probe`` rounds (16),
so it resumes when drafts would pay again. A probe costs a draft step and a wider verify step, so each
probe after which drafting still does not pay doubles the wait before the next one, up to ``max_probe``
rounds (256); a row that drafts by choice again waits ``probe`` rounds once it stops. ``a_j`` is estimated per row from that row's recent rounds (counts that decay by
``decay`` each round it drafts, from a prior of one half), so a row adapts to its own text.

``draft_cost`` is the source's: a fixed estimate, or one the source refines as it runs (the draft branch
times its drafting against the verifier's measured plain step, ``Speculation.step_seconds``; its estimate
from weights read is the floor). Timed costs make decisions vary from run to run; they change which drafts
are proposed, never what is emitted: the verifier decides every token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["WIDTH_COST", "Average", "Pacer", "width_cost"]

# what one more position costs a verify step, in plain steps (SmolLM2: a 4-token step costs 1.17x a 1-token
# step, an 8-token step 1.34x; docs/drafting.md)
WIDTH_COST = 0.05
# the same on 4-bit weights, whose products de-quantize every weight for each row they multiply
# (`benchmarks/steps.py --passes "quantize{source=gguf}"`, Zen 4: 2 / 4 / 8 positions cost 1.20 / 1.61 /
# 2.91 plain steps); 8-bit weights are taken to lie half way (not measured)
WIDTH_COST_4BIT = 0.2
WIDTH_COST_8BIT = 0.1


def width_cost(plan: Plan) -> float:
    """What one more position costs ``plan``'s verify step, in plain steps, by how its layers store their
    weights (the ``quantize`` pass it recorded): a model, not a timing, so that the drafts proposed are
    the same on every run."""
    for record in plan.passes:
        if record.get("name") == "quantize":
            bits = int(record.get("config", {}).get("bits", 32))
            return WIDTH_COST_4BIT if bits <= 4 else WIDTH_COST_8BIT if bits <= 8 else WIDTH_COST
    return WIDTH_COST


class Average:
    """A running mean that follows recent values (exponential, weight ``recent`` on the newest)."""

    def __init__(self, recent: float = 0.2) -> None:
        self.recent = recent
        self.value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.recent) * self.value + self.recent * x


class Pacer:
    """Per row, the draft length that pays best (see the module's docstring)."""

    def __init__(
        self,
        batch: int,
        longest: int,
        draft_cost: float,
        *,
        width_cost: float = WIDTH_COST,
        decay: float = 0.9,
        probe: int = 16,
        max_probe: int = 256,
        margin: float = 0.05,
    ) -> None:
        self.longest, self.draft_cost, self.width_cost, self.margin = longest, draft_cost, width_cost, margin
        self.decay, self.probe, self.max_probe = decay, probe, max_probe
        self.hits = [[0.0] * longest for _ in range(batch)]  # drafts at position j accepted (decayed)
        self.tries = [[0.0] * longest for _ in range(batch)]  # drafts at position j judged (decayed)
        self.idle = [0] * batch  # rounds since the row last drafted
        self.wait = [probe] * batch  # rounds a row that does not draft waits before it probes
        self.probing = [False] * batch  # the row's draft this round is a probe

    def rates(self, row: int) -> list[float]:
        """The row's estimated acceptance per draft position, given the drafts before it accepted."""
        return [(h + 1.0) / (t + 2.0) for h, t in zip(self.hits[row], self.tries[row], strict=True)]

    def best(self, row: int, n: int) -> int:
        """The length in ``0..n`` with the most expected tokens per unit of cost (0: none beats a plain step
        by the margin)."""
        best, best_rate = 0, 1.0 + self.margin
        tokens, reach = 1.0, 1.0
        for j, a in enumerate(self.rates(row)[:n], 1):
            reach *= a
            tokens += reach
            rate = tokens / (1.0 + (self.width_cost + self.draft_cost) * j)
            if rate > best_rate:
                best, best_rate = j, rate
        return best

    def lengths(self, n: int, active: list[bool]) -> list[int]:
        """Each row's draft length this round (at most ``n``); a row that has not drafted for its wait
        (``probe`` rounds, doubled by each probe that did not pay) drafts one token."""
        out = []
        for b, a in enumerate(active):
            k = self.best(b, min(n, self.longest)) if a else 0
            self.probing[b] = a and k == 0 and self.idle[b] + 1 >= self.wait[b]
            if self.probing[b]:
                k = min(1, n)
            out.append(k)
        return out

    def update(self, counts: list[int], accepted: list[int], active: list[bool]) -> None:
        """After a round: row ``b`` proposed ``counts[b]`` drafts and kept ``accepted[b]``."""
        for b, (c, k, a) in enumerate(zip(counts, accepted, active, strict=True)):
            if not a:
                continue
            if c == 0:
                self.idle[b] += 1
                continue
            self.idle[b] = 0
            hits, tries = self.hits[b], self.tries[b]
            for j in range(self.longest):
                hits[j] *= self.decay
                tries[j] *= self.decay
            for j in range(min(k + 1, c)):  # judged: every draft up to the first rejected one
                tries[j] += 1.0
                if j < k:
                    hits[j] += 1.0
            if (
                self.probing[b] and self.best(b, self.longest) == 0
            ):  # a probe after which drafts still do not pay
                self.wait[b] = min(2 * self.wait[b], self.max_probe)
            else:
                self.wait[b] = self.probe
