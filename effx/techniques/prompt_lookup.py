"""PromptLookup's declaration: drafts looked up in the text so far (prompt lookup decoding), verified by the
Program itself. Its settings and its draft source live here; the pass (``effx.passes.prompt_lookup``) only
records the settings in the plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import PlanError
from . import Technique, register
from .draft import Draft, DraftSource

if TYPE_CHECKING:
    from ..plan import Plan
    from ..runtime.speculative import Speculation

__all__ = ["LookupDraft", "PromptLookupPolicy"]


@dataclass(frozen=True)
class PromptLookupPolicy:
    """PromptLookup: draft up to ``draft`` tokens that followed the latest earlier occurrence of the last
    ``ngram`` tokens (else of shorter n-grams, down to ``min_ngram``) in the prompt and the output so far."""

    ngram: int = 3
    min_ngram: int = 2
    draft: int = 4

    def __post_init__(self) -> None:
        for name in ("ngram", "min_ngram", "draft"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"prompt-lookup policy {name} must be an integer >= 1, got {value!r}")
        if self.min_ngram > self.ngram:
            raise PlanError(f"prompt-lookup policy min_ngram {self.min_ngram} exceeds ngram {self.ngram}")


class LookupDraft(DraftSource):
    """Prompt lookup: the continuation of the most recent earlier occurrence of the row's last n-gram
    (``ngram`` tokens, else shorter down to ``min_ngram``) in the row's prompt and output."""

    name = "lookup"
    # looking up costs nothing next to a step: each row drafts as far as the verify step's extra width
    # pays at its recent acceptance (effx.runtime.pacing)
    cost = 0.0

    def __init__(self, ngram: int, min_ngram: int, draft: int) -> None:
        self.draft = draft
        self.sizes = list(range(ngram, min_ngram - 1, -1))
        self.history: list[list[int]] = []
        # per row, per n-gram size: n-gram -> where the tokens that followed its latest occurrence start
        self.index: list[dict[int, dict[tuple[int, ...], int]]] = []

    def start(self, spec: Speculation) -> None:
        self.history = [[] for _ in range(spec.batch)]
        self.index = [{s: {} for s in self.sizes} for _ in range(spec.batch)]
        for b in range(spec.batch):
            self.appended(spec, b, spec.row_tokens(b))

    def appended(self, spec: Speculation, row: int, tokens: list[int]) -> None:
        hist, index = self.history[row], self.index[row]
        for t in tokens:
            n = len(hist)
            for s in self.sizes:  # the n-gram that ends just before the new token now has a continuation
                if n >= s:
                    index[s][tuple(hist[n - s :])] = n
            hist.append(int(t))

    def propose(self, spec: Speculation, n: int) -> Draft | None:
        rows = []
        for b in range(spec.batch):
            found: list[int] = []
            if spec.active[b]:
                hist, index = self.history[b], self.index[b]
                for s in self.sizes:
                    if len(hist) >= s:
                        at = index[s].get(tuple(hist[-s:]))
                        if at is not None:
                            found = hist[at : at + n]
                            break
            rows.append(found)
        m = max(len(r) for r in rows)
        if m == 0:
            return None
        xp = spec.xp
        tokens = xp.asarray([r + [0] * (m - len(r)) for r in rows], dtype=xp.int64)
        return Draft(tokens, [len(r) for r in rows])


def lookup_draft(policy: PromptLookupPolicy, _plan: Plan) -> LookupDraft:
    """The draft hook: a lookup source with the plan's settings."""
    return LookupDraft(policy.ngram, policy.min_ngram, policy.draft)


def _validate(plan: Plan) -> str | None:
    if plan.policy.get("prompt_lookup") is not None and plan.decode_mode == "lossy":
        return "prompt lookup verifies its drafts; it cannot run with lossy early exits"
    return None


register(
    Technique(
        name="prompt-lookup",
        key="prompt_lookup",
        policy=PromptLookupPolicy,
        speculative=lambda policy, plan: True,
        rollback=lambda policy, plan: True,
        validate=_validate,
        draft="effx.techniques.prompt_lookup:lookup_draft",
        doc="n-gram drafts looked up in the prompt and the output, verified (lossless)",
    )
)
