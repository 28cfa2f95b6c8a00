"""TokenDrop's declaration: before chosen layers, the prefill scores the prompt tokens (``token_score``, cut
from that layer's attention) and keeps the most important share (``token_drop``); later layers see the kept
tokens only. The pass: ``effx.passes.token_drop``; the prefill: ``effx.runtime.token_drop``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import StageKind, Technique, register

if TYPE_CHECKING:
    from ..plan import Plan, StageSpec

__all__ = ["TokenDropPolicy"]


@dataclass(frozen=True)
class TokenDropPolicy:
    """TokenDrop: the last ``protect_last`` prompt tokens and the ``special`` token ids are always kept."""

    protect_last: int
    special: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # a plan read from JSON has a list here
        object.__setattr__(self, "special", tuple(int(t) for t in self.special))

    def token_ids(self) -> tuple[int, ...]:
        """The token ids the policy names (an artifact's check keeps them inside the vocabulary)."""
        return self.special


def _check_score(_prev: StageSpec, stage: StageSpec, next_: StageSpec | None) -> str | None:
    if next_ is None or not (next_.kind == "token_drop" and next_.layer == stage.layer):
        return f"token_score stage {stage.name!r} must be followed by its token_drop stage"
    return None


def _check_drop(_prev: StageSpec, stage: StageSpec, next_: StageSpec | None) -> str | None:
    if next_ is None or not (next_.kind == "layer" and next_.layer == stage.layer):
        return f"token_drop stage {stage.name!r} must directly precede layer {stage.layer}"
    return None


def _kept(attrs: Mapping[str, Any], tokens: int) -> int:
    return max(1, math.ceil(tokens * attrs["keep"]))


def _validate(plan: Plan) -> str | None:
    if plan.drops and plan.policy.get("token_drop") is None:
        return "the plan drops tokens but has no token_drop policy"
    return None


_LAYER_INPUTS = ("hidden", "cos", "sin", "mask", "past_k", "past_v")
register(
    Technique(
        name="token-drop",
        key="token_drop",
        policy=TokenDropPolicy,
        stage_kinds=(
            StageKind(
                "token_score",
                _LAYER_INPUTS,
                ("scores",),
                runs="prefill",
                counted_as="layer",
                check=_check_score,
            ),
            StageKind(
                "token_drop",
                ("hidden", "cos", "sin", "keep_ids"),
                ("hidden", "cos", "sin"),
                runs="prefill",
                prefill_tokens=_kept,
                check=_check_drop,
            ),
        ),
        rollback=lambda policy, plan: bool(plan.drops),
        validate=_validate,
        prefill="effx.runtime.token_drop:prefill",
        doc="progressive prompt-token elimination in the prefill",
    )
)
