"""The draft branch's source for the verifier (:mod:`effx.runtime.speculative`): EAGLE-style drafting from
the model's own last-layer features.

The branch (``DraftBranch``: a ``branch`` stage and its ``branch_head``) keeps a one-layer KV cache whose
slots are the verifier's slots, so the verifier's validity mask and positions serve it as they are. The
entry at slot ``s`` is computed from the token at ``s`` and the model's feature at the slot before (its
last-layer output, the input of the head; zeros before the first token). The source keeps those features
per slot: the prompt's from the prefill, then every round's verified ones (``settled``); a row that
rejected drafts another row accepted leaves holes, whose feature is the row's last valid one, so the slot
after a hole reads the right feature.

A round: the branch first runs over every slot it has not seen with true features (the tokens verified
since its last round, and the last emitted token), which predicts the feature after the last token and so
the first draft; then it drafts on, one token a step, from its own predicted features, up to ``n`` tokens
or until every row's draft probability falls below ``threshold``. Those predicted entries are replaced by
true ones in the next round, EAGLE's scheme: the branch never attends to its own guesses across rounds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..arrays import Array, multinomial, softmax, take_along_axis
from ..techniques.draft import Draft, DraftSource
from ..techniques.draft_branch import DraftBranchPolicy
from .forward import KVCache, attention_masks
from .pacing import Average

if TYPE_CHECKING:
    from ..plan import Plan
    from .speculative import Speculation

__all__ = ["BranchDraft", "branch_cost", "branch_draft"]


class BranchDraft(DraftSource):
    """Drafts from the plan's draft branch (see the module's docstring)."""

    name = "branch"
    features = True

    def __init__(self, draft: int, threshold: float, adaptive: bool = True) -> None:
        self.draft, self.threshold, self.adaptive = draft, threshold, adaptive
        self.done = 0  # slots before this one hold branch entries computed from true features
        self.before = 0

    def start(self, spec: Speculation) -> None:
        backend, xp = spec.backend, spec.xp
        plan, info = backend.plan, backend.plan.model
        self.fuse = next(s for s in plan.stages if s.kind == "branch_fuse")
        self.stage = next(s for s in plan.stages if s.kind == "branch")
        self.head = next(s for s in plan.stages if s.kind == "branch_head")
        capacity = spec.key_valid.shape[1]
        self.cache = KVCache(
            1, spec.batch, info.num_kv_heads, capacity, info.head_dim, backend.dtype, xp=backend.xp
        )
        self.feat = xp.zeros((spec.batch, capacity, info.hidden_size), dtype=backend.dtype)
        prompt = spec.prompt_features
        if prompt is not None:  # padding slots read as zeros, as the first token of a sequence does
            valid = xp.astype(spec.key_valid[:, : spec.prompt_len, None], backend.dtype)
            self.feat[:, : spec.prompt_len] = prompt * valid
        self.done = 0
        self.estimate = branch_cost(plan)
        self.cost = self.estimate if self.adaptive else None
        self.seconds = Average()

    def _run(self, spec: Speculation, tokens: Array, positions: Array, prev: Array, end: int) -> Array:
        """The branch over ``tokens [batch, q]`` at slots ``end - q .. end - 1``, each with the feature before
        it (``prev [batch, q, hidden]``); fills its cache and returns its predicted features."""
        backend = spec.backend
        hidden, cos, sin = backend.run(backend.plan.embed, tokens, positions)
        q = tokens.shape[1]
        masks = attention_masks(spec.key_valid[:, :end], end - q, q, (None,), backend.dtype, spec.slot_pos)
        mask = masks[None]  # the branch attends to every slot (no sliding window)
        (fused,) = backend.run(self.fuse, hidden, prev)
        out, k, v = backend.run(self.stage, fused, cos, sin, mask, *self.cache.past(0))
        self.cache.write(0, k, v)
        return out

    def propose(self, spec: Speculation, n: int) -> Draft | None:
        began = time.perf_counter()
        draft = self._draft(spec, n)
        if self.adaptive:
            self._time(spec, time.perf_counter() - began, draft.tokens.shape[1])
        return draft

    def _time(self, spec: Speculation, seconds: float, drafted: int) -> None:
        """Refine the cost of a draft step, in plain steps, from this round's drafting time (the catch-up
        step counted in, shared by the drafts) against the verifier's measured step; the weight-based
        estimate stands until both are measured, and is the floor."""
        self.seconds.add(seconds / max(1, drafted))
        step = spec.step_seconds.value
        if step and self.seconds.value is not None:
            self.cost = max(self.estimate, self.seconds.value / step)

    def _draft(self, spec: Speculation, n: int) -> Draft:
        xp, backend = spec.xp, spec.backend
        last = spec.length
        spec.place(last, spec.last[:, None], spec.pos[:, None])
        lo = self.done
        self.cache.truncate(lo)
        if lo > 0:
            prev = self.feat[:, lo - 1 : last]
        else:
            prev = xp.concat([xp.zeros_like(self.feat[:, :1]), self.feat[:, :last]], axis=1)
        predicted = self._run(
            spec, spec.slot_tokens[:, lo : last + 1], spec.slot_pos[:, lo : last + 1], prev, last + 1
        )
        self.done = last + 1
        feat = predicted[:, -1:]
        going = spec.active
        counts = [0] * spec.batch
        drafts: list[Array] = []
        probs: list[Array] = []  # sampling: the distribution each draft is drawn from
        for j in range(n):
            logits = xp.astype(backend.run(self.head, feat)[0][:, -1], xp.float32)
            if spec.sampler is None:
                token = xp.argmax(logits, axis=-1)
            else:
                probs.append(spec.sampler.probabilities(logits))
                token = multinomial(xp, probs[-1], spec.rng)
            drafts.append(token)
            counts = [j + 1 if g else c for g, c in zip(going, counts, strict=True)]
            if self.threshold > 0:
                sure = xp.max(softmax(xp, logits), axis=-1) >= self.threshold
                going = [g and bool(s) for g, s in zip(going, sure, strict=True)]
            if j == n - 1 or not any(going):
                break
            slot = last + 1 + j
            pos = spec.pos[:, None] + (j + 1)
            spec.place(slot, token[:, None], pos)
            feat = self._run(spec, token[:, None], pos, feat, slot + 1)
        return Draft(xp.stack(drafts, axis=1), counts, probs=xp.stack(probs, axis=1) if probs else None)

    def settled(self, spec: Speculation, start: int, kept: list[int], features: Array) -> None:
        width = features.shape[1]
        self.feat[:, start : start + width] = features
        self._fill(start, kept)

    def _fill(self, start: int, kept: list[int]) -> None:
        """Holes (row ``b``'s slots from ``start + kept[b]`` up to the longest row's) take the row's last
        valid feature, so the slot after them reads it."""
        end = start + max(kept)
        for b, k in enumerate(kept):
            if start + k < end:
                self.feat[b, start + k : end] = self.feat[b, start + k - 1]

    def sync(self, spec: Speculation) -> None:
        self.before = spec.length

    def compacted(self, spec: Speculation, start: int, index: Array) -> None:
        xp = spec.xp
        count = index.shape[1]
        shape = (index.shape[0], count, self.feat.shape[2])
        moved = take_along_axis(
            xp, self.feat[:, start : self.before], xp.broadcast_to(index[:, :, None], shape), axis=1
        )
        self.feat[:, start : start + count] = moved
        valid = xp.sum(xp.astype(spec.key_valid[:, start : start + count], xp.int64), axis=1)
        self._fill(start, [int(v) for v in valid])
        # the branch's entries after ``start`` moved too: recompute them from the features next round
        self.done = min(self.done, start)
        self.cache.truncate(self.done)


def branch_cost(plan: Plan) -> float:
    """A branch draft step's cost in dense steps, by weights read (a decode step streams its weights):
    the branch's fusion, layer and draft head, in the bytes the branch stores them in (its ``bits``),
    against every layer and the head in float32. Decoding at batch 1 on a CPU is bound by memory bandwidth,
    and a draft step is a few small products more than its weights: at least 0.05 of a step. A starting
    point only: the source times its steps against the Program's (a quantized Program's steps are
    cheaper than float32's)."""
    info = plan.model
    d, attn = info.hidden_size, 2 * info.hidden_size * (info.num_heads + info.num_kv_heads) * info.head_dim
    branch = next(s for s in plan.stages if s.kind == "branch")
    head = next(s for s in plan.stages if s.kind == "branch_head")
    ffn = int(branch.attrs.get("ffn", info.intermediate_size))
    drafting = 2 * d * d + attn + 3 * d * ffn + int(head.attrs.get("vocab_k", info.vocab_size)) * d
    drafting = drafting * int(branch.attrs.get("bits", 32)) // 32
    step = info.num_layers * (attn + 3 * d * info.intermediate_size) + info.vocab_size * d
    return max(0.05, drafting / step)


def branch_draft(policy: DraftBranchPolicy, _plan: Plan) -> BranchDraft:
    """DraftBranch's draft hook: a source over the plan's branch stages."""
    return BranchDraft(policy.draft, policy.threshold, policy.adaptive)
