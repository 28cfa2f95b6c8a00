"""DraftBranch's declaration: a small trained branch (EAGLE-style) that predicts the model's next last-layer
feature from the current one and the next token's embedding, and drafts tokens from it, autoregressively on
its own features and its own one-layer KV cache; the Program verifies every draft (lossless). The pass:
``effx.passes.draft_branch``; the draft source: ``effx.runtime.draft_branch``; training:
``effx.draft_branch``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import PlanError
from . import StageKind, Technique, register

if TYPE_CHECKING:
    from ..plan import Plan, StageSpec

__all__ = ["DraftBranchPolicy"]


@dataclass(frozen=True)
class DraftBranchPolicy:
    """DraftBranch: draft up to ``draft`` tokens a round, and stop drafting a row once a draft's probability
    under the branch falls below ``threshold`` (that draft is still proposed; 0 never stops on it). With
    ``adaptive``, each row drafts only as far as a round is expected to pay (``effx.runtime.pacing``)."""

    draft: int = 4
    threshold: float = 0.0
    adaptive: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.draft, int) or isinstance(self.draft, bool) or self.draft < 1:
            raise PlanError(f"draft-branch policy draft must be an integer >= 1, got {self.draft!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
            raise PlanError(f"draft-branch policy threshold must be in [0, 1], got {t!r}")
        if not isinstance(self.adaptive, bool):
            raise PlanError(f"draft-branch policy adaptive must be true or false, got {self.adaptive!r}")


def _check_fuse(_prev: StageSpec, stage: StageSpec, next_: StageSpec | None) -> str | None:
    if next_ is None or next_.kind != "branch":
        return f"branch_fuse stage {stage.name!r} must be followed by its branch stage"
    return None


def _check_branch(prev: StageSpec, stage: StageSpec, next_: StageSpec | None) -> str | None:
    if prev.kind != "branch_fuse":
        # the branch's fusion was once part of its layer stage: such an artifact must be exported again
        return (
            f"branch stage {stage.name!r} must directly follow its branch_fuse stage (a draft branch exported "
            "before the fusion was a stage of its own: export the program again)"
        )
    if next_ is None or next_.kind != "branch_head":
        return f"branch stage {stage.name!r} must be followed by its branch_head stage"
    return None


def _check_head(prev: StageSpec, stage: StageSpec, _next: StageSpec | None) -> str | None:
    if prev.kind != "branch":
        return f"branch_head stage {stage.name!r} must directly follow its branch stage"
    return None


def _validate(plan: Plan) -> str | None:
    kinds = [s.kind for s in plan.stages]
    policy = plan.policy.get("draft_branch")
    if ("branch" in kinds) != (policy is not None):
        return "a draft branch needs both its stages and its draft_branch policy"
    if kinds.count("branch") > 1:
        return "a plan holds one draft branch"
    if policy is not None and plan.decode_mode == "lossy":
        return "a draft branch's drafts are verified; it cannot run with lossy early exits"
    return None


register(
    Technique(
        name="draft-branch",
        key="draft_branch",
        policy=DraftBranchPolicy,
        # the branch runs only while drafting (not every step): not in the per-step totals
        stage_kinds=(
            StageKind("branch_fuse", ("hidden", "prev_hidden"), ("hidden",), always=False, check=_check_fuse),
            StageKind(
                "branch",
                ("hidden", "cos", "sin", "mask", "past_k", "past_v"),
                ("hidden", "k", "v"),
                always=False,
                check=_check_branch,
            ),
            StageKind("branch_head", ("hidden",), ("logits",), always=False, check=_check_head),
        ),
        speculative=lambda policy, plan: True,
        rollback=lambda policy, plan: True,
        validate=_validate,
        draft="effx.runtime.draft_branch:branch_draft",
        doc="a trained one-layer branch drafts from the model's features (EAGLE-style), verified (lossless)",
    )
)
