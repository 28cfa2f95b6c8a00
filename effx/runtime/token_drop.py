"""The prefill of a Program with TokenDrop stages (see :mod:`effx.passes.token_drop`).

Tokens are tracked by their cache slot. Before a drop layer the score stage rates the tokens that are still
in; ``select_tokens`` keeps, per sample, the quota of real tokens with the highest scores plus the protected
ones; the drop stage gathers them. Every later layer runs on the kept tokens only, with the prompt's causal
mask restricted to them (rows and columns gathered), and writes its keys and values into the kept tokens'
own slots; ``cache.dropped[layer]`` marks the other prompt slots so that decoding never attends to them.
"""

from __future__ import annotations

import torch

from .forward import KVCache, attention_masks

__all__ = ["drop_prefill", "keep_quota", "select_tokens"]


def keep_quota(real: torch.Tensor, keep: float) -> torch.Tensor:
    """How many of its ``real [batch]`` tokens each row keeps: ``ceil(real * keep)``, at least 1. In float64:
    in float32, 100 * 0.6 rounds to 60.000002 and would keep 61."""
    return torch.ceil(real.double() * keep - 1e-9).long().clamp(min=1)


def select_tokens(
    scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor, quota: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[batch, n]`` (ascending) of the tokens to keep, and whether each kept token counts
    (``valid``): per row, the protected tokens and the ``quota[row]`` best-scoring real tokens. Rows that
    keep fewer than ``n`` carry their lowest-ranked extra tokens as invalid (masked) passengers."""
    s = scores.float().masked_fill(~valid, float("-inf"))
    s = s.masked_fill(protected & valid, float("inf"))
    quota = torch.maximum(quota, (protected & valid).sum(1))
    n = int(quota.max())
    # a stable sort: equal scores go to the earlier token, whatever the batch around the row
    values, indices = torch.sort(s, dim=-1, descending=True, stable=True)
    values, indices = values[:, :n], indices[:, :n]
    rank_ok = torch.arange(n)[None, :] < quota[:, None]
    keep_valid = rank_ok & (values > float("-inf"))
    idx, perm = torch.sort(indices, dim=-1)
    return idx, keep_valid.gather(1, perm)


def drop_prefill(program, cache: KVCache, input_ids, positions, key_valid, stats=None) -> torch.Tensor:
    """Prefill ``input_ids [batch, prompt]`` through a TokenDrop Program; returns the last position's
    logits. ``key_valid [batch, prompt]`` marks real tokens (left padding)."""
    from .vocab import head_logits

    policy = program.plan.policy["token_drop"]
    batch, n = input_ids.shape
    hidden, cos, sin = program.embed.graph(input_ids, positions)
    full = attention_masks(key_valid, 0, n, program.windows, hidden.dtype)
    slots = torch.arange(n).expand(batch, n)  # the slot of each token still in
    valid = key_valid.clone()
    real = key_valid.sum(1)
    special = torch.isin(input_ids, torch.tensor(policy["special"], dtype=input_ids.dtype))
    protect = policy["protect_last"]
    dropped = None
    kept_counts = {}
    for stage in program.layers:
        i = stage.layer
        window = stage.attrs.get("sliding_window")
        if slots.shape[1] == n:
            mask = full[window]
        else:
            mask = _restrict(full[window], slots, valid)
        if i in program.drops:
            score_stage, drop_stage = program.drops[i]
            empty = cache.past(i)
            scores = score_stage.graph(hidden, cos, sin, mask, *empty)[0]
            quota = keep_quota(real, score_stage.attrs["keep"])
            protected = special.gather(1, slots) | (slots >= n - protect)
            idx, valid = select_tokens(scores, valid, protected, quota)
            hidden, cos, sin = drop_stage.graph(hidden, cos, sin, idx)
            slots = slots.gather(1, idx)
            dropped = torch.ones(batch, n, dtype=torch.bool)
            dropped.scatter_(1, slots, ~valid)  # kept passengers stay dropped
            dropped[~key_valid] = False  # padding is masked anyway
            kept_counts[i] = valid.sum(1).tolist()
            mask = _restrict(full[window], slots, valid)
        hidden, k, v = stage.graph(hidden, cos, sin, mask, *cache.past(i))
        if dropped is None:
            cache.write(i, k, v)
        else:
            cache.write_slots(i, k, v, slots, valid, n)
            cache.dropped[i] = dropped
    if stats is not None:
        stats["kept_tokens"] = kept_counts
    return head_logits(program, hidden[:, -1:], stats)[:, -1]


def _restrict(mask: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The prompt mask ``[batch, 1, n, n]`` for the tokens at ``slots [batch, m]`` only (queries and keys).
    Tokens that do not count (``valid`` False: padding, passengers) are masked as keys and see nothing as
    queries, like padding."""
    m = slots.shape[1]
    rows = mask.gather(2, slots[:, None, :, None].expand(-1, 1, m, mask.shape[3]))
    out = rows.gather(3, slots[:, None, None, :].expand(-1, 1, m, m))
    hidden = ~valid[:, None, None, :] | ~valid[:, None, :, None]
    return out.masked_fill(hidden, torch.finfo(mask.dtype).min)
