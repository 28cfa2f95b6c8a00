"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GenerationInputError

__all__ = ["Sampler"]


@dataclass(frozen=True)
class Sampler:
    """Greedy when ``do_sample`` is False; else temperature, then top-k, then top-p (nucleus) sampling."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self):
        if self.do_sample:
            if not self.temperature > 0:
                raise GenerationInputError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if self.top_k is not None and self.top_k < 1:
                raise GenerationInputError(f"top_k must be >= 1 (or None for no limit), got {self.top_k}")
            if not 0 < self.top_p <= 1:
                raise GenerationInputError(f"top_p must be in (0, 1], got {self.top_p}")

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``logits [batch, vocab]`` -> token ids ``[batch]``."""
        logits = logits.float()
        if not self.do_sample:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # drop a token when the tokens ranked above it already reach top_p; always keep the best one
            drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= self.top_p
            drop_sorted[:, 0] = False
            drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
