"""The pieces of a forward pass over a Program's stages: KV cache, masks, positions, running layers."""

from __future__ import annotations

import torch

from ..errors import GenerationInputError

__all__ = [
    "KVCache",
    "MaskCache",
    "attention_masks",
    "check_left_padded",
    "forward_logits",
    "positions_from_mask",
    "run_layers",
    "run_step",
]


class KVCache:
    """A preallocated KV cache, one ``[batch, kv_heads, capacity, head_dim]`` pair of tensors per layer.

    ``lengths[i]`` slots of layer ``i`` are filled; a layer reads ``past(i)`` (views, no copy) and writes its
    new keys and values right after them. Slot order is time order, so causality is by slot index. Layers
    may be filled to different lengths (a token that exited early has not reached the deeper ones yet).
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype):
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype) for _ in range(num_layers)]
        self.capacity = capacity
        self.lengths = [0] * num_layers
        # TokenDrop: layer -> [batch, prompt] True for the prompt slots whose tokens never reached that layer
        self.dropped: dict[int, torch.Tensor] = {}

    @classmethod
    def for_program(cls, program, batch: int, capacity: int) -> KVCache:
        info = program.info
        return cls(info.num_layers, batch, info.num_kv_heads, capacity, info.head_dim, info.torch_dtype)

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.lengths[layer]
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        start = self.lengths[layer]
        end = start + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {self.capacity}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        self.lengths[layer] = end

    def write_slots(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        slots: torch.Tensor,
        counts: torch.Tensor,
        length: int,
    ) -> None:
        """Prefill of a layer that saw only some prompt tokens: their keys and values go to their own slots
        ``slots [batch, n]`` of ``0..length-1`` where ``counts [batch, n]`` is True; every other slot is zero
        (and masked, see ``dropped``)."""
        index = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        keep = counts[:, None, :, None].to(k.dtype)
        for store, new in ((self.k[layer], k), (self.v[layer], v)):
            store[:, :, :length] = 0
            store[:, :, :length].scatter_(2, index, new * keep)
        self.lengths[layer] = length

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on, in every layer (rejected draft tokens)."""
        self.lengths = [min(n, length) for n in self.lengths]


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
    key_valid: torch.Tensor, q_start: int, q_len: int, windows, dtype
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


class MaskCache:
    """Masks for one step, built once per query start and shared by every layer that needs them."""

    def __init__(self, program, key_valid: torch.Tensor, dtype):
        self.windows = program.windows
        self.key_valid = key_valid
        self.dtype = dtype
        self._masks: dict[tuple[int, int], dict] = {}

    def get(self, q_start: int, q_len: int, window, dropped: torch.Tensor | None = None) -> torch.Tensor:
        """The mask for ``q_len`` queries from slot ``q_start``; ``dropped [batch, n]`` marks the first ``n``
        slots that this layer never saw (TokenDrop) as invalid keys."""
        key = (q_start, q_len, None if dropped is None else id(dropped))
        if key not in self._masks:
            valid = self.key_valid
            if dropped is not None:
                valid = valid.clone()
                valid[:, : dropped.shape[1]] &= ~dropped
            self._masks[key] = attention_masks(valid, q_start, q_len, self.windows, self.dtype)
        return self._masks[key][window]


def run_layers(program, cache: KVCache, layers, hidden, cos, sin, masks: MaskCache) -> torch.Tensor:
    """Run ``layers`` (stages) on new tokens that start at each layer's filled length; fill the cache."""
    q_len = hidden.shape[1]
    for stage in layers:
        i = stage.layer
        mask = masks.get(cache.lengths[i], q_len, stage.attrs.get("sliding_window"), cache.dropped.get(i))
        hidden, k, v = stage.graph(hidden, cos, sin, mask, *cache.past(i))
        cache.write(i, k, v)
    return hidden


def run_step(
    program,
    cache: KVCache,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    key_valid: torch.Tensor,
    *,
    last_only: bool = True,
    stats: dict | None = None,
) -> torch.Tensor:
    """Run embed, every layer (reading and filling ``cache``) and the head on ``input_ids``.

    ``key_valid`` covers every slot up to and including the new tokens. Returns logits of the last position
    (``[batch, vocab]``) or of all positions (``[batch, seq, vocab]``).
    """
    hidden, cos, sin = program.embed.graph(input_ids, position_ids)
    masks = MaskCache(program, key_valid, hidden.dtype)
    hidden = run_layers(program, cache, program.layers, hidden, cos, sin, masks)
    from .vocab import head_logits

    if last_only:
        return head_logits(program, hidden[:, -1:], stats)[:, -1]
    return head_logits(program, hidden, stats)


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
