"""``Program.generate``: the torch front end of the decode loop (:mod:`effx.runtime.loop`).

It reads ``model.generate``'s arguments (a ``GenerationConfig`` and its fields as keywords), checks them,
and runs the loop on the Program's torch backend.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch

from .inputs import check_arguments
from .loop import check_inputs, decode, stop_and_pad
from .sampling import Sampler
from .stats import DecodeStats
from .torch_backend import XP, torch_backend

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from ..program import Program

__all__ = ["generate"]

# the GenerationConfig fields the torch front end implements (use_cache changes nothing: effx always uses
# its KV cache); any other one passed with a value that asks for something (num_beams=4,
# repetition_penalty=2.0, stop_strings=...) is refused by name, not ignored (effx.runtime.inputs)
_IMPLEMENTED = {
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
    "pad_token_id", "bos_token_id", "use_cache",
}  # fmt: skip


def _resolve_config(
    program: Program, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
) -> GenerationConfig:
    from transformers import GenerationConfig

    given = check_arguments(kwargs, implemented=_IMPLEMENTED, front_end="Program.generate")
    base = generation_config if generation_config is not None else program.generation_config
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    for k, v in given.items():
        if k != "use_cache":
            setattr(config, k, v)
    return config


def _max_new(config: GenerationConfig, input_ids: torch.Tensor) -> Any:
    """The tokens to generate: the config's ``max_new_tokens``, else its ``max_length`` (default 20) less
    the prompt, as the config holds it (unchecked: :func:`check_inputs` says what is wrong with it)."""
    max_new = config.max_new_tokens
    if max_new is None and getattr(input_ids, "ndim", None) == 2:
        max_new = (config.max_length or 20) - input_ids.shape[1]
    return max_new


def _sampler(config: GenerationConfig) -> Sampler:
    """The sampler a generation config asks for (greedy unless ``do_sample``; unset settings: temperature
    1, no top-k, top-p 1)."""
    return Sampler(
        do_sample=bool(config.do_sample),
        temperature=float(config.temperature if config.temperature is not None else 1.0),
        top_k=config.top_k if config.top_k else None,
        top_p=float(config.top_p if config.top_p is not None else 1.0),
    )


def generate(
    program: Program,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    generation_config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    streamer: Any = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    progress: bool = False,
    stats: DecodeStats | dict[str, Any] | None = None,
    stop: Callable[[torch.Tensor], Any] | None = None,
    **kwargs: Any,
) -> torch.LongTensor:
    """Generate with the same inputs and output as ``model.generate``.

    Takes ``input_ids [batch, prompt]`` (left-padded for batches, with ``attention_mask``) and the
    GenerationConfig fields as keywords (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``,
    ``top_p``, ``eos_token_id``, ``pad_token_id``); defaults come from the model's generation config.
    Returns ``[batch, prompt + new]`` token ids; rows that stop early are filled with ``pad_token_id``.
    ``eos_token_id=[]`` turns stopping off.

    Sampling is reproducible with ``seed`` (or your own ``generator``). ``streamer`` is a transformers
    streamer (``put``/``end``, e.g. ``TextStreamer``); ``on_token(ids [batch])`` is called for every token;
    ``progress=True`` shows a progress bar. Pass a :class:`effx.runtime.stats.DecodeStats` as ``stats`` to
    get what the runtime decided as typed fields (``stats.summary()`` is one line about it), or a dict, which
    gets ``DecodeStats.as_dict()``: the names below, only those the plan's techniques report (refreshed
    after every write, so ``on_token`` can read it, and when the call returns or raises):
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
    config = _resolve_config(program, generation_config, kwargs)
    max_new = _max_new(config, input_ids)
    vocab = program.info.vocab_size
    ids, mask = check_inputs(
        XP, input_ids, attention_mask, max_new, program.info.max_positions, vocab_size=vocab
    )
    eos, pad = stop_and_pad(program.plan, config.eos_token_id, config.pad_token_id, vocab)
    sampler = _sampler(config)
    if sampler.do_sample and generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_new, desc="generate", unit="tok")
    try:
        # the torch backend's arrays are torch tensors, and the loop's tokens int64
        return cast(
            torch.LongTensor,
            decode(
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
            ),
        )
    finally:
        if bar is not None:
            bar.close()
