"""EarlyExit's declaration: exit stages after chosen layers, decoded lossily (a row leaves where its exit is
confident; the skipped layers' KV computed later, exactly) or self-speculatively (the shallowest exit drafts
what the full model verifies). The pass: ``effx.passes.early_exit``; the decoders: ``effx.runtime.early_exit``
(lossy) and ``effx.runtime.speculative`` (the exit draft)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import PlanError
from . import Signature, StageKind, Technique, register

if TYPE_CHECKING:
    from ..plan import Plan, StageSpec

__all__ = ["KV", "MODES", "PRUNED_EXIT_SIGNATURE", "EarlyExitPolicy"]

# an exit that scores only the token ids it is given (VocabReduce where="exits"; attrs vocab="pruned")
PRUNED_EXIT_SIGNATURE: Signature = (("hidden", "prev_hidden", "vocab_ids"), ("logits", "confidence"))


MODES = ("lossy", "self-speculative")
KV = ("deferred", "copy")


@dataclass(frozen=True)
class EarlyExitPolicy:
    """EarlyExit: ``mode`` "lossy" (exits with deferred KV, or ``kv="copy"``) or "self-speculative"
    (the shallowest exit drafts up to ``draft`` tokens that the full model verifies)."""

    mode: str
    draft: int = 4
    measure: str = "softmax-max"
    kv: str = "deferred"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PlanError(f"unknown early-exit mode {self.mode!r}; modes: {', '.join(MODES)}")
        if not isinstance(self.draft, int) or isinstance(self.draft, bool) or self.draft < 1:
            raise PlanError(f"early-exit draft must be an integer >= 1, got {self.draft!r}")
        if self.kv not in KV:
            raise PlanError(
                f"early-exit kv must be 'deferred' (exact) or 'copy' (CALM state copying), got {self.kv!r}"
            )
        if self.kv == "copy" and self.mode != "lossy":
            raise PlanError("early-exit kv='copy' only applies to mode='lossy'")


def _variant(attrs: Mapping[str, Any]) -> Signature | None:
    return PRUNED_EXIT_SIGNATURE if attrs.get("vocab") == "pruned" else None


def _check(prev: StageSpec, stage: StageSpec, _next: StageSpec | None) -> str | None:
    if not (prev.kind == "layer" and prev.layer == stage.layer):
        return f"exit stage {stage.name!r} must directly follow layer {stage.layer}"
    threshold = stage.attrs.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        return f"exit stage {stage.name!r} has no numeric threshold"
    return None


def _validate(plan: Plan) -> str | None:
    if plan.exits and plan.policy.get("early_exit") is None:
        return "the plan has exit stages but no early_exit policy"
    return None


register(
    Technique(
        name="early-exit",
        key="early_exit",
        policy=EarlyExitPolicy,
        stage_kinds=(
            StageKind(
                "exit",
                ("hidden", "prev_hidden"),
                ("logits", "confidence"),
                variant=_variant,
                last_position=True,
                check=_check,
            ),
        ),
        speculative=lambda policy, plan: policy.mode == "self-speculative" and bool(plan.exits),
        decides=lambda policy, plan: policy.mode == "lossy" and bool(plan.exits),
        rollback=lambda policy, plan: bool(plan.exits),
        capabilities=lambda policy: ("kv-copy",) if policy.kv == "copy" else (),
        validate=_validate,
        draft="effx.runtime.speculative:exit_draft",
        decoder="effx.runtime.early_exit:lossy_decoder",
        doc="exits after chosen layers: lossy (deferred KV) or self-speculative (verified drafts)",
    )
)
