"""Decode loops over two models that share a vocabulary: a small one proposes tokens, a large one decides.

Written once for every backend (torch Programs, ONNX artifacts), on the backend's arrays.

Both models fill their own KV cache over the same slots: the (left-padded) prompt, then one slot per output
token, so slot ``s`` holds the same token in both caches and one ``key_valid`` mask and one table of
positions serve both. Each model's side (:class:`ModelState`) knows how many slots it has seen and keeps the
logits that predict the next one. A model that is behind catches up by running once over the tokens it has
not seen, ``tokens[:, seen:slot]``: a multi-token step on its own cache, the same computation as a prefill
continued from the cache. Nothing is ever recomputed from scratch.

Gated mode (the entropy-gated cascade; BiLD's fallback). The small model proposes every token. Where the gate
fires on its distribution (high entropy, low top probability), the large model decides that token: it
catches up on the tokens emitted since it last ran (one batched forward) and its greedy choice replaces the
small model's. The small model then reads the emitted token from the output, so after an override it sees
the large model's token, never its own rejected proposal. In a batch the gate is per row: rows whose gate
did not fire keep the small model's token. The large model runs when any row needs it, and then over every
row: the cache is one tensor per layer with one fill length for the whole batch, so a row cannot lag behind
the others, and each row's tokens must be in the cache for that row's next fire anyway; rows that did not
fire simply discard its prediction. The large model's cost therefore follows the number of steps at which
any row fires, not the number of fired tokens.

Verified mode (speculative decoding) runs on the shared verifier (:mod:`effx.runtime.speculative`), the
small model as its draft source (:class:`ModelDraft`): the small model drafts up to ``n`` tokens greedily
on its own cache over the verifier's slots; the large model runs once over the last emitted token and the
drafts and its greedy choices decide: each row keeps its drafts while they agree, then the large model's
token (its correction at the first disagreement, or the token after the last draft when all agree). Both
caches forget rejected slots; in a batch each row keeps its own prefix (rows that accepted fewer leave holes
in both caches, the same ones). Every emitted token is the large model's greedy choice given the tokens
before it, so the output is the large model's greedy output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from ..arrays import Array, namespace
from .backend import Backend, needed_capabilities
from .forward import as_backend, positions_from_mask, run_step
from .loop import Output, prefill
from .loop import decode as loop_decode
from .sampling import Sampler
from .speculative import Draft, DraftSource, Speculation
from .stats import DecodeStats, StatsArg, collecting

if TYPE_CHECKING:
    from .forward import BackendLike

__all__ = ["ModelDraft", "ModelState", "decode", "gated_decode", "next_draft_length"]

Gate: TypeAlias = Callable[[Array], Array]  # logits [batch, vocab] -> fires [batch] (bool); effx.gates


class ModelState:
    """One model's side of a cascade (a backend, or a torch Program): its KV cache, the slots it has seen,
    and the logits for the next.

    ``positions [batch, capacity]`` and ``key_valid [batch, capacity]`` cover every slot of the run and are
    shared by both models. ``stats`` (or None) receives what the model's own runtime reports (reduced-head
    fallbacks, kept prompt tokens, core neurons).
    """

    def __init__(
        self, backend: BackendLike, positions: Array, key_valid: Array, stats: DecodeStats | None = None
    ) -> None:
        self.backend = as_backend(backend)
        self.positions = positions
        self.key_valid = key_valid
        self.cache = self.backend.new_cache(key_valid.shape[0], key_valid.shape[1])
        self.seen = 0
        self.logits: Array | None = None  # [batch, vocab], predicts slot ``seen``
        self.stats = stats
        self.passes = 0  # forward passes after the prefill
        self.positions_run = 0  # token positions those passes ran over (per row)

    def prefill(self, input_ids: Array) -> Array:
        """Run the prompt with the plan's own prefill (``effx.runtime.loop.prefill``: TokenDrop, per-prompt
        core neurons, whose sliced backend decodes from then on, or dense)."""
        n = input_ids.shape[1]
        positions, valid = self.positions[:, :n], self.key_valid[:, :n]
        logits, self.backend = prefill(self.backend, self.cache, input_ids, positions, valid, self.stats)
        self.seen, self.logits = n, logits
        return logits

    def feed(self, tokens: Array, *, every: bool = False) -> Array:
        """Run ``tokens [batch, q]`` (the tokens of slots ``seen .. seen+q-1``) in one step on the cache.

        Returns the logits that predict slot ``seen + q`` (``[batch, vocab]``), or with ``every`` those of
        each new slot (``[batch, q, vocab]``, position ``j`` predicting slot ``seen + j + 1``).
        """
        start, end = self.seen, self.seen + tokens.shape[1]
        logits = run_step(
            self.backend,
            self.cache,
            tokens,
            self.positions[:, start:end],
            self.key_valid[:, :end],
            last_only=not every,
            stats=self.stats,
        )
        self.seen = end
        self.logits = logits[:, -1] if every else logits
        self.passes += 1
        self.positions_run += end - start
        return logits

    def logits_for(self, tokens: Array, slot: int) -> Array | None:
        """The logits predicting ``slot``: first catching up on ``tokens[:, seen:slot]`` (the output so far)
        in one step if this model has not seen them."""
        if self.seen > slot:
            raise RuntimeError(
                f"cascade bookkeeping broken: model has seen {self.seen} slots, asked for {slot}"
            )
        if self.seen < slot:
            self.feed(tokens[:, self.seen : slot])
        return self.logits

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on (rejected drafts); the kept logits no longer apply."""
        if length < self.seen:
            self.cache.truncate(length)
            self.seen = length
            self.logits = None


def _shares(stats: DecodeStats) -> None:
    small, large = stats.small_tokens or 0, stats.large_tokens or 0
    produced = small + large
    stats.set(
        small_share=small / produced if produced else 0.0, large_share=large / produced if produced else 0.0
    )


def _rows(rows: Array) -> int:
    xp = namespace(rows)
    return int(xp.sum(xp.astype(rows, xp.int64)))


def gated_decode(
    small: ModelState, large: ModelState, out: Output, fires: Gate, stats: DecodeStats | None
) -> None:
    """Emit tokens into ``out`` (an ``effx.runtime.generate`` output buffer) until it is done: the small
    model's greedy token, or, for the rows where ``fires`` says so, the large model's. Both models must have
    run their prefill."""
    xp = small.backend.xp
    while not out.done:
        cur = out.length
        s_logits = small.logits_for(out.tokens, cur)
        token = xp.argmax(xp.astype(s_logits, xp.float32), axis=-1)
        active = ~out.finished
        fire = fires(s_logits) & active
        if bool(xp.any(fire)):
            caught_up = cur - large.seen
            l_logits = large.logits_for(out.tokens, cur)
            l_token = xp.argmax(xp.astype(l_logits, xp.float32), axis=-1)
            if stats is not None:
                stats.count(
                    large_steps=1, catch_up_tokens=caught_up, overridden=_rows(fire & (l_token != token))
                )
            token = xp.where(fire, l_token, token)
        if stats is not None:
            stats.count(large_tokens=_rows(fire), small_tokens=_rows(active & ~fire))
        out.emit(token)


def next_draft_length(draft: int, drafted: int, accepted: int, max_draft: int) -> int:
    """Adapt the draft length to the last round: one longer when every draft was accepted, one shorter
    when one was rejected (within ``[1, max_draft]``)."""
    if accepted >= drafted:
        return min(max_draft, draft + 1)
    return max(1, draft - 1)


class ModelDraft(DraftSource):
    """Verified mode's drafts: the small model's greedy tokens, on its own cache over the verifier's slots
    (the same slots, holes and positions as the large model's), up to ``draft`` tokens; with ``adaptive``
    the length follows each round within ``[1, draft]`` (the shortest accepted prefix among the rows that
    drafted); a draft ends early at a token where ``fires`` says the small model is unsure of it."""

    name = "model"

    def __init__(
        self,
        backend: BackendLike,
        draft: int,
        *,
        adaptive: bool,
        fires: Gate | None,
        stats: DecodeStats | None,
    ) -> None:
        self.backend = as_backend(backend)
        self.draft, self.length, self.adaptive, self.fires, self.stats = draft, draft, adaptive, fires, stats
        self.passes = 0  # forward passes after the prefill
        self.positions_run = 0  # token positions those passes ran over (per row)

    def start(self, spec: Speculation) -> None:
        self.spec = spec
        p = spec.prompt_len
        self.cache = self.backend.new_cache(spec.batch, spec.cache.capacity)
        ids, positions, valid = spec.slot_tokens[:, :p], spec.slot_pos[:, :p], spec.key_valid[:, :p]
        _, self.backend = prefill(self.backend, self.cache, ids, positions, valid, self.stats)
        self.seen = p

    def _feed(self, spec: Speculation, end: int) -> Array:
        """Run the slots ``seen .. end-1`` (the verifier's tokens there) in one step; the logits of the last."""
        logits = run_step(
            self.backend,
            self.cache,
            spec.slot_tokens[:, self.seen : end],
            spec.slot_pos[:, self.seen : end],
            spec.key_valid[:, :end],
            stats=self.stats,
            key_pos=spec.slot_pos[:, :end],
        )
        self.passes += 1
        self.positions_run += end - self.seen
        self.seen = end
        return logits

    def _rewind(self, spec: Speculation) -> None:
        if self.seen > spec.length:  # slots the verifier rejected
            self.cache.truncate(spec.length)
            self.seen = spec.length

    def propose(self, spec: Speculation, n: int) -> Draft | None:
        xp = spec.xp
        self._rewind(spec)
        start, n = spec.length, min(n, self.length)
        active = spec.active
        rows = xp.asarray(active)
        spec.place(start, spec.last[:, None], spec.pos[:, None])
        logits = self._feed(spec, start + 1)  # catching up on what it has not seen, then the last token
        drafts: list[Array] = []
        for j in range(n):
            if j:
                spec.place(start + j, drafts[-1][:, None], spec.pos[:, None] + j)
                logits = self._feed(spec, start + j + 1)
            drafts.append(xp.argmax(xp.astype(logits, xp.float32), axis=-1))
            if self.fires is not None and bool(xp.any(self.fires(logits) & rows)):
                break
        m = len(drafts)
        return Draft(xp.stack(drafts, axis=1), [m if a else 0 for a in active])

    def verified(self, spec: Speculation, counts: list[int], accepted: list[int]) -> None:
        if self.adaptive:
            drafted = [(c, a) for c, a in zip(counts, accepted, strict=True) if c]
            m, k = max(c for c, _ in drafted), min(a for _, a in drafted)
            self.length = next_draft_length(self.length, m, k, self.draft)

    def sync(self, spec: Speculation) -> None:
        self._rewind(spec)
        if self.seen < spec.length:
            self._feed(spec, spec.length)

    def compacted(self, spec: Speculation, start: int, index: Array) -> None:
        self.cache.compact(start, index)
        self.seen = spec.length


def decode(
    small: BackendLike,
    large: BackendLike,
    input_ids: Array,
    attention_mask: Array,
    *,
    mode: str,
    max_new: int,
    eos: list[int],
    pad: int,
    fires: Gate | None,
    draft: int = 4,
    adaptive: bool = True,
    stats: StatsArg = None,
    streamer: Any = None,
    on_token: Callable[[Array], object] | None = None,
    bar: Any = None,
) -> tuple[Array, ModelState | ModelDraft, ModelState | Backend]:
    """Run the cascade of ``small`` and ``large`` (backends, or torch Programs) on checked inputs
    (``input_ids [batch, prompt]`` int64, left-padded ``attention_mask``); ``mode`` is ``"gated"`` or
    ``"verified"``.

    Returns the output ``[batch, prompt + new]`` (finished rows padded with ``pad``) and both models' states:
    in gated mode their :class:`ModelState`, whose caches hold the slots each model has seen; in verified mode
    the small model's :class:`ModelDraft` and the large backend (the rounds run on the shared verifier,
    :mod:`effx.runtime.speculative`). ``stats`` (a DecodeStats, a dict to fill, or None) receives ``small_tokens`` and
    ``large_tokens`` (tokens each model decided, over unfinished rows) and their shares ``small_share`` /
    ``large_share``, ``small_passes``/``large_passes`` and ``small_positions``/``large_positions`` (forward
    passes after the prefill, and the token positions they ran over), in gated mode ``large_steps`` (steps
    where some row fired), ``catch_up_tokens`` and ``overridden`` (fired tokens where the large model chose
    differently), in verified mode ``drafted``, ``accepted``, ``rounds`` and ``draft_lengths`` (per round), ``steps`` and
    ``compactions`` (see :class:`effx.runtime.speculative.Speculation`);
    ``small``/``large`` hold what each model's own runtime reports.
    """
    small, large = as_backend(small), as_backend(large)
    with collecting(stats) as typed:
        for backend in (small, large):  # before anything runs
            for capability in needed_capabilities(backend.plan):
                backend.require(capability)
        if typed is not None:
            typed.set(small_tokens=0, large_tokens=0, small=DecodeStats(), large=DecodeStats())
            if mode == "gated":
                typed.set(large_steps=0, catch_up_tokens=0, overridden=0)
        if mode == "verified":
            source = ModelDraft(
                small, draft, adaptive=adaptive, fires=fires, stats=None if typed is None else typed.small
            )
            inner = None if typed is None else DecodeStats()
            tokens = loop_decode(
                large, input_ids, attention_mask, max_new=max_new, eos=eos, pad=pad, sampler=Sampler(),
                streamer=streamer, on_token=on_token, bar=bar, stats=inner, sources=[source],
            )  # fmt: skip
            if typed is not None and inner is not None:
                _verified_stats(typed, inner, source, batch=input_ids.shape[0])
            return tokens, source, large
        return _gated(
            small, large, input_ids, attention_mask, cast(Gate, fires), typed,
            max_new=max_new, eos=eos, pad=pad, streamer=streamer, on_token=on_token, bar=bar,
        )  # fmt: skip


def _verified_stats(typed: DecodeStats, inner: DecodeStats, source: ModelDraft, batch: int) -> None:
    """The cascade's stats of a verified run: the verifier's rounds (``inner``, what the shared loop
    reported) are the cascade's, the small model's passes are its drafts' (``source``), and the rest of
    ``inner`` is what the large model's runtime reported."""
    accepted, steps = inner.accepted or 0, inner.steps or 0
    emitted = batch + (inner.emitted or 0)  # the first token of every row, then the rounds'
    typed.set(
        large_positions=inner.verified_positions,
        drafted=inner.drafted,
        accepted=accepted,
        rounds=inner.rounds,
        steps=steps,
        draft_lengths=inner.draft_lengths,
        compactions=inner.compactions,
        large=dataclasses.replace(
            inner,
            drafted=None,
            accepted=None,
            rounds=None,
            steps=None,
            verified_positions=None,
            emitted=None,
            draft_lengths=None,
            sources=None,
            compactions=None,
        ),
        small_tokens=accepted,
        large_tokens=emitted - accepted,
        small_passes=source.passes,
        large_passes=steps,
        small_positions=source.positions_run,
    )
    _shares(typed)


def _gated(
    small: Backend,
    large: Backend,
    input_ids: Array,
    attention_mask: Array,
    fires: Gate,
    typed: DecodeStats | None,
    *,
    max_new: int,
    eos: list[int],
    pad: int,
    streamer: Any,
    on_token: Callable[[Array], object] | None,
    bar: Any,
) -> tuple[Array, ModelState, ModelState]:
    """Gated mode: both models prefill the prompt, then :func:`gated_decode` runs the steps; returns the
    output and both models' states (their caches hold the slots each has seen)."""
    xp = large.xp
    batch = input_ids.shape[0]
    key_valid = xp.concat(
        [xp.astype(attention_mask, xp.bool), xp.ones((batch, max_new), dtype=xp.bool)], axis=1
    )
    positions = positions_from_mask(key_valid)
    if streamer is not None:
        streamer.put(input_ids)
    out = Output(input_ids, max_new, eos, pad, streamer, on_token, bar)
    with large.compute():
        s = ModelState(small, positions, key_valid, None if typed is None else typed.small)
        lg = ModelState(large, positions, key_valid, None if typed is None else typed.large)
        s.prefill(input_ids)
        lg.prefill(input_ids)
        gated_decode(s, lg, out, fires, typed)
    if typed is not None:
        typed.set(
            small_passes=s.passes,
            large_passes=lg.passes,
            small_positions=s.positions_run,
            large_positions=lg.positions_run,
        )
        _shares(typed)
    return out.finish(), s, lg
