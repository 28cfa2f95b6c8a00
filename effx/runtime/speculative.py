"""One verifier for every draft source: speculative decoding with the Program's own output, greedy or sampled.

A round: a draft source proposes up to ``n`` tokens per row; the Program runs once over the row's last token
and its drafts (one multi-token step on its own cache) and decides which drafts the row keeps.

* Greedy: a row keeps its drafts while they agree with the Program's choice before them, then takes the
  Program's own token (its correction at the first disagreement, or the token after the last draft when
  every draft agreed). Every emitted token is the Program's greedy choice given the row's tokens before it:
  the output is the dense greedy output, whatever the source proposes.
* Sampling (the run's :class:`~effx.runtime.sampling.Sampler` samples): speculative sampling's rejection
  rule (:mod:`effx.runtime.rejection`) judges the drafts against the sampler's distribution at every
  verified position; a row keeps an accepted prefix and then emits a token drawn from the residual (at the
  rejection) or from the Program's distribution after its last kept draft. A draft's own distribution is
  the source's ``Draft.probs`` when it samples its drafts (the draft branch), else one-hot at the draft
  (lookup, greedy exits, a greedy draft model). Every emitted token is distributed as the Program's
  sampling given the tokens before it: the output is distributed as non-speculative sampling's. Random
  draws come from the run's generator, so a seeded run repeats.

Draft sources (:class:`DraftSource`; a technique declares its own with a ``draft`` hook, see
:mod:`effx.techniques`):

* :class:`LookupDraft` (``prompt-lookup``): the tokens that followed the most recent earlier occurrence of
  the row's last n-gram, in the prompt or in the text generated so far (prompt lookup decoding). No weights;
  a row where nothing matches drafts nothing.
* :class:`ExitDraft` (``EarlyExit(mode="self-speculative")``, LayerSkip): the shallowest exit drafts greedily
  through the first layers, on the Program's own cache; the verifier then runs only the remaining layers over
  the drafted hidden states. Its last draft is not run through the layers (that would cost a shallow step
  for one more verified token), so a round whose drafts all agree ends with the last draft, not a bonus
  token. Sampling, the rule judges all its drafts (the Program's distribution for each of them is there);
  a row that accepts every one ends the round with its last draft, and the next round draws the token
  after it (each token is still drawn as ``p`` given the tokens before it; only the round ends earlier).

* :class:`effx.runtime.cascade.ModelDraft` (``effx.cascade(..., mode="verified")``): a small model's greedy
  tokens, on its own cache over the same slots (it catches up from the verifier's per-slot tokens and
  positions).

Sources are tried in order each round and the first that proposes anything for some row drafts it: with both,
lookup drafts where the text repeats and the exit drafts elsewhere.

Batches. Each row has its own drafts and accepts its own agreeing prefix. All rows share one KV cache with
one fill length, so the round's slots are kept up to the longest accepted prefix; a row that accepted fewer
leaves holes (slots marked invalid in ``key_valid``, never attended to) and its next token goes after them,
at its own position. Rows therefore advance at their own pace: the verifier keeps each row's tokens and emits
columns to the output as every unfinished row has them. When holes would overflow the cache, it is
compacted (each row's valid slots moved to the front of the generated region, in order).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from .. import techniques
from ..arrays import Array, take_along_axis
from ..plan import EarlyExitPolicy, Plan, StageSpec
from ..techniques.draft import Draft, DraftSource
from ..techniques.prompt_lookup import LookupDraft
from .forward import KVCache, MaskCache, as_backend, positions_from_mask
from .pacing import Average, Pacer, width_cost
from .rejection import accept
from .sampling import Sampler
from .stats import DecodeStats
from .vocab import exit_logits, head_logits

if TYPE_CHECKING:
    from .forward import BackendLike
    from .loop import Output

__all__ = [
    "Draft",
    "DraftSource",
    "ExitDraft",
    "LookupDraft",
    "Speculation",
    "capacity",
    "exit_draft",
    "longest_draft",
    "sources_of",
]


class ExitDraft(DraftSource):
    """Self-speculative drafting: the shallowest exit's greedy tokens, one shallow step each, until every
    active row's exit confidence has fallen below the exit's threshold (that token is still drafted) or ``n``
    are drafted."""

    name = "exit"

    def __init__(self, draft: int) -> None:
        self.draft = draft

    def propose(self, spec: Speculation, n: int) -> Draft | None:
        backend, plan, xp = spec.backend, spec.backend.plan, spec.xp
        layer = min(plan.exits)
        ex = plan.exits[layer]
        shallow = [s for s in plan.layers if cast(int, s.layer) <= layer]  # layer stages: each has its layer
        threshold = ex.attrs["threshold"]
        token, pos = spec.last, spec.pos
        confident = list(spec.active)
        counts = [0] * spec.batch
        drafts: list[Array] = []
        hs: list[Array] = []
        cs: list[Array] = []
        ss: list[Array] = []
        for j in range(n):
            slot = spec.length + j
            spec.place(slot, token[:, None], pos[:, None])
            masks = MaskCache(backend, spec.key_valid[:, : slot + 1], backend.dtype, spec.slot_pos)
            hidden, cos, sin = backend.run(plan.embed, token[:, None], pos[:, None])
            prev = hidden
            hidden = backend.run_layers(spec.cache, shallow, hidden, cos, sin, masks)
            logits, conf = exit_logits(backend, ex, hidden, prev, None)
            token = xp.argmax(xp.astype(logits[:, -1], xp.float32), axis=-1)
            drafts.append(token)
            hs.append(hidden)
            cs.append(cos)
            ss.append(sin)
            pos = pos + 1
            sure = [bool(c) for c in (conf[:, -1] >= threshold)]
            for b in range(spec.batch):
                if confident[b]:
                    counts[b] = j + 1
                    confident[b] = sure[b]
            if not any(confident):
                break
        hidden = tuple(xp.concat(parts, axis=1) for parts in (hs, cs, ss))
        return Draft(
            xp.stack(drafts, axis=1),
            counts,
            hidden=cast("tuple[Array, Array, Array]", hidden),  # (hidden, cos, sin)
            through=layer,
            bonus=False,
        )


def exit_draft(policy: EarlyExitPolicy, plan: Plan) -> ExitDraft | None:
    """EarlyExit's draft hook: the shallowest exit drafts when the plan decodes self-speculatively."""
    return ExitDraft(policy.draft) if plan.decode_mode == "self-speculative" else None


def sources_of(plan: Plan) -> list[DraftSource]:
    """The draft sources ``plan`` decodes with, in the order they are tried ([] for no speculation): each
    technique's ``draft`` hook (``effx.techniques``), in registration order."""
    sources: list[DraftSource] = []
    for t, policy in plan.used_techniques:
        if t.draft is not None and policy is not None:
            source = techniques.hook(t.draft)(policy, plan)
            if source is not None:
                sources.append(source)
    return sources


def longest_draft(plan: Plan, sources: Sequence[DraftSource] | None = None) -> int:
    """The most tokens one round drafts with ``sources`` (default: the plan's)."""
    return max((s.draft for s in (sources_of(plan) if sources is None else sources)), default=0)


def capacity(batch: int, prompt_len: int, max_new: int, draft: int) -> int:
    """Cache slots for a speculative run: one row never leaves holes; a batch gets room for some (the
    verifier compacts when they would overflow)."""
    room = max_new + draft + 1
    return prompt_len + (room if batch == 1 else 2 * room)


class Speculation:
    """The state of a speculative run over one backend's cache: per row, its tokens, the last one (emitted,
    not yet in the cache), its position and whether it has finished; per slot, which rows' entries are valid.

    ``key_valid [batch, capacity]`` covers the (left-padded) prompt and every slot after it; ``out`` is the
    loop's output buffer, whose first token has been emitted. ``sampler``: the run's sampling Sampler (None
    decodes greedily), ``rng`` the random source of its draws (``effx.arrays.new_rng``; the loop's
    ``generator``); sources that sample their drafts read both.
    """

    def __init__(
        self,
        backend: BackendLike,
        cache: KVCache,
        out: Output,
        key_valid: Array,
        pos: Array,
        sources: Sequence[DraftSource],
        *,
        draft: int,
        stats: DecodeStats | None,
        features: Array | None = None,
        sampler: Sampler | None = None,
        rng: Any = None,
    ) -> None:
        self.backend = as_backend(backend)
        self.sampler, self.rng = sampler, rng
        self.xp = self.backend.xp
        self.cache, self.out, self.key_valid = cache, out, key_valid
        self.sources, self.draft, self.stats = sources, draft, stats
        self.batch, self.prompt_len = out.tokens.shape[0], out.length - 1
        self.end = out.end
        xp = self.xp
        self.tokens = xp.full((self.batch, self.end), out.pad, dtype=xp.int64)  # each row's own tokens
        self.tokens[:, : out.length] = out.tokens[:, : out.length]
        self.n = [out.length] * self.batch  # tokens of each row (prompt included)
        self.first = [int(v) for v in xp.sum(xp.astype(~key_valid[:, : self.prompt_len], xp.int64), axis=1)]
        # per slot: the token each row has there and its position (a draft model catches up from them)
        capacity = key_valid.shape[1]
        self.slot_tokens = xp.zeros((self.batch, capacity), dtype=xp.int64)
        self.slot_pos = xp.zeros((self.batch, capacity), dtype=xp.int64)
        self.slot_tokens[:, : self.prompt_len] = out.tokens[:, : self.prompt_len]
        self.slot_pos[:, : self.prompt_len] = positions_from_mask(key_valid[:, : self.prompt_len])
        self.finished = [bool(f) for f in out.finished]
        self.eos = {int(t) for t in out.eos}
        self.last = out.tokens[:, out.length - 1]
        self.pos = pos[:, 0]
        self.length = cache.lengths[0]
        # the prompt's last-layer features [batch, prompt, hidden] for sources that read them (None: the
        # prefill did not keep them, e.g. a TokenDrop prefill)
        self.prompt_features = features
        if stats is not None:
            stats.start_speculation([s.name for s in sources])
        for source in sources:
            source.start(self)
        # seconds of a plain decode step, measured on the verify steps (a source may time its drafts
        # against it: its cost in steps)
        self.step_seconds = Average()
        # sources that declare what a draft step costs draft adaptively (effx.runtime.pacing)
        self.width_cost = width_cost(self.backend.plan)
        self.pacers = {
            id(s): Pacer(self.batch, s.draft, s.cost, width_cost=self.width_cost)
            for s in sources
            if s.cost is not None and s.draft > 0
        }

    @property
    def active(self) -> list[bool]:
        # a row the output ended (the caller's stop rule, on columns already emitted) ends here too
        self.finished = [f or bool(o) for f, o in zip(self.finished, self.out.finished, strict=True)]
        return [not f and n < self.end for f, n in zip(self.finished, self.n, strict=True)]

    def row_tokens(self, b: int) -> list[int]:
        """Row ``b``'s tokens so far, prompt (without padding) included."""
        return [int(t) for t in self.tokens[b, self.first[b] : self.n[b]]]

    def place(self, slot: int, tokens: Array, positions: Array) -> None:
        """Slots from ``slot`` on get ``tokens [batch, q]`` at ``positions [batch, q]``: valid in every row
        until a round rejects them."""
        q = tokens.shape[1]
        self.key_valid[:, slot : slot + q] = True
        self.slot_tokens[:, slot : slot + q] = tokens
        self.slot_pos[:, slot : slot + q] = positions

    def run(self) -> None:
        """Rounds until every row has finished; then the output holds every row's tokens."""
        while any(self.active):
            self.round()
        self.flush()

    def round(self) -> None:
        xp, backend, plan = self.xp, self.backend, self.backend.plan
        active = self.active
        n = min(self.draft, max(self.end - m for m, a in zip(self.n, active, strict=True) if a) - 1)
        if self.length + n + 1 > self.cache.capacity:
            self.compact()
            # the row with the most slots may not be the one with the most tokens left: draft only into
            # the room there is (a capacity below ``capacity()``'s, as tests set, would overflow otherwise)
            n = min(n, self.cache.capacity - self.length - 1)
        draft: Draft | None = None
        source: DraftSource | None = None
        if n > 0:
            for source in self.sources:
                limits = self.limits(source, n, active)
                if not any(limits):
                    continue
                draft = source.propose(self, max(limits))
                if draft is not None:
                    draft.counts = [min(c, k) for c, k in zip(draft.counts, limits, strict=True)]
                if draft is not None and any(c for c, a in zip(draft.counts, active, strict=True) if a):
                    break
                draft = None
        if draft is None:
            drafts, counts, bonus = xp.zeros((self.batch, 0), dtype=xp.int64), [0] * self.batch, True
        else:
            drafts, counts, bonus = draft.tokens, draft.counts, draft.bonus
        m = drafts.shape[1]
        width = m + 1 if bonus else m
        inputs = xp.concat([self.last[:, None], drafts], axis=1)[:, :width]
        positions = self.pos[:, None] + xp.arange(width, dtype=xp.int64)[None, :]
        start = self.length
        self.place(start, inputs, positions)
        masks = MaskCache(backend, self.key_valid[:, : start + width], backend.dtype, self.slot_pos)
        if draft is not None and draft.hidden is not None:
            hidden, cos, sin = draft.hidden
            # layer stages: each has its layer
            deep: Sequence[StageSpec] = [s for s in plan.layers if cast(int, s.layer) > draft.through]
        else:
            hidden, cos, sin = backend.run(plan.embed, inputs, positions)
            deep = plan.layers
        began = time.perf_counter()
        hidden = backend.run_layers(self.cache, deep, hidden, cos, sin, masks)
        logits = head_logits(backend, hidden, self.stats)  # [batch, width, vocab]: each predicts slot + 1
        if len(deep) == len(plan.layers):  # a full step: what a plain decode step costs, for the pacers
            self.step_seconds.add((time.perf_counter() - began) / (1 + self.width_cost * (width - 1)))
        probs = None if draft is None else draft.probs
        lead, after = self.judge(logits, drafts, counts, active, probs)
        kept, taken = [0] * self.batch, [0] * self.batch
        drafts_rows = [[int(t) for t in row] for row in drafts] if m else [[] for _ in range(self.batch)]
        for b in range(self.batch):
            if not active[b]:
                continue
            k = lead[b]
            new = drafts_rows[b][:k] + ([after[b]] if k < width else [])
            kept[b] = min(k + 1, width)
            taken[b] = min(k, self.append(b, new))  # drafts emitted (the end or a stop token may cut them)
        if draft is not None:
            cast(DraftSource, source).verified(self, counts, taken)  # the source that proposed the draft
        for every in self.sources:
            every.settled(self, start, kept, hidden)
            pacer = self.pacers.get(id(every))
            if pacer is not None:
                drafted = every is source and draft is not None
                pacer.update(counts if drafted else [0] * self.batch, taken, active)
        self.stats_round(source if draft is not None else None, counts, active, taken, width)
        # keep the slots up to the longest accepted prefix; shorter rows leave holes
        length = start + max(kept)
        for b in range(self.batch):
            if start + kept[b] < length:
                self.key_valid[b, start + kept[b] : length] = False
        self.cache.truncate(length)
        self.length = length
        self.pos = self.pos + xp.asarray(kept, dtype=xp.int64)
        self.last = xp.asarray([self.tokens[b, self.n[b] - 1] for b in range(self.batch)], dtype=xp.int64)
        self.flush()

    def limits(self, source: DraftSource, n: int, active: list[bool]) -> list[int]:
        """How many drafts each row may take from ``source`` this round: ``n``, or what its pacer says pays
        (a source with a ``cost``: :mod:`effx.runtime.pacing`)."""
        pacer = self.pacers.get(id(source))
        if pacer is None:
            return [n if a else 0 for a in active]
        pacer.draft_cost = cast(float, source.cost)  # a source may refine its cost as it runs
        return pacer.lengths(n, active)

    def judge(
        self, logits: Array, drafts: Array, counts: list[int], active: list[bool], probs: Array | None
    ) -> tuple[list[int], list[int]]:
        """Per row: how many of its ``counts`` drafts ``[batch, m]`` it keeps, and the token it emits after
        them, from the verifier's ``logits [batch, width, vocab]`` (width ``m + 1``, or ``m`` when the last
        draft is no input: a row that keeps all ``m`` then emits no token after them, and its entry in the
        second list means nothing). Greedy: the agreeing prefix and the Program's choice after it. Sampling:
        the rejection rule, with ``probs`` (or one-hot drafts) as the draft's distribution."""
        xp = self.xp
        batch, m, width = drafts.shape[0], drafts.shape[1], logits.shape[1]
        if self.sampler is None:
            verified = xp.argmax(xp.astype(logits, xp.float32), axis=-1)  # [batch, width]
            agree = xp.sum(xp.cumulative_prod(xp.astype(drafts == verified[:, :m], xp.int64), axis=1), axis=1)
            lead = [min(int(v), c) for v, c in zip(agree, counts, strict=True)]
            return lead, [int(verified[b, min(lead[b], width - 1)]) for b in range(batch)]
        target = self.sampler.probabilities(logits)  # [batch, width, vocab]
        if width == m:  # no distribution after the last draft: a stand-in, whose draw no row emits
            target = xp.concat([target, target[:, -1:]], axis=1)
        if probs is None:  # certain drafts: one-hot at each
            vocab = xp.arange(target.shape[2], dtype=xp.int64)
            probs = xp.astype(drafts[:, :, None] == vocab[None, None, :], xp.float32)
        judged = [c if a else 0 for c, a in zip(counts, active, strict=True)]
        lead, after = accept(xp, target, probs, drafts, judged, self.rng)
        return lead, [int(t) for t in after]

    def append(self, b: int, new: list[int]) -> int:
        """Row ``b`` emits ``new``, cut at the end of the output and after a stop token; returns how many it
        emitted."""
        new = new[: self.end - self.n[b]]
        for j, t in enumerate(new):
            if t in self.eos:
                new = new[: j + 1]
                self.finished[b] = True
                break
        if new:
            self.tokens[b, self.n[b] : self.n[b] + len(new)] = self.xp.asarray(new, dtype=self.xp.int64)
            self.n[b] += len(new)
            for source in self.sources:
                source.appended(self, b, new)
            if self.stats is not None:
                self.stats.count(emitted=len(new))
        return len(new)

    def flush(self) -> None:
        """Emit the columns every unfinished row has."""
        out = self.out
        while not out.done:
            c = out.length
            if any(not f and n <= c for f, n in zip(self.finished, self.n, strict=True)):
                return
            out.emit(self.tokens[:, c])

    def compact(self) -> None:
        """Move each row's valid slots of the generated region to its front, in order (see KVCache.compact)."""
        xp, p = self.xp, self.prompt_len
        for source in self.sources:
            source.sync(self)
        valid = self.key_valid[:, p : self.length]
        counts = xp.sum(xp.astype(valid, xp.int64), axis=1)
        count = int(xp.max(counts))
        order = xp.argsort(xp.astype(~valid, xp.int8), axis=1, stable=True)[:, :count]
        self.cache.compact(p, order)
        for table in (self.slot_tokens, self.slot_pos):
            table[:, p : p + count] = take_along_axis(xp, table[:, p : self.length], order, axis=1)
        self.key_valid[:, p:] = False
        self.key_valid[:, p : p + count] = xp.arange(count)[None, :] < counts[:, None]
        self.length = p + count
        for source in self.sources:
            source.compacted(self, p, order)
        if self.stats is not None:
            self.stats.count(compactions=1)

    def stats_round(
        self, source: DraftSource | None, counts: list[int], active: list[bool], taken: list[int], width: int
    ) -> None:
        if self.stats is None:
            return
        rows = [b for b, a in enumerate(active) if a]
        drafted = sum(counts[b] for b in rows)
        name = None if source is None else source.name
        per_row = ([counts[b] for b in rows], [taken[b] for b in rows])
        self.stats.count_round(name, drafted, sum(taken), width, max(counts), per_row)
