"""The encoder and the encoder-decoder decode loop, for every backend (torch stages, ONNX Runtime sessions).

Written against the array API (``xp``), like :mod:`effx.runtime.loop`, and over a ``run(name, *arrays)``
callable that runs one stage by name and returns its outputs as a tuple. Stage names:

* ``encoder.embed`` ``(input_ids) -> hidden``; ``encoder.layer.i`` ``(hidden, mask) -> hidden`` with an
  additive bidirectional mask ``[batch, 1, seq, seq]``; where TokenDrop drops before layer ``i``,
  ``encoder.score.i`` ``(hidden, mask) -> scores [batch, seq]`` and ``encoder.gather``
  ``(hidden, keep_ids) -> hidden``;
* ``decoder.embed`` ``(input_ids, position_ids) -> hidden``; ``decoder.cross.i`` ``(encoder_hidden) -> (k, v)``
  (layer ``i``'s cross-attention keys and values, computed once per prompt, over the kept encoder tokens
  only); ``decoder.layer.i`` ``(hidden, mask, past_k, past_v, cross_k, cross_v, cross_mask) -> (hidden, k, v)``
  with the self-attention cache explicit (``k``/``v`` of the new tokens only) and ``cross_mask``
  ``[batch, 1, 1, kept]`` masking padding and dropped passengers; ``head`` ``(hidden) -> logits``.

Greedy decoding is that of ``model.generate`` for BART: the decoder starts at ``decoder_start``, the first
token is forced to ``forced_bos`` and the last to ``forced_eos`` where the model's generation config says so,
rows that reached a stop token are padded with ``pad``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..arrays import Array, Namespace
from ..errors import GenerationInputError
from .inputs import check_arguments, check_ids, check_max_new, token_id, token_ids
from .stats import StatsArg, collecting
from .token_drop import keep_quota, select_tokens

__all__ = ["bidirectional_mask", "check_inputs", "encode", "generate", "generate_seq2seq"]

Run = Callable[..., tuple[Array, ...]]


def bidirectional_mask(xp: Namespace, valid: Array, dtype: Any, queries: int | None = None) -> Array:
    """Additive mask ``[batch, 1, queries, keys]`` (``queries`` None: as many as keys) that hides the keys
    where ``valid [batch, keys]`` is False (padding, dropped passengers)."""
    neg = xp.full((), xp.finfo(dtype).min, dtype=dtype)
    m = xp.where(valid[:, None, None, :], xp.zeros((), dtype=dtype), neg)
    rows = valid.shape[1] if queries is None else queries
    return xp.broadcast_to(m, (valid.shape[0], 1, rows, valid.shape[1]))


def encode(
    run: Run,
    xp: Namespace,
    dtype: Any,
    input_ids: Array,
    valid: Array,
    *,
    drops: Mapping[int, float] | None = None,
    special: Iterable[int] = (),
    num_layers: int,
    relative_bias: bool = False,
    stats: StatsArg = None,
) -> tuple[Array, Array]:
    """The encoder's last hidden states ``[batch, kept, hidden]`` and which of them are real tokens
    ``[batch, kept]``.

    ``drops`` maps a layer to the share of each input's real tokens kept from that layer on (TokenDrop):
    ``encoder.score.i`` rates the tokens still in, each row keeps its quota of the best and always its first
    token and the ``special`` ids, and ``encoder.gather`` takes them. ``stats`` (a DecodeStats, or a dict
    to fill) gets ``kept_tokens``: the kept count per row at each drop layer, ``kept_ids`` the input
    positions that reached the last layer ``[batch, kept]`` (with ``kept_valid`` marking the real ones). ``relative_bias`` (T5):
    ``encoder.bias (positions) -> [batch, heads, seq, seq]`` is added to every layer's mask, from the tokens'
    original positions, so that a layer after a drop sees the kept tokens where they were."""
    drops = dict(drops or {})
    hidden = run("encoder.embed", input_ids)[0]
    real = xp.sum(xp.astype(valid, xp.int64), axis=1)
    protected = xp.isin(input_ids, xp.asarray(list(special), dtype=input_ids.dtype))
    first = xp.zeros(input_ids.shape, dtype=xp.bool)
    first[:, 0] = True
    protected = protected | first
    batch, n = input_ids.shape
    positions = xp.broadcast_to(xp.arange(n, dtype=xp.int64)[None, :], (batch, n))
    kept: dict[int, list[int]] = {}

    def layer_mask() -> Array:
        mask = bidirectional_mask(xp, valid, dtype)
        return mask + run("encoder.bias", positions)[0] if relative_bias else mask

    for i in range(num_layers):
        mask = layer_mask()
        if i in drops:
            scores = run(f"encoder.score.{i}", hidden, mask)[0]
            idx, valid = select_tokens(scores, valid, protected, keep_quota(real, drops[i]))
            hidden = run("encoder.gather", hidden, idx)[0]
            protected = xp.take_along_axis(protected, idx, axis=1)
            positions = xp.take_along_axis(positions, idx, axis=1)
            kept[i] = [int(c) for c in xp.sum(xp.astype(valid, xp.int64), axis=1)]
            mask = layer_mask()
        hidden = run(f"encoder.layer.{i}", hidden, mask)[0]
    with collecting(stats) as typed:
        if typed is not None:
            typed.set(kept_tokens=kept, kept_ids=positions, kept_valid=valid)
    return hidden, valid


def _decoder_step(
    run: Run,
    xp: Namespace,
    dtype: Any,
    current: Array,
    step: int,
    past: list[tuple[Array, Array]],
    cross: list[tuple[Array, ...]],
    cross_mask: Array,
    relative_bias: bool,
) -> Array:
    """One greedy decoder step on the tokens ``current [batch, 1]`` at position ``step``: every decoder layer
    (self-attention over ``past``, extended in place with this step's keys and values, then cross-attention
    over the encoder's ``cross`` keys and values) and the head; returns the step's logits ``[batch,
    vocab]``."""
    batch = current.shape[0]
    hidden = run("decoder.embed", current, xp.full((batch, 1), step, dtype=xp.int64))[0]
    self_mask = xp.zeros((batch, 1, 1, step + 1), dtype=dtype)
    if relative_bias:
        keys = xp.broadcast_to(xp.arange(step + 1, dtype=xp.int64)[None, :], (batch, step + 1))
        self_mask = self_mask + run("decoder.bias", xp.full((batch, 1), step, dtype=xp.int64), keys)[0]
    for i, (k_cross, v_cross) in enumerate(cross):
        hidden, k, v = run(f"decoder.layer.{i}", hidden, self_mask, *past[i], k_cross, v_cross, cross_mask)
        past[i] = (xp.concat([past[i][0], k], axis=2), xp.concat([past[i][1], v], axis=2))
    return run("head", hidden)[0][:, -1]


def generate_seq2seq(
    run: Run,
    xp: Namespace,
    dtype: Any,
    input_ids: Array,
    valid: Array,
    *,
    num_encoder_layers: int,
    num_decoder_layers: int,
    kv_shape: tuple[int, int],
    max_new_tokens: int,
    decoder_start: int,
    eos: list[int],
    pad: int,
    forced_bos: int | None = None,
    forced_eos: int | None = None,
    drops: Mapping[int, float] | None = None,
    special: Iterable[int] = (),
    relative_bias: bool = False,
    stats: StatsArg = None,
) -> Array:
    """Encode ``input_ids`` (``valid`` marks real tokens: right padding, as the tokenizers of seq2seq models
    give it), then decode greedily: ``[batch, 1 + new]`` decoder ids that start with ``decoder_start``, as
    ``model.generate`` returns them. ``kv_shape`` is ``(heads, head_dim)`` of the decoder's self-attention.
    ``stats`` gets the encoder's (see :func:`encode`) and ``cross_keys``: the encoder tokens every decoder
    step's cross-attention reads, per row. ``relative_bias`` (T5): the ``encoder.bias`` and ``decoder.bias
    (query_positions, key_positions)`` stages are added to the masks."""
    enc, enc_valid = encode(
        run,
        xp,
        dtype,
        input_ids,
        valid,
        drops=drops,
        special=special,
        num_layers=num_encoder_layers,
        relative_bias=relative_bias,
        stats=stats,
    )
    batch = input_ids.shape[0]
    cross_mask = bidirectional_mask(xp, enc_valid, dtype, queries=1)
    cross = [run(f"decoder.cross.{i}", enc) for i in range(num_decoder_layers)]
    heads, head_dim = kv_shape
    empty = xp.zeros((batch, heads, 0, head_dim), dtype=dtype)
    past = [(empty, empty) for _ in range(num_decoder_layers)]
    current = xp.full((batch, 1), decoder_start, dtype=xp.int64)
    out = [current]
    done = xp.zeros((batch,), dtype=xp.bool)
    stop = xp.asarray(list(eos) or [-1], dtype=xp.int64)
    for step in range(max_new_tokens):
        logits = _decoder_step(run, xp, dtype, current, step, past, cross, cross_mask, relative_bias)
        forced = forced_bos if step == 0 and forced_bos is not None else None
        if step == max_new_tokens - 1 and forced_eos is not None:
            forced = forced_eos
        if forced is not None:
            token = xp.full((batch,), forced, dtype=xp.int64)
        else:
            token = xp.astype(xp.argmax(logits, axis=-1), xp.int64)
        token = xp.where(done, xp.asarray(pad, dtype=xp.int64), token)
        done = done | xp.isin(token, stop)
        current = token[:, None]
        out.append(current)
        if bool(xp.all(done)):
            break
    with collecting(stats) as typed:
        if typed is not None:
            typed.set(
                cross_keys=[int(c) for c in xp.sum(xp.astype(enc_valid, xp.int64), axis=1)],
                steps=len(out) - 1,
            )
    return xp.concat(out, axis=1)


def check_inputs(
    xp: Namespace,
    input_ids: Any,
    attention_mask: Any,
    max_new_tokens: Any,
    max_positions: int,
    vocab_size: int | None = None,
) -> tuple[Array, Array]:
    """``(input_ids int64, valid bool)`` as arrays of ``xp``, or a ``GenerationInputError`` that says what is
    wrong with them (the contract of :mod:`effx.runtime.inputs`, then the lengths)."""
    ids, mask = check_ids(xp, input_ids, attention_mask, vocab_size)
    if ids.shape[1] > max_positions:
        raise GenerationInputError(f"the source has {ids.shape[1]} tokens; the encoder takes {max_positions}")
    max_new_tokens = check_max_new(max_new_tokens)
    if max_new_tokens + 1 > max_positions:
        raise GenerationInputError(f"max_new_tokens must be in 1..{max_positions - 1}, got {max_new_tokens}")
    return ids, mask != 0


# GenerationConfig fields the seq2seq front ends take besides their parameters (greedy decoding)
_SEQ2SEQ_EXTRA = ("use_cache", "max_length", "decoder_start_token_id")


def generate(
    run: Run,
    xp: Namespace,
    dtype: Any,
    input_ids: Any,
    attention_mask: Any,
    *,
    info: dict[str, Any],
    generation: dict[str, Any],
    drops: Mapping[int, float] | None,
    special: Iterable[int],
    max_new_tokens: int | None,
    eos_token_id: Any = None,
    pad_token_id: Any = None,
    stats: StatsArg = None,
    kwargs: dict[str, Any] | None = None,
) -> Array:
    """The front ends' ``generate``: check the inputs and the other generation arguments (``kwargs``, as
    :mod:`effx.runtime.inputs` says), take the stop and pad ids (the given ones, else the ``generation``
    defaults) and run :func:`generate_seq2seq` with the program's ``info`` (as a dict). ``max_new_tokens``
    None: ``max_length - 1``, else 20."""
    given = check_arguments(kwargs or {}, implemented=_SEQ2SEQ_EXTRA, front_end="seq2seq generate (greedy)")
    if max_new_tokens is None:
        max_new_tokens = given["max_length"] - 1 if given.get("max_length") is not None else 20
    vocab = info.get("vocab_size")
    ids, valid = check_inputs(xp, input_ids, attention_mask, max_new_tokens, info["max_positions"], vocab)
    if eos_token_id is None:
        eos = list(generation["eos_token_id"])
    else:
        eos = token_ids("eos_token_id", eos_token_id, vocab)
    if pad_token_id is not None:
        pad_token_id = token_id("pad_token_id", pad_token_id, vocab)
    start = given.get("decoder_start_token_id")
    start = (
        generation["decoder_start_token_id"]
        if start is None
        else token_id("decoder_start_token_id", start, vocab)
    )
    return generate_seq2seq(
        run,
        xp,
        dtype,
        ids,
        valid,
        num_encoder_layers=info["encoder_layers"],
        num_decoder_layers=info["decoder_layers"],
        kv_shape=(info["num_heads"], info["head_dim"]),
        max_new_tokens=max_new_tokens,
        decoder_start=start,
        eos=eos,
        pad=generation["pad_token_id"] if pad_token_id is None else pad_token_id,
        forced_bos=generation["forced_bos_token_id"],
        forced_eos=generation["forced_eos_token_id"],
        drops=drops,
        special=special,
        relative_bias=bool(info.get("relative_bias", False)),
        stats=stats,
    )
