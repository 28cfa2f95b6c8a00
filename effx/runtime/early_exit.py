"""Decoding with exit stages: lossy early exit with deferred KV.

Lossy early exit (FREE's synchronized parallel decoding). A decode step runs layers until every row of the
batch has passed an exit's threshold (each row takes the token of the first exit it passed; the batch stops
at the deepest such exit). The layers a token skipped have no keys and values for it yet: its hidden state
is kept, and the next token that goes deeper carries it along (a multi-token step at those layers), so every
cache entry is computed from the exact hidden state, as in the dense model; no token ever attends to a
missing or approximate entry. Layers may therefore be filled to different lengths (``KVCache.lengths``).
With ``kv="copy"`` (CALM's state copying, a backend capability) the skipped layers' entries are projected
from the exit's hidden state at once instead.

Self-speculative decoding (LayerSkip) is a draft source of the shared verifier: see
:class:`effx.runtime.speculative.ExitDraft`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from ..arrays import Array
from .backend import KV_COPY
from .forward import KVCache, MaskCache, as_backend
from .stats import DecodeStats
from .vocab import exit_logits, head_logits, select_vocab

if TYPE_CHECKING:
    from ..plan import EarlyExitPolicy
    from .forward import BackendLike

__all__ = ["ExitDecoder", "lossy_decoder"]


def lossy_decoder(
    backend: BackendLike, cache: KVCache, policy: EarlyExitPolicy, stats: DecodeStats | None
) -> ExitDecoder | None:
    """EarlyExit's decoder hook (``effx.techniques.early_exit``): lossy exits for a plan that decodes
    lossily, None for another."""
    backend = as_backend(backend)
    if backend.plan.decode_mode != "lossy":
        return None
    if stats is not None:
        stats.start_exits()
    return ExitDecoder(backend, cache, copy=policy.kv == "copy", stats=stats)


class ExitDecoder:
    """Lossy early exit over a plan with exit stages. By default the skipped layers' KV are computed later
    and exactly (deferred); with ``copy=True`` they are projected from the exit hidden state at once (CALM)."""

    def __init__(
        self, backend: BackendLike, cache: KVCache, *, copy: bool = False, stats: DecodeStats | None = None
    ) -> None:
        self.backend = as_backend(backend)
        self.cache = cache
        self.stats = stats
        self.copy = copy
        if copy:
            self.backend.require(KV_COPY)
        # slot -> (depth, hidden, cos, sin): tokens whose deeper layers are still to be computed
        self.pending: dict[int, tuple[int, Array, Array, Array]] = {}

    def decode(self, token: Array, position: Array, masks: MaskCache) -> Array:
        """One step of the decode loop: :meth:`step`, its exit depths counted in the statistics; returns the
        logits."""
        logits, depth = self.step(token, position, masks)
        if self.stats is not None:
            self.stats.count_exit([int(d) for d in depth])
        return logits

    def step(self, token: Array, position: Array, masks: MaskCache) -> tuple[Array, Array]:
        """One new token per row. Returns the logits each row exits with ``[batch, vocab]`` and the number
        of layers each row's token went through ``[batch]``."""
        backend, cache = self.backend, self.cache
        plan, xp = backend.plan, backend.xp
        exits = plan.exits
        layers = plan.layers
        slot = cache.lengths[0]
        hidden, cos, sin = backend.run(plan.embed, token, position)
        prev = hidden
        start = slot  # the buffer holds slots start..slot, as input to the current layer
        batch = token.shape[0]
        decided = xp.zeros(batch, dtype=xp.bool)
        depth = xp.full((batch,), plan.model.num_layers, dtype=xp.int64)
        chosen = None
        ids = None  # the token ids a pruned exit scores (VocabReduce where="exits")
        prev_logits = None
        n = 0
        # plan.layers are layer stages: each has its layer (the casts below)
        while n < len(layers):
            i = cast(int, layers[n].layer)
            first = cache.lengths[i]
            if first < start:  # tokens that stopped at this depth join the step here
                hs, cs, ss = [], [], []
                for s in range(first, start):
                    d, h, c, si = self.pending.pop(s)
                    if d != i:  # an invariant of the per-layer fill lengths; -O must not remove it
                        raise RuntimeError(
                            f"KV bookkeeping broken: slot {s} pending at depth {d}, expected {i}"
                        )
                    hs.append(h)
                    cs.append(c)
                    ss.append(si)
                hidden = xp.concat(hs + [hidden], axis=1)
                cos = xp.concat(cs + [cos], axis=1)
                sin = xp.concat(ss + [sin], axis=1)
                start = first
            # the layers up to the next exit, or up to the next layer filled to another length (where
            # pending tokens join), run as one call: a backend may run them as one fused segment
            end = n + 1
            while end < len(layers) and layers[end - 1].layer not in exits:
                if cache.lengths[cast(int, layers[end].layer)] != first:
                    break
                end += 1
            hidden = backend.run_layers(cache, layers[n:end], hidden, cos, sin, masks)
            n = end
            i = cast(int, layers[n - 1].layer)
            ex = exits.get(i)
            if ex is None:
                continue
            last = hidden[:, -1:]
            ids = select_vocab(prev_logits, ex, ids) if ex.attrs.get("vocab") == "pruned" else None
            logits, conf = exit_logits(backend, ex, last, prev, ids)
            prev, prev_logits = last, logits[:, -1]
            fire = (conf[:, -1] >= ex.attrs["threshold"]) & ~decided
            if bool(xp.any(fire)):
                chosen = logits[:, -1] if chosen is None else xp.where(fire[:, None], logits[:, -1], chosen)
                depth = xp.where(fire, xp.asarray(i + 1, dtype=xp.int64), depth)
                decided = decided | fire
            if bool(xp.all(decided)):
                if self.copy:  # CALM state copying: no pending tokens, approximate entries
                    for deeper in layers[n:]:
                        k, v = backend.project_kv(deeper, hidden, cos, sin)
                        cache.write(cast(int, deeper.layer), k, v)
                    return chosen, depth
                for j in range(hidden.shape[1]):
                    self.pending[start + j] = (
                        i + 1,
                        hidden[:, j : j + 1],
                        cos[:, j : j + 1],
                        sin[:, j : j + 1],
                    )
                return chosen, depth
        logits = head_logits(backend, hidden[:, -1:], self.stats)[:, -1]
        if chosen is None:
            return logits, depth
        return xp.where(decided[:, None], chosen, logits), depth
