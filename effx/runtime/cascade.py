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

Verified mode (speculative decoding). The small model drafts up to ``n`` tokens greedily; the large model
runs once over the last emitted token and the drafts and its greedy choices decide: drafts are kept while
they agree, then the large model's token follows (its correction at the first disagreement, or the token
after the last draft when all agree). Both caches forget the slots of rejected drafts (``KVCache.truncate``).
In a batch, the round keeps the shortest agreeing prefix among unfinished rows. Every emitted token is the
large model's greedy choice given the tokens before it, so the output is the large model's greedy output.
"""

from __future__ import annotations

from collections.abc import Callable

from ..arrays import namespace
from .backend import needed_capabilities
from .forward import as_backend, positions_from_mask, run_step
from .loop import Output, prefill

__all__ = ["ModelState", "decode", "gated_decode", "next_draft_length", "verified_decode"]

Gate = Callable  # logits [batch, vocab] -> fires [batch] (bool); effx.gates


class ModelState:
    """One model's side of a cascade (a backend, or a torch Program): its KV cache, the slots it has seen,
    and the logits for the next.

    ``positions [batch, capacity]`` and ``key_valid [batch, capacity]`` cover every slot of the run and are
    shared by both models. ``stats`` (or None) receives what the model's own runtime reports (reduced-head
    fallbacks, kept prompt tokens, core neurons).
    """

    def __init__(self, backend, positions, key_valid, stats: dict | None = None):
        self.backend = as_backend(backend)
        self.positions = positions
        self.key_valid = key_valid
        self.cache = self.backend.new_cache(key_valid.shape[0], key_valid.shape[1])
        self.seen = 0
        self.logits = None  # [batch, vocab], predicts slot ``seen``
        self.stats = stats
        self.passes = 0  # forward passes after the prefill
        self.positions_run = 0  # token positions those passes ran over (per row)

    def prefill(self, input_ids):
        """Run the prompt with the plan's own prefill (``effx.runtime.loop.prefill``: TokenDrop, per-prompt
        core neurons, whose sliced backend decodes from then on, or dense)."""
        n = input_ids.shape[1]
        positions, valid = self.positions[:, :n], self.key_valid[:, :n]
        logits, self.backend = prefill(self.backend, self.cache, input_ids, positions, valid, self.stats)
        self.seen, self.logits = n, logits
        return logits

    def feed(self, tokens, *, every: bool = False):
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

    def logits_for(self, tokens, slot: int):
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


def _count(stats: dict | None, key: str, rows) -> None:
    if stats is not None:
        xp = namespace(rows)
        stats[key] += int(xp.sum(xp.astype(rows, xp.int64)))


def gated_decode(small: ModelState, large: ModelState, out, fires: Gate, stats: dict | None) -> None:
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
                stats["large_steps"] += 1
                stats["catch_up_tokens"] += caught_up
            _count(stats, "overridden", fire & (l_token != token))
            token = xp.where(fire, l_token, token)
        _count(stats, "large_tokens", fire)
        _count(stats, "small_tokens", active & ~fire)
        out.emit(token)


def next_draft_length(draft: int, drafted: int, accepted: int, max_draft: int) -> int:
    """Adapt the draft length to the last round: one longer when every draft was accepted, one shorter
    when one was rejected (within ``[1, max_draft]``)."""
    if accepted >= drafted:
        return min(max_draft, draft + 1)
    return max(1, draft - 1)


def verified_decode(
    small: ModelState,
    large: ModelState,
    out,
    *,
    draft: int,
    adaptive: bool,
    fires: Gate | None,
    stats: dict | None,
) -> None:
    """Speculative decoding until ``out`` is done. Both models have run their prefill and the large model's
    greedy first token is already emitted. Drafts are ``draft`` tokens long; with ``adaptive`` they start
    there and follow the acceptance of each round within ``[1, draft]``. A draft ends early at a token where
    ``fires`` (if given) says the small model is unsure of it."""
    xp = small.backend.xp
    length = draft
    while not out.done:
        cur = out.length
        active = ~out.finished
        n = min(length, out.remaining)
        drafts = []
        logits = small.logits_for(out.tokens, cur)
        for j in range(n):
            if j:
                logits = small.feed(drafts[-1][:, None])
            drafts.append(xp.argmax(xp.astype(logits, xp.float32), axis=-1))
            if fires is not None and bool(xp.any(fires(logits) & active)):
                break
        m = len(drafts)
        proposed = xp.stack(drafts, axis=1)  # [batch, m], slots cur .. cur+m-1
        if large.seen != cur - 1:
            raise RuntimeError(
                f"cascade bookkeeping broken: large model at slot {large.seen}, expected {cur - 1}"
            )
        verify = large.feed(xp.concat([out.tokens[:, cur - 1 : cur], proposed], axis=1), every=True)
        verified = xp.argmax(xp.astype(verify, xp.float32), axis=-1)  # [batch, m+1], predicting cur .. cur+m
        agree = xp.sum(xp.cumulative_prod(xp.astype(proposed == verified[:, :m], xp.int64), axis=1), axis=1)
        agree = xp.where(active, agree, xp.asarray(m, dtype=agree.dtype))  # finished rows hold no one back
        k = int(xp.min(agree))
        for j in range(k):
            was = ~out.finished
            out.emit(proposed[:, j])
            _count(stats, "small_tokens", was)
            if out.done:
                break
        if not out.done:
            was = ~out.finished
            out.emit(verified[:, k])
            _count(stats, "large_tokens", was)
        # both caches keep slot cur-1 (the token before the drafts) and the accepted drafts d_1..d_k
        large.truncate(cur + k)
        small.truncate(cur + k)
        if stats is not None:
            stats["drafted"] += m
            stats["accepted"] += k
            stats["rounds"] += 1
            stats["draft_lengths"].append(m)
        if adaptive:
            length = next_draft_length(length, m, k, draft)


def decode(
    small,
    large,
    input_ids,
    attention_mask,
    *,
    mode: str,
    max_new: int,
    eos: list[int],
    pad: int,
    fires: Gate | None,
    draft: int = 4,
    adaptive: bool = True,
    stats: dict | None = None,
    streamer=None,
    on_token: Callable | None = None,
    bar=None,
) -> tuple:
    """Run the cascade of ``small`` and ``large`` (backends, or torch Programs) on checked inputs
    (``input_ids [batch, prompt]`` int64, left-padded ``attention_mask``); ``mode`` is ``"gated"`` or
    ``"verified"``.

    Returns the output ``[batch, prompt + new]`` (finished rows padded with ``pad``) and both models' states,
    whose caches hold the slots each model has seen. ``stats`` (a dict, or None) receives ``small_tokens`` and
    ``large_tokens`` (tokens each model decided, over unfinished rows) and their shares ``small_share`` /
    ``large_share``, ``small_passes``/``large_passes`` and ``small_positions``/``large_positions`` (forward
    passes after the prefill, and the token positions they ran over), in gated mode ``large_steps`` (steps
    where some row fired), ``catch_up_tokens`` and ``overridden`` (fired tokens where the large model chose
    differently), in verified mode ``drafted``, ``accepted``, ``rounds`` and ``draft_lengths`` (per round);
    ``small``/``large`` hold what each model's own runtime reports.
    """
    small, large = as_backend(small), as_backend(large)
    for backend in (small, large):  # before anything runs
        for capability in needed_capabilities(backend.plan):
            backend.require(capability)
    xp = large.xp
    batch, prompt_len = input_ids.shape
    key_valid = xp.concat(
        [xp.astype(attention_mask, xp.bool), xp.ones((batch, max_new), dtype=xp.bool)], axis=1
    )
    positions = positions_from_mask(key_valid)
    if stats is not None:
        stats.update(small_tokens=0, large_tokens=0, small={}, large={})
        if mode == "gated":
            stats.update(large_steps=0, catch_up_tokens=0, overridden=0)
        else:
            stats.update(drafted=0, accepted=0, rounds=0, draft_lengths=[])
    if streamer is not None:
        streamer.put(input_ids)
    out = Output(input_ids, max_new, eos, pad, streamer, on_token, bar)
    with large.compute():
        s = ModelState(small, positions, key_valid, None if stats is None else stats["small"])
        lg = ModelState(large, positions, key_valid, None if stats is None else stats["large"])
        s.prefill(input_ids)
        lg.prefill(input_ids)
        if mode == "verified":
            out.emit(xp.argmax(xp.astype(lg.logits, xp.float32), axis=-1))
            _count(stats, "large_tokens", xp.ones(batch, dtype=xp.bool))
            verified_decode(s, lg, out, draft=draft, adaptive=adaptive, fires=fires, stats=stats)
        else:
            gated_decode(s, lg, out, fires, stats)
    if stats is not None:
        produced = stats["small_tokens"] + stats["large_tokens"]
        stats.update(
            small_passes=s.passes,
            large_passes=lg.passes,
            small_positions=s.positions_run,
            large_positions=lg.positions_run,
            small_share=stats["small_tokens"] / produced if produced else 0.0,
            large_share=stats["large_tokens"] / produced if produced else 0.0,
        )
    return out.finish(), s, lg
