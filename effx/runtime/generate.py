"""``Program.generate``: the torch front end of the decode loop (:mod:`effx.runtime.loop`).

It reads ``model.generate``'s arguments (a ``GenerationConfig`` and its fields as keywords), checks them,
and runs the loop on the Program's torch backend.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ..errors import GenerationInputError
from .loop import check_inputs, decode, stop_and_pad
from .sampling import Sampler
from .torch_backend import XP, torch_backend

__all__ = ["generate"]

# model.generate keywords that effx accepts and that change nothing here (effx always uses its KV cache).
_ACCEPTED_NOOPS = {"use_cache"}
# the GenerationConfig fields effx's decoding implements; any other passed with a value other than its
# default (num_beams=4, repetition_penalty=2.0, stop_strings=...) is refused, not ignored
_IMPLEMENTED = {
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
    "pad_token_id", "bos_token_id",
}  # fmt: skip
# values of other fields that ask for nothing (transformers 5's GenerationConfig defaults them to None)
_NEUTRAL = {
    "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
    "length_penalty": 1.0, "no_repeat_ngram_size": 0, "early_stopping": False, "output_scores": False,
    "output_logits": False, "output_attentions": False, "output_hidden_states": False,
    "return_dict_in_generate": False,
}  # fmt: skip


def _resolve_config(program, generation_config, kwargs: dict[str, Any]):
    from transformers import GenerationConfig

    base = generation_config if generation_config is not None else program.generation_config
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    unknown = [k for k in kwargs if not hasattr(config, k) and k not in _ACCEPTED_NOOPS]
    if unknown:
        raise GenerationInputError(
            f"unknown generation argument(s) {sorted(unknown)}; effx takes the GenerationConfig fields "
            "(max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id, ...)"
        )
    defaults = GenerationConfig()
    unsupported = sorted(
        k
        for k, v in kwargs.items()
        if k not in _IMPLEMENTED
        and k not in _ACCEPTED_NOOPS
        and v is not None
        and v != getattr(defaults, k, None)
        and (k not in _NEUTRAL or v != _NEUTRAL[k])
    )
    if unsupported:
        raise GenerationInputError(
            f"effx does not implement the generation argument(s) {unsupported} (it decodes greedily or by "
            "sampling with temperature, top_k and top_p); leave them at their defaults"
        )
    for k, v in kwargs.items():
        if k not in _ACCEPTED_NOOPS:
            setattr(config, k, v)
    return config


def generate(
    program,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    generation_config=None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    streamer=None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    progress: bool = False,
    stats: dict | None = None,
    stop: Callable | None = None,
    **kwargs,
) -> torch.LongTensor:
    """Generate with the same inputs and output as ``model.generate``.

    Takes ``input_ids [batch, prompt]`` (left-padded for batches, with ``attention_mask``) and the
    GenerationConfig fields as keywords (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``,
    ``top_p``, ``eos_token_id``, ``pad_token_id``); defaults come from the model's generation config.
    Returns ``[batch, prompt + new]`` token ids; rows that stop early are filled with ``pad_token_id``.
    ``eos_token_id=[]`` turns stopping off.

    Sampling is reproducible with ``seed`` (or your own ``generator``). ``streamer`` is a transformers
    streamer (``put``/``end``, e.g. ``TextStreamer``); ``on_token(ids [batch])`` is called for every token;
    ``progress=True`` shows a progress bar. Pass a dict as ``stats`` to get what the runtime decided:
    ``exit_layers`` (per step, per row: how many layers the token went through) with early exits,
    ``drafted``/``accepted`` (summed over rows), ``rounds`` (verification steps with drafts), ``steps``
    (all of them), ``draft_lengths``, per draft source ``sources`` and ``compactions`` of a batch's cache
    when the plan drafts (prompt lookup, self-speculative exits), ``head_positions``/``head_fallbacks``
    (positions a vocabulary-reduced head scored, and how many of them fell back to the full head),
    ``kept_tokens`` (TokenDrop: per drop layer, prompt tokens kept per row) and ``core_neurons``
    (NeuronMask core mode: per layer, the neuron ids each row decodes with).

    ``stop(tokens [batch, length]) -> bools [batch]`` is called after every new token (``tokens`` holds the
    prompt and what was generated); a row it marks ends there, as at a stop token (e.g. stop strings:
    decode the row's new tokens and look for them).
    """
    if not isinstance(input_ids, torch.Tensor):
        raise GenerationInputError("input_ids must be a 2-D LongTensor [batch, prompt_length]")
    config = _resolve_config(program, generation_config, kwargs)
    max_new = config.max_new_tokens
    if max_new is None and input_ids.ndim == 2:
        max_new = (config.max_length or 20) - input_ids.shape[1]
    ids, mask = check_inputs(XP, input_ids, attention_mask, max_new, program.info.max_positions)
    eos, pad = stop_and_pad(program.plan, config.eos_token_id, config.pad_token_id)
    sampler = Sampler(
        do_sample=bool(config.do_sample),
        temperature=float(config.temperature if config.temperature is not None else 1.0),
        top_k=config.top_k if config.top_k else None,
        top_p=float(config.top_p if config.top_p is not None else 1.0),
    )
    if sampler.do_sample and generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_new, desc="generate", unit="tok")
    try:
        return decode(
            torch_backend(program),
            ids,
            mask,
            max_new=max_new,
            eos=eos,
            pad=pad,
            sampler=sampler,
            generator=generator,
            streamer=streamer,
            on_token=on_token,
            bar=bar,
            stats=stats,
            stop=stop,
        )
    finally:
        if bar is not None:
            bar.close()
