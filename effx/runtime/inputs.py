"""The one input contract of every ``generate`` front end (torch ``Program``, ONNX artifacts, seq2seq, Mamba,
cascades): the same arguments accepted, the same :class:`~effx.errors.GenerationInputError` for the same bad
value.

* token ids: a non-empty 2-D array of integers in ``0..vocab-1`` (float ids are refused, never truncated);
* ``attention_mask``: the shape of the ids, every value 0 or 1;
* ``eos_token_id`` / ``pad_token_id``: integers (or, for eos, a list of them) in ``0..vocab-1``;
* ``max_new_tokens``: an integer >= 1;
* ``stop(tokens) -> bools [batch]``: one value per row;
* every other keyword is a ``GenerationConfig`` field: accepted at the value that asks for nothing (None,
  ``num_beams=1``, ``repetition_penalty=1.0``, ...), refused by name otherwise, unless the front end
  implements it. A name that is no generation argument is refused as unknown.

This module imports neither torch nor transformers: ONNX deployments run it.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import array_api_compat

from ..arrays import Array, Namespace, as_array
from ..errors import GenerationInputError

__all__ = [
    "GENERATION_FIELDS",
    "check_arguments",
    "check_ids",
    "check_max_new",
    "check_stop",
    "resolve_max_new",
    "token_id",
    "token_ids",
]

# transformers' GenerationConfig fields (5.x); a keyword outside them and a front end's own parameters is
# unknown. Kept here so that a torch-free deployment checks the same names.
GENERATION_FIELDS = frozenset(
    """max_length max_new_tokens min_length min_new_tokens early_stopping max_time stop_strings do_sample
    num_beams use_mtp use_cache cache_implementation cache_config max_cache_len temperature top_k top_p min_p
    top_h typical_p epsilon_cutoff eta_cutoff repetition_penalty encoder_repetition_penalty length_penalty
    no_repeat_ngram_size bad_words_ids renormalize_logits forced_bos_token_id forced_eos_token_id
    remove_invalid_values exponential_decay_length_penalty suppress_tokens begin_suppress_tokens sequence_bias
    token_healing guidance_scale watermarking_config num_return_sequences output_attentions
    output_hidden_states output_scores output_logits return_dict_in_generate pad_token_id bos_token_id
    eos_token_id encoder_no_repeat_ngram_size decoder_start_token_id is_assistant num_assistant_tokens
    num_assistant_tokens_schedule assistant_confidence_threshold prompt_lookup_num_tokens
    max_matching_ngram_size assistant_early_exit assistant_lookbehind target_lookbehind
    assistant_ensemble_weight speculation_type compile_config disable_compile continuous_batching_config
    low_memory penalty_alpha dola_layers diversity_penalty num_beam_groups constraints force_words_ids
    prefill_chunk_size""".split()
)
# values of fields that ask for nothing, besides None
_NEUTRAL = {
    "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "early_stopping": False, "output_scores": False, "output_logits": False,
    "output_attentions": False, "output_hidden_states": False, "return_dict_in_generate": False,
    "do_sample": False, "use_cache": True, "min_length": 0, "min_new_tokens": 0, "renormalize_logits": False,
    "remove_invalid_values": False, "token_healing": False, "low_memory": False, "guidance_scale": 1.0,
    "diversity_penalty": 0.0, "penalty_alpha": 0.0, "top_k": 0, "top_p": 1.0, "temperature": 1.0,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
}  # fmt: skip


def _neutral(name: str, value: Any) -> bool:
    if value is None:
        return True
    if name not in _NEUTRAL or isinstance(value, (list, tuple, dict)):
        return False
    try:
        return bool(value == _NEUTRAL[name]) and type(value) is not str
    except Exception:  # an array or another object that does not compare to a number
        return False


def check_arguments(
    kwargs: Mapping[str, Any], *, implemented: Iterable[str] = (), front_end: str
) -> dict[str, Any]:
    """The keywords of ``kwargs`` that ``front_end`` implements (those of ``implemented``); every other one must
    be a generation field at a value that asks for nothing, else it is refused by name."""
    implemented = set(implemented)
    unknown = sorted(k for k in kwargs if k not in GENERATION_FIELDS and k not in implemented)
    if unknown:
        raise GenerationInputError(
            f"unknown generation argument(s) {unknown} for {front_end}; it takes input_ids, attention_mask and "
            f"the GenerationConfig fields it implements: {sorted(implemented)}"
        )
    refused = sorted(k for k, v in kwargs.items() if k not in implemented and not _neutral(k, v))
    if refused:
        raise GenerationInputError(
            f"{front_end} does not implement the generation argument(s) {refused}; leave them at their defaults "
            f"(it implements {sorted(implemented)})"
        )
    return {k: v for k, v in kwargs.items() if k in implemented}


def _is_integer(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _vocab_range(vocab_size: int | None) -> str:
    return "ids >= 0" if vocab_size is None else f"0..{vocab_size - 1}"


def token_id(name: str, value: Any, vocab_size: int | None) -> int:
    """One token id (a Python, numpy or 0-d tensor integer) as an ``int`` in ``0..vocab_size-1``."""
    if array_api_compat.is_array_api_obj(value) and getattr(value, "ndim", None) == 0:
        xp = array_api_compat.array_namespace(value)
        if not xp.isdtype(value.dtype, "integral"):
            raise GenerationInputError(f"{name} must be an integer token id, got {value!r} ({value.dtype})")
        value = int(value)
    if not _is_integer(value):
        raise GenerationInputError(f"{name} must be an integer token id, got {value!r}")
    tid = int(value)
    if tid < 0 or (vocab_size is not None and tid >= vocab_size):
        raise GenerationInputError(f"{name}={tid} is outside the vocabulary ({_vocab_range(vocab_size)})")
    return tid


def token_ids(name: str, value: Any, vocab_size: int | None) -> list[int]:
    """Stop ids: None -> ``[]``, one id -> ``[id]``, a list or tuple -> its ids, each checked as
    :func:`token_id`."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [token_id(name, v, vocab_size) for v in value]
    return [token_id(name, value, vocab_size)]


def check_max_new(max_new_tokens: Any) -> int:
    if not _is_integer(max_new_tokens) or max_new_tokens < 1:
        raise GenerationInputError(f"max_new_tokens must be >= 1 (an integer), got {max_new_tokens!r}")
    return int(max_new_tokens)


def check_ids(
    xp: Namespace, input_ids: Any, attention_mask: Any, vocab_size: int | None
) -> tuple[Array, Array]:
    """``(input_ids int64, attention_mask int64)`` as arrays of ``xp``: ids a non-empty 2-D integer array
    in ``0..vocab_size-1``, the mask of the same shape with values 0 and 1 (all ones when None). Padding
    positions are checked too: every id reaches the embedding."""
    if input_ids is None:
        raise GenerationInputError("input_ids is required: a 2-D array of token ids [batch, prompt_length]")
    try:
        ids = as_array(xp, input_ids)
    except (TypeError, ValueError) as e:
        raise GenerationInputError(f"input_ids must be a 2-D array of integer token ids: {e}") from e
    if ids.ndim != 2:
        raise GenerationInputError(
            f"input_ids must be a 2-D array of token ids [batch, prompt_length], got shape {tuple(ids.shape)}"
        )
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise GenerationInputError(f"empty prompt: input_ids has shape {tuple(ids.shape)}")
    if not xp.isdtype(ids.dtype, "integral"):
        raise GenerationInputError(
            f"input_ids must hold integer token ids, got {ids.dtype} (float ids are refused, not truncated)"
        )
    ids = xp.astype(ids, xp.int64)
    low, high = int(xp.min(ids)), int(xp.max(ids))
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        raise GenerationInputError(
            f"input_ids holds the token id {bad}, outside the vocabulary ({_vocab_range(vocab_size)})"
        )
    if attention_mask is None:
        return ids, xp.ones_like(ids)
    try:
        mask = as_array(xp, attention_mask)
    except (TypeError, ValueError) as e:
        raise GenerationInputError(f"attention_mask must be an array of 0 and 1: {e}") from e
    if tuple(mask.shape) != tuple(ids.shape):
        raise GenerationInputError(
            f"attention_mask shape {tuple(mask.shape)} does not match input_ids shape {tuple(ids.shape)}"
        )
    if mask.dtype != xp.bool and not bool(xp.all((mask == 0) | (mask == 1))):
        raise GenerationInputError("attention_mask must hold only 0 (padding) and 1 (a real token)")
    return ids, xp.astype(mask, xp.int64)


def check_stop(result: Any, batch: int) -> list[bool]:
    """What a ``stop(tokens)`` callback returned, as one bool per row, or a ``GenerationInputError``."""
    try:
        values = [bool(v) for v in result]
    except TypeError as e:
        raise GenerationInputError(
            f"stop(tokens) must return one bool per row ({batch}), got {result!r}"
        ) from e
    if len(values) != batch:
        raise GenerationInputError(f"stop(tokens) returned {len(values)} values for a batch of {batch} rows")
    return values


def resolve_max_new(max_new_tokens: Any, max_length: Any, input_ids: Any, *, default: int) -> Any:
    """``max_new_tokens`` if given, else ``max_length`` less the prompt's length, else ``default``."""
    if max_new_tokens is not None:
        return max_new_tokens
    if max_length is not None:
        shape = getattr(input_ids, "shape", None)
        if shape is not None and len(shape) == 2:
            return max_length - shape[1]
    return default
