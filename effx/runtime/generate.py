"""The decode loop: prefill, then tokens over the Program's stages with a preallocated cache.

One loop serves every Program: a dense one decodes a token per step through all layers; one with exit
stages (the EarlyExit pass) lets tokens leave early (``lossy``) or drafts and verifies tokens
(``self-speculative``), as its plan's policy says.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ..errors import GenerationInputError
from .early_exit import ExitDecoder, speculative_round
from .forward import KVCache, MaskCache, check_left_padded, positions_from_mask, run_step
from .neurons import core_prefill
from .sampling import Sampler
from .token_drop import drop_prefill

__all__ = ["generate"]

# model.generate keywords that effx accepts and that change nothing here (effx always uses its KV cache).
_ACCEPTED_NOOPS = {"use_cache"}


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
    for k, v in kwargs.items():
        if k not in _ACCEPTED_NOOPS:
            setattr(config, k, v)
    return config


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


class _Output:
    """The output buffer and everything that happens when a token is emitted (stop tokens, callbacks)."""

    def __init__(self, input_ids, max_new, eos, pad, streamer, on_token, bar):
        batch, prompt_len = input_ids.shape
        self.tokens = torch.full((batch, prompt_len + max_new), pad, dtype=torch.long)
        self.tokens[:, :prompt_len] = input_ids
        self.length = prompt_len
        self.end = prompt_len + max_new
        self.finished = torch.zeros(batch, dtype=torch.bool)
        self.eos, self.pad = eos, pad
        self.streamer, self.on_token, self.bar = streamer, on_token, bar

    @property
    def done(self) -> bool:
        return self.length >= self.end or bool(self.finished.all())

    @property
    def remaining(self) -> int:
        return self.end - self.length

    def emit(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token per row (pad for finished rows); returns what was appended."""
        token = torch.where(self.finished, torch.full_like(token, self.pad), token)
        self.tokens[:, self.length] = token
        self.length += 1
        if len(self.eos):
            self.finished |= torch.isin(token, self.eos)
        if self.streamer is not None:
            self.streamer.put(token.cpu())
        if self.on_token is not None:
            self.on_token(token)
        if self.bar is not None:
            self.bar.update(1)
        return token


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
    ``drafted``/``accepted`` counts in self-speculative mode, ``head_positions``/``head_fallbacks``
    (positions a vocabulary-reduced head scored, and how many of them fell back to the full head),
    ``kept_tokens`` (TokenDrop: per drop layer, prompt tokens kept per row) and ``core_neurons``
    (NeuronMask core mode: per layer, the neuron ids each row decodes with).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise GenerationInputError("input_ids must be a 2-D LongTensor [batch, prompt_length]")
    batch, prompt_len = input_ids.shape
    if batch == 0 or prompt_len == 0:
        raise GenerationInputError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise GenerationInputError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    check_left_padded(attention_mask)

    config = _resolve_config(program, generation_config, kwargs)
    max_new = config.max_new_tokens
    if max_new is None:
        max_new = (config.max_length or 20) - prompt_len
    if max_new < 1:
        raise GenerationInputError(f"max_new_tokens must be >= 1, got {max_new}")
    policy = program.plan.policy.get("early_exit") if program.exits else None
    mode = policy["mode"] if policy else "dense"
    draft = int(policy["draft"]) if mode == "self-speculative" else 0
    total = prompt_len + max_new
    if total > program.info.max_positions:
        raise GenerationInputError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new}) = {total} exceeds the model's "
            f"{program.info.max_positions} positions"
        )
    eos_ids = (
        _as_ids(config.eos_token_id) if config.eos_token_id is not None else list(program.plan.eos_token_ids)
    )
    eos = torch.tensor(eos_ids, dtype=torch.long)
    pad = config.pad_token_id if config.pad_token_id is not None else program.plan.pad_token_id
    if pad is None:
        pad = int(eos[0]) if len(eos) else 0
    sampler = Sampler(
        do_sample=bool(config.do_sample),
        temperature=float(config.temperature if config.temperature is not None else 1.0),
        top_k=config.top_k if config.top_k else None,
        top_p=float(config.top_p if config.top_p is not None else 1.0),
    )
    if mode == "self-speculative" and sampler.do_sample:
        raise GenerationInputError(
            "self-speculative early exit reproduces greedy decoding; call it with do_sample=False"
        )
    if sampler.do_sample and generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_new, desc="generate", unit="tok")
    if streamer is not None:
        streamer.put(input_ids.cpu())

    input_ids = input_ids.long()
    out = _Output(input_ids, max_new, eos, pad, streamer, on_token, bar)
    # slots: the prompt, then one per new token (+ room for draft tokens that may be rejected)
    key_valid = torch.ones(batch, total + draft, dtype=torch.bool)
    key_valid[:, :prompt_len] = attention_mask.bool()
    with torch.inference_mode():
        cache = KVCache.for_program(program, batch, total + draft)
        if stats is not None and program.full_head is not None:
            stats.update(head_positions=0, head_fallbacks=0)
        positions = positions_from_mask(attention_mask)
        if program.drops:  # TokenDrop: later layers see only the kept prompt tokens
            logits = drop_prefill(program, cache, input_ids, positions, key_valid[:, :prompt_len], stats)
        elif program.plan.policy.get("neuron_mask", {}).get("mode") == "core":
            # per-prompt core neurons: chosen in the prefill, then decoding runs a Program sliced to them
            logits, program = core_prefill(
                program, cache, input_ids, positions, key_valid[:, :prompt_len], stats
            )
        else:
            logits = run_step(program, cache, input_ids, positions, key_valid[:, :prompt_len], stats=stats)
        next_pos = positions[:, -1:] + 1
        token = out.emit(sampler(logits, generator))
        if mode == "self-speculative":
            if stats is not None:
                stats.update(drafted=0, accepted=0, rounds=0)
            while not out.done:
                next_pos = speculative_round(program, cache, out, token, next_pos, key_valid, draft, stats)
                token = out.tokens[:, out.length - 1]
        else:
            decoder = (
                ExitDecoder(program, cache, copy=policy.get("kv") == "copy", stats=stats)
                if mode == "lossy"
                else None
            )
            if stats is not None and decoder is not None:
                stats["exit_layers"] = []
            while not out.done:
                valid = key_valid[:, : out.length]
                if decoder is None:
                    logits = run_step(program, cache, token[:, None], next_pos, valid, stats=stats)
                else:
                    logits, depth = decoder.step(
                        token[:, None], next_pos, MaskCache(program, valid, cache.k[0].dtype)
                    )
                    if stats is not None:
                        stats["exit_layers"].append(depth.tolist())
                next_pos = next_pos + 1
                token = out.emit(sampler(logits, generator))
    if bar is not None:
        bar.close()
    if streamer is not None:
        streamer.end()
    return out.tokens[:, : out.length]
