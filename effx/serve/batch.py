"""The running batch of a continuous-batching engine: one KV cache whose rows are requests that joined at
different times.

The decode loop's cache (:class:`effx.runtime.forward.KVCache`) writes every row's new token to one slot
index, the same for the whole batch, and attention is causal by slot index and masked by ``key_valid``.
A row that joins is prefilled alone (exactly as ``Program.generate`` prefills it), and its keys and values
are copied into a new row of the batch, right-aligned to end at the batch's fill length; the slots before
them are invalid for that row. A row that leaves is dropped from the batch (its slots go with it). When the
cache is full, each row's valid slots are moved, in order, to the right of a shorter cache (the holes left
by joining are closed), as speculative decoding compacts its rows, and where that frees less than half
of it, the cache grows (doubling, up to the model's context: a server's cache is as long as its rows need,
not as the longest context)::

    slots      0 1 2 3 4 5 6          after compaction  0 1 2 3 4
    row a      a a a a a a a <- step                    a a a a a   (... its oldest slots, kept in order)
    row b      . . . b b b b                            . b b b b
    row c      . . . . . c c  (joined at slot 5)        . . . c c

Positions are per row (a row's prompt starts at position 0, as alone), so a row's tokens are the ones it
gets alone, up to floating-point differences of a batched product. ``key_pos`` (each slot's position) is
passed to the attention masks where the plan has a sliding window, which must count positions, not slots.
"""

from __future__ import annotations

from typing import Any

from ..arrays import Array, take_along_axis
from ..runtime.backend import Backend
from ..runtime.forward import KVCache, run_step
from ..runtime.stats import DecodeStats

__all__ = ["Batch", "prefill_row"]


def prefill_row(backend: Backend, prompt: list[int]) -> tuple[Array, KVCache]:
    """Run one prompt alone: ``(logits of its last position [1, vocab], its own cache of len(prompt)
    slots)``, as ``Program.generate`` prefills a batch of one."""
    xp = backend.xp
    n = len(prompt)
    cache = backend.new_cache(1, n, rollback=False)
    ids = xp.asarray([prompt], dtype=xp.int64)
    positions = xp.arange(n, dtype=xp.int64)[None, :]
    logits = run_step(backend, cache, ids, positions, xp.ones((1, n), dtype=xp.bool))
    return logits, cache


class Batch:
    """Rows of one KV cache of ``size`` slots, grown as needed up to ``capacity`` (no row may need more);
    :meth:`join` adds a prefilled row, :meth:`keep` drops the others, :meth:`step` decodes one token for
    every row."""

    def __init__(self, backend: Backend, capacity: int, *, initial: int = 256) -> None:
        self.backend, self.xp, self.capacity = backend, backend.xp, capacity
        self.initial = min(initial, capacity)
        self.windowed = any(w is not None for w in backend.plan.windows)
        self._reset()

    def _reset(self) -> None:
        xp = self.xp
        self.size = self.initial
        self.cache = self.backend.new_cache(0, self.size, rollback=False)
        self.valid: Array = xp.zeros((0, self.size), dtype=xp.bool)  # [rows, slots]
        self.key_pos: Array = xp.zeros((0, self.size), dtype=xp.int64)  # each slot's position
        self.next_pos: Array = xp.zeros((0, 1), dtype=xp.int64)  # the position of each row's next token
        self.length = 0  # slots filled, in every layer and row

    @property
    def rows(self) -> int:
        return int(self.valid.shape[0])

    def _set_length(self, length: int) -> None:
        self.length = length
        self.cache.lengths = [length] * len(self.cache.lengths)

    def _grow(self, slots: int) -> None:
        """Make the cache at least ``slots`` long (doubling, at most ``capacity``)."""
        xp, size = self.xp, self.size
        while size < slots:
            size *= 2
        size = min(size, self.capacity)
        if size == self.size:
            return
        n = size - self.size

        def grown(store: Array, axis: int) -> Array:
            shape = list(store.shape)
            shape[axis] = n
            return xp.concat([store, xp.zeros(tuple(shape), dtype=store.dtype)], axis=axis)

        self.valid, self.key_pos = grown(self.valid, 1), grown(self.key_pos, 1)
        for stores in (self.cache.k, self.cache.v):
            for i, store in enumerate(stores):
                stores[i] = grown(store, 2)
        self.size = self.cache.capacity = size

    def _shift(self, n: int) -> None:
        """Move every row's slots ``n`` to the right (room for a prompt longer than the fill length)."""
        self._grow(self.length + n)
        xp, end = self.xp, self.size - n

        def shifted(store: Array, fill: Any) -> Array:
            pad = xp.full((*store.shape[:-1], n), fill, dtype=store.dtype)
            return xp.concat([pad, store[..., :end]], axis=-1)

        self.valid, self.key_pos = shifted(self.valid, False), shifted(self.key_pos, 0)
        for stores in (self.cache.k, self.cache.v):
            for i, store in enumerate(stores):
                pad = xp.zeros((*store.shape[:2], n, store.shape[3]), dtype=store.dtype)
                stores[i] = xp.concat([pad, store[:, :, :end]], axis=2)
        self._set_length(self.length + n)

    def compact(self) -> None:
        """Close the holes: each row's valid slots, in order, right-aligned to end at the new fill length
        (the most valid slots of any row)."""
        xp, n = self.xp, self.length
        valid = self.valid[:, :n]
        keep = int(xp.max(xp.sum(xp.astype(valid, xp.int64), axis=1)))
        # invalid slots first, then the valid ones in time order; the last `keep` of them per row
        order = xp.argsort(xp.astype(valid, xp.int8), axis=1, stable=True)[:, n - keep :]
        self.cache.compact(0, order)
        for name in ("valid", "key_pos"):
            store = getattr(self, name)
            moved = take_along_axis(xp, store[:, :n], order, axis=1)
            store[:, :keep] = moved
            store[:, keep:] = 0
        self._set_length(keep)

    def join(self, prefilled: KVCache, prompt_len: int) -> None:
        """Add a row prefilled alone (:func:`prefill_row`) as the last row."""
        xp = self.xp
        if self.rows == 0:
            self._reset()
        if self.length < prompt_len:
            self._shift(prompt_len - self.length)
        start, end = self.length - prompt_len, self.length
        for stores, new in ((self.cache.k, prefilled.k), (self.cache.v, prefilled.v)):
            for i, store in enumerate(stores):
                row = xp.zeros((1, *store.shape[1:]), dtype=store.dtype)
                row[:, :, start:end] = new[i][:, :, :prompt_len]
                stores[i] = xp.concat([store, row], axis=0)
        valid = xp.zeros((1, self.size), dtype=xp.bool)
        valid[:, start:end] = True
        key_pos = xp.zeros((1, self.size), dtype=xp.int64)
        key_pos[:, start:end] = xp.arange(prompt_len, dtype=xp.int64)
        self.valid = xp.concat([self.valid, valid], axis=0)
        self.key_pos = xp.concat([self.key_pos, key_pos], axis=0)
        self.next_pos = xp.concat([self.next_pos, xp.full((1, 1), prompt_len, dtype=xp.int64)], axis=0)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order); the others leave with their slots."""
        if len(rows) == self.rows:
            return
        if not rows:
            self._reset()
            return
        xp = self.xp
        index = xp.asarray(rows, dtype=xp.int64)
        for stores in (self.cache.k, self.cache.v):
            for i, store in enumerate(stores):
                stores[i] = xp.take(store, index, axis=0)
        self.valid = xp.take(self.valid, index, axis=0)
        self.key_pos = xp.take(self.key_pos, index, axis=0)
        self.next_pos = xp.take(self.next_pos, index, axis=0)

    def step(self, tokens: list[int], stats: DecodeStats | None = None) -> Array:
        """Decode one token per row (``tokens``, the rows' last ones): logits ``[rows, vocab]``; ``stats``
        receives what the step decided (a reduced head's fallbacks)."""
        xp = self.xp
        if self.length >= self.size:
            self.compact()
            if self.length > self.size // 2:
                self._grow(self.size + 1)
        n = self.length
        self.valid[:, n] = True
        self.key_pos[:, n] = self.next_pos[:, 0]
        ids = xp.asarray(tokens, dtype=xp.int64)[:, None]
        logits = run_step(
            self.backend,
            self.cache,
            ids,
            self.next_pos,
            self.valid[:, : n + 1],
            key_pos=self.key_pos if self.windowed else None,
            stats=stats,
        )
        self.length = n + 1  # run_step filled the cache's layers to n + 1
        self.next_pos = self.next_pos + 1
        return logits
