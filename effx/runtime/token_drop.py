"""The prefill of a Program with TokenDrop stages (see :mod:`effx.passes.token_drop`).

Tokens are tracked by their cache slot. Before a drop layer the score stage rates the tokens that are still
in; ``select_tokens`` keeps, per sample, the quota of real tokens with the highest scores plus the protected
ones; the drop stage gathers them. Every later layer runs on the kept tokens only, with the prompt's causal
mask restricted to them (rows and columns gathered), and writes its keys and values into the kept tokens'
own slots; ``cache.dropped[layer]`` marks the other prompt slots so that decoding never attends to them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from ..arrays import Array, namespace, put_along_axis
from ..plan import TokenDropPolicy
from .forward import KVCache, as_backend, attention_masks
from .stats import DecodeStats
from .vocab import head_logits

if TYPE_CHECKING:
    from .forward import BackendLike

__all__ = ["drop_prefill", "keep_quota", "select_tokens"]


def keep_quota(real: Array, keep: float) -> Array:
    """How many of its ``real [batch]`` tokens each row keeps: ``ceil(real * keep)``, at least 1. In float64:
    in float32, 100 * 0.6 rounds to 60.000002 and would keep 61."""
    xp = namespace(real)
    return xp.clip(xp.astype(xp.ceil(xp.astype(real, xp.float64) * keep - 1e-9), xp.int64), min=1)


def select_tokens(scores: Array, valid: Array, protected: Array, quota: Array) -> tuple[Array, Array]:
    """Indices ``[batch, n]`` (ascending) of the tokens to keep, and whether each kept token counts
    (``valid``): per row, the protected tokens and the ``quota[row]`` best-scoring real tokens. Rows that
    keep fewer than ``n`` carry their lowest-ranked extra tokens as invalid (masked) passengers."""
    xp = namespace(scores)
    inf = xp.asarray(float("inf"), dtype=xp.float32)
    s = xp.where(valid, xp.astype(scores, xp.float32), -inf)
    s = xp.where(protected & valid, inf, s)
    quota = xp.maximum(quota, xp.sum(xp.astype(protected & valid, xp.int64), axis=1))
    n = int(xp.max(quota))
    # a stable sort: equal scores go to the earlier token, whatever the batch around the row
    indices = xp.argsort(s, axis=-1, descending=True, stable=True)[:, :n]
    values = xp.take_along_axis(s, indices, axis=1)
    keep_valid = (xp.arange(n)[None, :] < quota[:, None]) & (values > -inf)
    perm = xp.argsort(indices, axis=-1, stable=True)
    return xp.take_along_axis(indices, perm, axis=1), xp.take_along_axis(keep_valid, perm, axis=1)


def prefill(
    backend: BackendLike,
    cache: KVCache,
    input_ids: Array,
    positions: Array,
    key_valid: Array,
    stats: DecodeStats | None = None,
) -> tuple[Array, BackendLike] | None:
    """TokenDrop's prefill hook (``effx.techniques.token_drop``): :func:`drop_prefill` for a plan that drops
    tokens, None for another."""
    if not as_backend(backend).plan.drops:
        return None
    return drop_prefill(backend, cache, input_ids, positions, key_valid, stats), backend


def drop_prefill(
    backend: BackendLike,
    cache: KVCache,
    input_ids: Array,
    positions: Array,
    key_valid: Array,
    stats: DecodeStats | None = None,
) -> Array:
    """Prefill ``input_ids [batch, prompt]`` through a TokenDrop Program; returns the last position's
    logits. ``key_valid [batch, prompt]`` marks real tokens (left padding)."""
    backend = as_backend(backend)
    plan, xp = backend.plan, backend.xp
    policy = cast(TokenDropPolicy, plan.policy.token_drop)  # Plan.validate: drops need the policy
    drops = plan.drops
    batch, n = input_ids.shape
    hidden, cos, sin = backend.run(plan.embed, input_ids, positions)
    full = attention_masks(key_valid, 0, n, plan.windows, backend.dtype)
    slots = xp.broadcast_to(xp.arange(n)[None, :], (batch, n))  # the slot of each token still in
    valid = key_valid
    real = xp.sum(xp.astype(key_valid, xp.int64), axis=1)
    special = xp.isin(input_ids, xp.asarray(policy.special, dtype=input_ids.dtype))
    protect = policy.protect_last
    dropped = None
    kept_counts: dict[int, list[int]] = {}
    for stage in plan.layers:
        i = cast(int, stage.layer)  # a layer stage's layer
        window = stage.attrs.get("sliding_window")
        mask = full[window] if slots.shape[1] == n else _restrict(full[window], slots, valid)
        if i in drops:
            score_stage, drop_stage = drops[i]
            scores = backend.run(score_stage, hidden, cos, sin, mask, *cache.past(i))[0]
            quota = keep_quota(real, score_stage.attrs["keep"])
            protected = xp.take_along_axis(special, slots, axis=1) | (slots >= n - protect)
            idx, valid = select_tokens(scores, valid, protected, quota)
            hidden, cos, sin = backend.run(drop_stage, hidden, cos, sin, idx)
            slots = xp.take_along_axis(slots, idx, axis=1)
            dropped = xp.ones((batch, n), dtype=xp.bool)
            put_along_axis(xp, dropped, slots, ~valid, axis=1)  # kept passengers stay dropped
            dropped = dropped & key_valid  # padding is masked anyway
            kept_counts[i] = [int(c) for c in xp.sum(xp.astype(valid, xp.int64), axis=1)]
            mask = _restrict(full[window], slots, valid)
        hidden, k, v = backend.run(stage, hidden, cos, sin, mask, *cache.past(i))
        if dropped is None:
            cache.write(i, k, v)
        else:
            cache.write_slots(i, k, v, slots, valid, n)
            cache.dropped[i] = dropped
    if stats is not None:
        stats.set(kept_tokens=kept_counts)
    return head_logits(backend, hidden[:, -1:], stats)[:, -1]


def _restrict(mask: Array, slots: Array, valid: Array) -> Array:
    """The prompt mask ``[batch, 1, n, n]`` for the tokens at ``slots [batch, m]`` only (queries and keys).
    Tokens that do not count (``valid`` False: padding, passengers) are masked as keys and see nothing as
    queries, like padding."""
    xp = namespace(mask)
    rows = xp.take_along_axis(mask, slots[:, None, :, None], axis=2)
    out = xp.take_along_axis(rows, slots[:, None, None, :], axis=3)
    hidden = ~valid[:, None, None, :] | ~valid[:, None, :, None]
    return xp.where(hidden, xp.full((), xp.finfo(mask.dtype).min, dtype=mask.dtype), out)
