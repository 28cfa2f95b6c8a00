"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from ..arrays import Array, multinomial, namespace, softmax, topk
from ..errors import GenerationInputError

__all__ = ["Sampler", "TokenSampler"]


class TokenSampler(Protocol):
    """What the decode loop chooses tokens with: a :class:`Sampler`, or a scorer that answers with given
    tokens (``effx.runtime.score``). Speculative sampling needs a :class:`Sampler` (its probabilities)."""

    @property
    def do_sample(self) -> bool: ...

    def __call__(self, logits: Array, generator: Any = None) -> Array: ...


@dataclass(frozen=True)
class Sampler:
    """Greedy when ``do_sample`` is False; else temperature, then top-k, then top-p (nucleus) sampling.

    ``top_k`` larger than the vocabulary keeps every token; ``top_k=None`` (or 0) means no limit. Settings
    are checked when sampling is on (a greedy Sampler ignores them, as ``model.generate`` does).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.do_sample:
            t = self.temperature
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
                raise GenerationInputError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
                raise GenerationInputError(f"top_k must be >= 1 (or None for no limit), got {self.top_k}")
            if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
                raise GenerationInputError(f"top_p must be in (0, 1], got {self.top_p}")

    def __call__(self, logits: Array, generator: Any = None) -> Array:
        """``logits [batch, vocab]`` -> token ids ``[batch]``; ``generator`` is the random source of the
        logits' namespace (``effx.runtime.arrays.new_rng``; None: torch's global generator)."""
        xp = namespace(logits)
        if not self.do_sample:  # the argmax of the logits as they are (a float32 copy has the same order)
            return xp.argmax(logits, axis=-1)
        return multinomial(xp, self.probabilities(logits), generator)

    def probabilities(self, logits: Array) -> Array:
        """The distribution a sampling Sampler draws from, ``[..., vocab]`` float32: the logits divided by
        the temperature, cut to the top-k and then to the top-p nucleus, softmaxed. Speculative sampling
        applies it to the draft's and the target's logits alike (:mod:`effx.runtime.rejection`)."""
        xp = namespace(logits)
        shape = logits.shape
        logits = xp.reshape(xp.astype(logits, xp.float32), (-1, shape[-1]))
        logits = logits / self.temperature
        ninf = xp.asarray(float("-inf"), dtype=xp.float32)
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = topk(xp, logits, self.top_k)[0][:, -1:]
            logits = xp.where(logits < kth, ninf, logits)
        if self.top_p < 1.0:
            order = xp.argsort(logits, axis=-1, descending=True, stable=True)
            sorted_logits = xp.take_along_axis(logits, order, axis=-1)
            probs = softmax(xp, sorted_logits)
            # drop a token when the tokens ranked above it already reach top_p; always keep the best one
            before = xp.cumulative_sum(probs, axis=-1) - probs
            keep = xp.sum(xp.astype(before < self.top_p, xp.int64), axis=-1, keepdims=True)
            cutoff = xp.take_along_axis(sorted_logits, xp.clip(keep, min=1) - 1, axis=-1)
            logits = xp.where(logits < cutoff, ninf, logits)
        return xp.reshape(softmax(xp, logits), shape)
