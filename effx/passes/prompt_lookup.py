"""PromptLookup: draft tokens by looking them up in the text so far, verified by the Program itself.

Prompt lookup decoding (Saxena 2023; HF's ``prompt_lookup_num_tokens``, llama.cpp's lookup decoding): where
the output repeats the prompt (summaries, edits, answers quoted from a context, code that reuses names), the
tokens that followed the last occurrence of the current n-gram are a free draft. The decode loop's verifier
(:mod:`effx.runtime.speculative`) runs the Program once over the drafts and keeps the agreeing prefix plus
the Program's own next token, so the output is the Program's greedy output exactly; no weights, no training.

The pass changes no graph: it sets the run-time policy the verifier reads::

    prompt-lookup{ngram=3 min_ngram=2 draft=4}      # the defaults

``ngram``: the longest n-gram matched (shorter ones, down to ``min_ngram``, are tried when it does not
occur); ``draft``: the most tokens drafted per round. The defaults are the best of those measured on SmolLM2
(``benchmarks/drafting.py``): single-token matches (``min_ngram=1``) are mostly chance on open chat prompts
and their rejected drafts cost more than they win there. With ``EarlyExit(mode="self-speculative")`` in the same
pipeline both are draft sources: lookup drafts where the text repeats, the shallow exit elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import PassConfigError, PassError, PassPreconditionError, PlanError
from ..plan import PromptLookupPolicy
from .base import Pass, PassResult, check_size, register_pass

if TYPE_CHECKING:
    from ..plan import ModelInfo
    from ..program import Program

__all__ = ["PromptLookup"]


@register_pass
@dataclasses.dataclass(frozen=True)
class PromptLookup(Pass):
    """Prompt lookup decoding: n-gram drafts from the prompt and the output, verified (lossless)."""

    name = "prompt-lookup"
    # lossy exits decide tokens without the full model, so there is nothing to verify drafts with
    after = ("early-exit",)
    order_reason = "prompt-lookup checks the early-exit mode, which must be set first"

    ngram: int = 3
    min_ngram: int = 2
    draft: int = 4

    def __post_init__(self) -> None:
        try:
            self.policy()
        except PlanError as e:
            raise PassConfigError(str(e).replace(" policy", "", 1)) from None

    def policy(self) -> PromptLookupPolicy:
        """The run-time policy this pass sets."""
        return PromptLookupPolicy(ngram=self.ngram, min_ngram=self.min_ngram, draft=self.draft)

    def check_model(self, info: ModelInfo) -> None:
        check_size("prompt-lookup draft", self.draft, info.max_positions - 1, "max_positions - 1")
        check_size("prompt-lookup ngram", self.ngram, info.max_positions - 1, "max_positions - 1")

    def check_after(self, earlier: Sequence[Pass]) -> None:
        if any(p.name == self.name for p in earlier):
            raise PassPreconditionError("the program already drafts with prompt lookup")
        if any(p.name == "early-exit" and getattr(p, "mode", "") == "lossy" for p in earlier):
            raise PassPreconditionError(
                "lossy early exits (an earlier early-exit) emit tokens the full model never checks, so lookup "
                "drafts cannot be verified: use EarlyExit(mode='self-speculative') or no early exit"
            )

    def requires(self, program: Program) -> None:
        """A Program that verifies with its full model: not lossy exits, and one lookup per Program."""
        plan = program.plan
        if plan.policy.prompt_lookup is not None:
            raise PassError("the program already drafts with prompt lookup")
        if plan.decode_mode == "lossy":
            raise PassError(
                "lossy early exits emit tokens the full model never checks, so lookup drafts cannot be "
                "verified: use EarlyExit(mode='self-speculative') or no early exit"
            )

    def apply(self, program: Program) -> PassResult:
        self.requires(program)
        policy = program.plan.policy.updated(prompt_lookup=self.policy())
        report = self.new_report()
        report.change(
            "decode",
            f"draft up to {self.draft} tokens that followed the last {self.ngram}..{self.min_ngram}-gram, "
            "verified in one step (greedy output unchanged)",
        )
        report.notes.append("FLOPs/token are those of the Program; what a round saves depends on acceptance")
        return PassResult(program.with_stages(program.stages, policy=policy), True, report)

    def ensures(self, program: Program) -> None:
        if program.plan.policy.prompt_lookup is None:
            raise PassError("the program has no prompt-lookup policy")
