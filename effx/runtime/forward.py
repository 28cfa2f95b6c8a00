"""The pieces of a forward pass over a Program's stages: KV cache, masks, positions, one step."""

from __future__ import annotations

import torch

from ..errors import GenerationInputError

__all__ = [
    "KVCache",
    "attention_masks",
    "check_left_padded",
    "forward_logits",
    "positions_from_mask",
    "run_step",
]


class KVCache:
    """A preallocated KV cache, one ``[batch, kv_heads, capacity, head_dim]`` pair of tensors per layer.

    ``length`` slots are filled; a step reads ``past(i)`` (views, no copy) and writes its new keys and values
    after them. Slot order is time order, so causality is by slot index.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype):
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0

    @classmethod
    def for_program(cls, program, batch: int, capacity: int) -> KVCache:
        info = program.info
        return cls(info.num_layers, batch, info.num_kv_heads, capacity, info.head_dim, info.torch_dtype)

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:, :, : self.length], self.v[layer][:, :, : self.length]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {self.capacity}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Decoder-only generation needs left padding: each row is 0...0 1...1 with at least one 1."""
    m = attention_mask.to(torch.bool)
    if not bool(m[:, -1].all()) or bool((m[:, 1:].int() < m[:, :-1].int()).any()):
        raise GenerationInputError(
            "attention_mask must be left-padded (zeros, then ones, every row ending in a real token); "
            "set tokenizer.padding_side = 'left' before batching prompts"
        )


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (pads get 0; they are masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def attention_masks(
    key_valid: torch.Tensor, q_start: int, q_len: int, windows: set[int | None], dtype
) -> dict[int | None, torch.Tensor]:
    """Additive masks ``[batch, 1, q_len, keys]`` by sliding window (None: full causal attention).

    ``key_valid[b, j]`` is False for padding slots; query ``i`` (slot ``q_start + i``) sees slot ``j`` when
    ``j <= q_start + i``, ``key_valid[b, j]``, and, with a window ``w``, ``j > q_start + i - w``.
    """
    keys = key_valid.shape[1]
    q = torch.arange(q_start, q_start + q_len)[:, None]
    k = torch.arange(keys)[None, :]
    causal = k <= q
    valid = key_valid[:, None, None, :]
    neg = torch.finfo(dtype).min
    out = {}
    for w in windows:
        allowed = causal if w is None else causal & (k > q - w)
        allowed = allowed[None, None] & valid
        out[w] = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, neg)
    return out


def run_step(
    program,
    cache: KVCache,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    key_valid: torch.Tensor,
    *,
    last_only: bool = True,
) -> torch.Tensor:
    """Run embed, every layer (reading and filling ``cache``) and the head on ``input_ids``.

    ``key_valid`` covers every slot up to and including the new tokens. Returns logits of the last position
    (``[batch, vocab]``) or of all positions (``[batch, seq, vocab]``).
    """
    q_len = input_ids.shape[1]
    hidden, cos, sin = program.embed.graph(input_ids, position_ids)
    masks = attention_masks(key_valid, cache.length, q_len, program.windows, hidden.dtype)
    for stage in program.layers:
        i = stage.layer
        past_k, past_v = cache.past(i)
        hidden, k, v = stage.graph(hidden, cos, sin, masks[stage.attrs.get("sliding_window")], past_k, past_v)
        cache.write(i, k, v)
    cache.length += q_len
    if last_only:
        return program.head.graph(hidden[:, -1:])[0][:, -1]
    return program.head.graph(hidden)[0]


def forward_logits(
    program, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` for every position: a full forward of the Program, no cache kept."""
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise GenerationInputError(
            f"input_ids must be [batch, seq] with seq >= 1, got shape {tuple(input_ids.shape)}"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch, seq = input_ids.shape
    cache = KVCache.for_program(program, batch, seq)
    with torch.inference_mode():
        return run_step(
            program,
            cache,
            input_ids,
            positions_from_mask(attention_mask),
            attention_mask.bool(),
            last_only=False,
        )
