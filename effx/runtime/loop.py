"""The decode loop: prefill, then tokens over a plan's stages, for every backend.

One loop serves every plan and both backends (:mod:`effx.runtime.torch_backend`, the ONNX Runtime backend
of :mod:`effx.runtime.onnx`): a dense plan decodes a token per step through all layers; one with exit
stages lets tokens leave early (``lossy``, :class:`effx.runtime.early_exit.ExitDecoder`) or drafts and
verifies tokens (``self-speculative``, and prompt lookup: :mod:`effx.runtime.speculative`, greedy or
sampled, a sampled run keeping its distribution); TokenDrop and per-prompt core neurons choose the prefill.
The loop names no technique: it asks each one the plan uses (``effx.techniques``) for its hooks (a draft
source, a prefill, a per-step decoder). A reduced head falls back to the full one per position; sampling is
greedy, or temperature / top-k / top-p. The loop makes each of these decisions once, on the backend's
arrays; ``Program.generate`` and ``OnnxGenerator.generate`` are front ends that check their inputs into the
arguments of :func:`decode`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from .. import techniques
from ..arrays import Array, Namespace, namespace
from ..errors import GenerationInputError
from ..plan import Plan
from .backend import Backend, needed_capabilities
from .forward import KVCache, MaskCache, check_left_padded, positions_from_mask, run_step
from .inputs import check_ids, check_max_new, check_stop, token_id, token_ids
from .sampling import Sampler, TokenSampler
from .speculative import DraftSource, Speculation, capacity, longest_draft, sources_of
from .stats import DecodeStats, StatsArg, collecting

__all__ = ["Output", "as_ids", "check_inputs", "decode", "prefill", "step_decoder", "stop_and_pad"]


def check_inputs(
    xp: Namespace,
    input_ids: Any,
    attention_mask: Any,
    max_new: int,
    max_positions: int,
    *,
    vocab_size: int | None,
    what: str = "the model",
) -> tuple[Array, Array]:
    """``(input_ids, attention_mask)`` as int64 arrays of ``xp``, or a ``GenerationInputError`` that says what
    is wrong with them (the contract of :mod:`effx.runtime.inputs`: integer ids in the vocabulary, a 0/1
    mask; then left padding and the length against ``max_positions``)."""
    ids, mask = check_ids(xp, input_ids, attention_mask, vocab_size)
    prompt_len = ids.shape[1]
    check_left_padded(mask)
    max_new = check_max_new(max_new)
    total = prompt_len + max_new
    if total > max_positions:
        raise GenerationInputError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new}) = {total} exceeds the {max_positions} "
            f"positions of {what}"
        )
    return ids, mask


def as_ids(value: Any) -> list[int]:
    """Token ids as a list: None -> ``[]``, one id -> ``[id]``, a list or tuple -> its ints."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def stop_and_pad(
    plan: Plan, eos_token_id: Any, pad_token_id: Any, vocab_size: int | None = None
) -> tuple[list[int], int]:
    """The stop token ids (``eos_token_id``, else the plan's; ``[]`` never stops) and the pad id
    (``pad_token_id``, else the plan's, else the first stop token, else 0); the given ones checked as
    :func:`effx.runtime.inputs.token_ids` (integers in the vocabulary)."""
    if eos_token_id is not None:
        eos = token_ids("eos_token_id", eos_token_id, vocab_size)
    else:
        eos = list(plan.eos_token_ids)
    if pad_token_id is not None:
        return eos, token_id("pad_token_id", pad_token_id, vocab_size)
    pad = plan.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, int(pad)


class Output:
    """The output buffer and everything that happens when a token is emitted (stop tokens, callbacks)."""

    def __init__(
        self,
        input_ids: Array,
        max_new: int,
        eos: list[int],
        pad: int,
        streamer: Any = None,
        on_token: Callable[[Array], object] | None = None,
        bar: Any = None,
        stop: Callable[[Array], Any] | None = None,
    ) -> None:
        xp = namespace(input_ids)
        self.xp = xp
        batch, prompt_len = input_ids.shape
        self.tokens = xp.full((batch, prompt_len + max_new), pad, dtype=xp.int64)
        self.tokens[:, :prompt_len] = input_ids
        self.length: int = prompt_len
        self.end: int = prompt_len + max_new
        self.finished = xp.zeros(batch, dtype=xp.bool)
        self.eos = xp.asarray(eos, dtype=xp.int64)
        self.pad = pad
        self.streamer, self.on_token, self.bar = streamer, on_token, bar
        self.stop = stop

    @property
    def done(self) -> bool:
        return self.length >= self.end or bool(self.xp.all(self.finished))

    @property
    def remaining(self) -> int:
        return self.end - self.length

    def emit(self, token: Array) -> Array:
        """Append one token per row (pad for finished rows); returns what was appended."""
        xp = self.xp
        token = xp.where(self.finished, xp.asarray(self.pad, dtype=xp.int64), xp.astype(token, xp.int64))
        self.tokens[:, self.length] = token
        self.length += 1
        if self.eos.shape[0]:
            self.finished = self.finished | xp.isin(token, self.eos)
        if self.stop is not None:  # the caller's own stopping rule (e.g. stop strings), after this token
            rows = check_stop(self.stop(self.tokens[:, : self.length]), self.tokens.shape[0])
            stopped = xp.asarray(rows, dtype=xp.bool)
            self.finished = self.finished | stopped
        if self.streamer is not None:
            self.streamer.put(token)
        if self.on_token is not None:
            self.on_token(token)
        if self.bar is not None:
            self.bar.update(1)
        return token

    def finish(self) -> Array:
        """End the streamer and return the prompt and the tokens emitted, ``[batch, prompt + new]``."""
        if self.streamer is not None:
            self.streamer.end()
        return self.tokens[:, : self.length]


def prefill(
    backend: Backend,
    cache: KVCache,
    input_ids: Array,
    positions: Array,
    key_valid: Array,
    stats: DecodeStats | None,
    features: list[Array] | None = None,
) -> tuple[Array, Backend]:
    """Run the prompt with the plan's own prefill: the first technique's ``prefill`` hook that takes this
    plan (TokenDrop's, per-prompt core neurons', which returns the backend to decode with, its MLPs sliced
    to the prompt's neurons), or a plain step. Returns ``(logits of the last position, backend)``; a plain
    step appends the last layer's output to ``features`` where given (a technique's prefill keeps none)."""
    plan = backend.plan
    for t, _policy in plan.used_techniques:
        if t.prefill is not None:
            done = techniques.hook(t.prefill)(backend, cache, input_ids, positions, key_valid, stats)
            if done is not None:
                return cast("tuple[Array, Backend]", done)
    logits = run_step(backend, cache, input_ids, positions, key_valid, stats=stats, features=features)
    return logits, backend


def step_decoder(backend: Backend, cache: KVCache, stats: DecodeStats | None) -> Any:
    """The per-step decoder a technique's ``decoder`` hook gives this plan (lossy exits), or None."""
    for t, policy in backend.plan.used_techniques:
        if t.decoder is not None and policy is not None:
            decoder = techniques.hook(t.decoder)(backend, cache, policy, stats)
            if decoder is not None:
                return decoder
    return None


def decode(
    backend: Backend,
    input_ids: Array,
    attention_mask: Array,
    *,
    max_new: int,
    eos: list[int],
    pad: int,
    sampler: TokenSampler,
    generator: Any = None,
    streamer: Any = None,
    on_token: Callable[[Array], object] | None = None,
    bar: Any = None,
    stats: StatsArg = None,
    sources: list[DraftSource] | None = None,
    stop: Callable[[Array], Any] | None = None,
) -> Array:
    """Generate ``max_new`` tokens (fewer when every row stops) after checked inputs (``input_ids [batch,
    prompt]`` int64, left-padded ``attention_mask``), as the plan's policy says. Returns ``[batch, prompt +
    new]``; finished rows are padded with ``pad``. ``stats`` (a :class:`DecodeStats`, or a dict to fill
    with its ``as_dict()``) receives what the loop decided (see ``Program.generate``). ``sources`` replaces
    the plan's draft sources (:mod:`effx.runtime.speculative`) and makes the run speculative; a speculative
    run samples as a dense one does (its output has the same distribution; ``generator`` draws the rejection
    rule's randoms too). ``stop(tokens [batch, length]) -> bools [batch]``, called after every emitted
    column, ends the rows it marks (as a stop token would, the token that triggered it kept)."""
    with collecting(stats) as typed:
        plan, xp = backend.plan, backend.xp
        speculative = plan.speculative or sources is not None
        for capability in needed_capabilities(plan):  # before anything runs
            backend.require(capability)
        if speculative and sampler.do_sample and not isinstance(sampler, Sampler):
            raise GenerationInputError(
                "speculative sampling needs a Sampler (its rejection rule reads the sampler's probabilities)"
            )
        batch, prompt_len = input_ids.shape
        # a round never drafts past the tokens left, so neither does the cache's room for drafts (a setting such
        # as draft=10**7 must not size it)
        draft = min(longest_draft(plan, sources), max_new) if speculative else 0
        # slots: the prompt, then one per new token (+ room for drafts that may be rejected)
        slots = capacity(batch, prompt_len, max_new, draft) if speculative else prompt_len + max_new
        if streamer is not None:
            streamer.put(input_ids)
        out = Output(input_ids, max_new, eos, pad, streamer, on_token, bar, stop)
        key_valid = xp.concat(
            [xp.astype(attention_mask, xp.bool), xp.ones((batch, slots - prompt_len), dtype=xp.bool)], axis=1
        )
        with backend.compute():
            cache = backend.new_cache(batch, slots, rollback=speculative or plan.rollback)
            if typed is not None and plan.full_head is not None:
                typed.start_head()
            positions = positions_from_mask(attention_mask)
            if speculative:
                sources = sources_of(plan) if sources is None else sources
            features: list[Array] | None = (
                [] if speculative and any(s.features for s in sources or ()) else None
            )
            logits, backend = prefill(
                backend, cache, input_ids, positions, key_valid[:, :prompt_len], typed, features
            )
            next_pos = positions[:, -1:] + 1
            token = out.emit(sampler(logits, generator))
            if speculative:
                Speculation(
                    backend, cache, out, key_valid, next_pos, cast("list[DraftSource]", sources),
                    draft=draft, stats=typed, features=features[0] if features else None,
                    sampler=cast(Sampler, sampler) if sampler.do_sample else None, rng=generator,
                ).run()  # fmt: skip
                return out.finish()
            decoder = step_decoder(backend, cache, typed)
            while not out.done:
                valid = key_valid[:, : out.length]
                if decoder is None:
                    logits = run_step(backend, cache, token[:, None], next_pos, valid, stats=typed)
                else:
                    logits = decoder.decode(
                        token[:, None], next_pos, MaskCache(backend, valid, backend.dtype)
                    )
                next_pos = next_pos + 1
                token = out.emit(sampler(logits, generator))
        return out.finish()
