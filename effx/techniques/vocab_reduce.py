"""VocabReduce's declaration: heads over a frequency-ranked subset of the vocabulary. Its one stage kind of
its own is the full-vocabulary head that a reduced head falls back to (``where="head"`` with a fallback
threshold); exits over a subset are exit stages (``attrs vocab="pruned"``, see ``early_exit``). The pass:
``effx.passes.vocab_reduce``; the fallback: ``effx.runtime.vocab``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import StageKind, Technique, register

if TYPE_CHECKING:
    from ..plan import Plan, StageSpec


def _check(_prev: StageSpec, stage: StageSpec, next_: StageSpec | None) -> str | None:
    if next_ is None or next_.kind != "head":
        return f"full_head stage {stage.name!r} must directly precede the head"
    return None


def _validate(plan: Plan) -> str | None:
    if plan.full_head is not None and not plan.head.attrs.get("fallback"):
        return "a full_head stage is only there for a head with a fallback threshold"
    return None


register(
    Technique(
        name="vocab-reduce",
        key="vocab_reduce",
        # the fallback head runs only for the tokens the reduced head is unsure of: not in the totals
        stage_kinds=(
            StageKind("full_head", ("hidden",), ("logits",), last_position=True, always=False, check=_check),
        ),
        validate=_validate,
        doc="heads over a frequency-ranked vocabulary subset, with a full-vocabulary fallback",
    )
)
