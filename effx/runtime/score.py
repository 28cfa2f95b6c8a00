"""Scoring a given continuation the way a Program decodes it: the log-probability of each of its tokens and
whether it is the Program's greedy choice there (what lm-evaluation-harness's ``loglikelihood`` asks), or
the greedy token itself (:func:`score_tokens`: what ``effx bench``'s agreement compares). This is effx's one
teacher-forced scorer: :func:`effx.quality.perplexity` and ``effx bench``'s perplexity are computed from it.

Written once against the array API, so the torch backend and the ONNX Runtime backend score alike.

* A plan whose decode steps are the dense model's (dense, neuron-masked, vocabulary-reduced heads with
  their fallback, TokenDrop, core neurons; and lossless drafting, whose output is the dense Program's by
  construction) prefills the context with the plan's own prefill and scores the continuation in
  multi-token steps of at most ``chunk`` positions.
* A plan with lossy early exits runs the decode loop itself (:func:`effx.runtime.loop.decode`), forced
  along the continuation: every token's log-probability comes from the head that the runtime used at that
  position (an exit's, or the final one), with the exited tokens' deferred KV as in generation.

Batches are left-padded contexts with right-padded continuations: every position is scored, and a row
whose continuation is shorter ignores the scores past its end (padding only ever follows what is scored,
so it cannot change them).
"""

from __future__ import annotations

from typing import Any

from ..arrays import Array, Namespace, take_along_axis
from ..errors import GenerationInputError
from .backend import Backend
from .forward import positions_from_mask, run_step
from .loop import decode, prefill
from .stats import DecodeStats, StatsArg, collecting

__all__ = ["log_softmax", "score", "score_tokens"]


def log_softmax(xp: Namespace, logits: Array) -> Array:
    """``log_softmax`` over the last axis in float32 (``-inf`` logits stay ``-inf``)."""
    logits = xp.astype(logits, xp.float32)
    top = xp.max(logits, axis=-1, keepdims=True)
    return logits - (top + xp.log(xp.sum(xp.exp(logits - top), axis=-1, keepdims=True)))


def _pick(xp: Namespace, logits: Array, targets: Array) -> tuple[Array, Array]:
    """``(log-probability of targets, greedy tokens)``, both ``[batch, n]``, from logits ``[batch, n, V]``."""
    logp = log_softmax(xp, logits)
    picked = take_along_axis(xp, logp, targets[..., None], axis=-1)[..., 0]
    return picked, xp.argmax(logits, axis=-1)


class _Forced:
    """A sampler that answers with the given continuation and keeps what each step scored it."""

    do_sample = False

    def __init__(self, xp: Namespace, tokens: Array) -> None:
        self.xp, self.tokens = xp, tokens
        self.logp: list[Array] = []
        self.greedy: list[Array] = []

    def __call__(self, logits: Array, generator: Any = None) -> Array:
        step = len(self.logp)
        target = self.tokens[:, step]
        logp, greedy = _pick(self.xp, logits[:, None], target[:, None])
        self.logp.append(logp[:, 0])
        self.greedy.append(greedy[:, 0])
        return target


def score(
    backend: Backend,
    context: Array,
    context_mask: Array,
    continuation: Array,
    *,
    chunk: int = 256,
    stats: StatsArg = None,
) -> tuple[Array, Array]:
    """``(logp, greedy)``, both ``[batch, n]``: for every token of ``continuation [batch, n]`` (int64) after
    the left-padded ``context [batch, c]`` (``context_mask`` marks its real tokens), its log-probability
    under the Program as it decodes and whether it is the Program's greedy token there. ``stats`` receives
    the run-time decisions, as in ``generate`` (``exit_layers`` has one entry per decode step: the first
    continuation token comes from the prefill, which runs every layer)."""
    logp, tokens = score_tokens(backend, context, context_mask, continuation, chunk=chunk, stats=stats)
    return logp, tokens == continuation


def score_tokens(
    backend: Backend,
    context: Array,
    context_mask: Array,
    continuation: Array,
    *,
    chunk: int = 256,
    stats: StatsArg = None,
) -> tuple[Array, Array]:
    """``(logp, tokens)``, both ``[batch, n]``: as :func:`score`, but with the Program's greedy token at
    every position (``tokens``, int64) instead of whether it equals the continuation's. Each position is
    scored by the head that produces the token there when the Program decodes: an exit's where the exit's
    confidence passes its threshold, else the (reduced, with its fallback) final head; a head that gives a
    token probability 0 scores it ``-inf``."""
    if context.ndim != 2 or continuation.ndim != 2 or context.shape[0] != continuation.shape[0]:
        raise GenerationInputError(
            f"context [batch, c] and continuation [batch, n] must share their batch, got shapes "
            f"{tuple(context.shape)} and {tuple(continuation.shape)}"
        )
    if context.shape[1] == 0 or continuation.shape[1] == 0:
        raise GenerationInputError("context and continuation must each hold at least one token")
    if chunk < 1:
        raise GenerationInputError(f"chunk must be >= 1, got {chunk}")
    c, n = context.shape[1], continuation.shape[1]
    plan = backend.plan
    if c + n - 1 > plan.model.max_positions:  # the last continuation token is scored, never read
        raise GenerationInputError(
            f"{c} context + {n} continuation tokens exceed the model's {plan.model.max_positions} positions"
        )
    with collecting(stats) as typed:
        return _score(backend, context, context_mask, continuation, chunk, typed)


def _score(
    backend: Backend,
    context: Array,
    context_mask: Array,
    continuation: Array,
    chunk: int,
    stats: DecodeStats | None,
) -> tuple[Array, Array]:
    xp, plan = backend.xp, backend.plan
    (batch, c), n = context.shape, continuation.shape[1]
    if plan.decides:  # lossy exits: score the tokens the way the loop decides them
        forced = _Forced(xp, continuation)
        decode(backend, context, context_mask, max_new=n, eos=[], pad=0, sampler=forced, stats=stats)
        return xp.stack(forced.logp, axis=1), xp.stack(forced.greedy, axis=1)
    key_valid = xp.concat([xp.astype(context_mask, xp.bool), xp.ones((batch, n), dtype=xp.bool)], axis=1)
    with backend.compute():
        cache = backend.new_cache(batch, c + n, rollback=plan.rollback)
        positions = positions_from_mask(context_mask)
        if stats is not None and plan.full_head is not None:
            stats.start_head()
        last, step_backend = prefill(backend, cache, context, positions, key_valid[:, :c], stats)
        logp, greedy = _pick(xp, last[:, None], continuation[:, :1])
        parts, tokens = [logp], [greedy]
        start = positions[:, -1:] + 1
        for lo in range(0, n - 1, chunk):
            hi = min(lo + chunk, n - 1)
            pos = start + xp.arange(lo, hi)[None]
            logits = run_step(
                step_backend,
                cache,
                continuation[:, lo:hi],
                pos,
                key_valid[:, : c + hi],
                last_only=False,
                stats=stats,
            )
            logp, greedy = _pick(xp, logits, continuation[:, lo + 1 : hi + 1])
            parts.append(logp)
            tokens.append(greedy)
    return xp.concat(parts, axis=1), xp.concat(tokens, axis=1)
