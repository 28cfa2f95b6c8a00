"""Speculative sampling: the rejection rule that keeps a sampled output distributed exactly as the target's
own sampling (Leviathan et al. 2023, Chen et al. 2023; EAGLE and vLLM use the same rule).

A draft token ``d`` proposed with probability ``q(d)`` is accepted with probability ``min(1, p(d) / q(d))``,
where ``p`` is the target's distribution at that position; at the first rejection the token is drawn from
the residual ``max(0, p - q)`` normalized, and the row stops there. When every draft is accepted, one more
token is drawn from the target's distribution after the last draft. Each emitted token is then distributed
as ``p`` given the tokens before it, whatever ``q`` is, so drafting changes the speed, not the output's
distribution. ``p`` and ``q`` are the distributions a :class:`~effx.runtime.sampling.Sampler` draws from
(its temperature, top-k and top-p applied to both: ``Sampler.probabilities``). A draft source whose
drafts are greedy or looked up has a one-hot ``q``.

Written against the array API (torch and numpy), row by row over the batch: each row keeps its own prefix.
The verifier (:meth:`effx.runtime.speculative.Speculation.judge`) applies it every round of a sampled
speculative run; a source whose last draft has no position after it (``Draft.bonus`` False) gets a stand-in
there, and a row that keeps all its drafts then emits none of the stand-in's draw.
"""

from __future__ import annotations

from typing import Any

from ..arrays import Array, Namespace, multinomial, uniform

__all__ = ["accept"]


def accept(
    xp: Namespace, target: Array, draft: Array, tokens: Array, counts: list[int], rng: Any
) -> tuple[list[int], Array]:
    """The rejection rule over one round.

    ``target [batch, m + 1, vocab]``: the target's distribution at each draft position and after the last;
    ``draft [batch, m, vocab]``: the distribution each draft token was drawn from; ``tokens [batch, m]``:
    the drafts, of which row ``b`` proposes ``counts[b]``. Returns ``(accepted, next)``: per row the drafts
    it keeps (a prefix), and ``next [batch]`` the token it emits after them (drawn from the residual at the
    first rejection, else from the target after its last kept draft)."""
    batch, m = tokens.shape[0], tokens.shape[1]
    if target.shape[1] != m + 1 or draft.shape[1] != m:
        raise ValueError(f"target has {target.shape[1]} positions and draft {draft.shape[1]} for {m} drafts")
    ratios = _ratios(xp, target[:, :m], draft, tokens) if m else xp.zeros((batch, 0), dtype=xp.float64)
    accepted: list[int] = []
    rows: list[Array] = []
    for b in range(batch):
        n = 0
        u = uniform(xp, counts[b], rng)
        while n < counts[b] and bool(u[n] < ratios[b, n]):
            n += 1
        if n < counts[b]:  # rejected at n: draw from the normalized residual max(0, p - q)
            residual = xp.clip(
                xp.astype(target[b, n], xp.float64) - xp.astype(draft[b, n], xp.float64), min=0.0
            )
            total = xp.sum(residual)
            probs = residual / total if float(total) > 0 else xp.astype(target[b, n], xp.float64)
        else:
            probs = xp.astype(target[b, n], xp.float64)
        accepted.append(n)
        rows.append(multinomial(xp, probs[None, :], rng))
    return accepted, xp.concat(rows)


def _ratios(xp: Namespace, target: Array, draft: Array, tokens: Array) -> Array:
    """``min(1, p(d) / q(d))`` per draft, ``[batch, m]`` float64 (a draft its own source gave probability 0
    is never accepted)."""
    index = tokens[..., None]
    p = xp.astype(xp.take_along_axis(target, index, axis=-1)[..., 0], xp.float64)
    q = xp.astype(xp.take_along_axis(draft, index, axis=-1)[..., 0], xp.float64)
    safe = xp.where(q > 0, q, xp.ones_like(q))
    return xp.where(q > 0, xp.clip(p / safe, max=1.0), xp.zeros_like(q))
