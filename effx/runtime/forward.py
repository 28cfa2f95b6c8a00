"""The pieces of a forward pass over a plan's stages: KV cache, masks, positions, running layers.

Written once against the Python array API: the arrays are the backend's (torch tensors for
:class:`effx.runtime.torch_backend.TorchBackend`, numpy arrays for the ONNX Runtime backend). Every
function that takes a ``backend`` also takes a torch Program, which it runs on the torch backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from ..arrays import Array, Namespace, namespace, put_along_axis, take_along_axis
from ..errors import GenerationInputError
from ..plan import StageLike
from .backend import Backend
from .stats import DecodeStats

if TYPE_CHECKING:
    from ..program import Program

    # what the runtime's functions run on: a Backend, or a torch Program (run on the torch backend)
    BackendLike: TypeAlias = Backend | Program

__all__ = [
    "KVCache",
    "MaskCache",
    "as_backend",
    "attention_masks",
    "check_left_padded",
    "forward_logits",
    "layer_mask",
    "positions_from_mask",
    "run_layer_stages",
    "run_layers",
    "run_step",
]


def as_backend(obj: BackendLike) -> Backend:
    """``obj`` if it is a Backend, else the torch backend of a Program."""
    if isinstance(obj, Backend):
        return obj
    from .torch_backend import torch_backend

    return torch_backend(obj)


class KVCache:
    """A preallocated KV cache, one ``[batch, kv_heads, capacity, head_dim]`` pair of arrays per layer.

    ``lengths[i]`` slots of layer ``i`` are filled; a layer reads ``past(i)`` (views, no copy) and writes its
    new keys and values right after them. Slot order is time order, so causality is by slot index. Layers
    may be filled to different lengths (a token that exited early has not reached the deeper ones yet).
    ``xp`` is the array namespace (torch by default).
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: Any,
        *,
        xp: Namespace | None = None,
    ) -> None:
        if xp is None:
            import torch

            xp = namespace(torch.empty(0))
        self.xp = xp
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.capacity = capacity
        self.lengths = [0] * num_layers
        # TokenDrop: layer -> [batch, prompt] True for the prompt slots whose tokens never reached that layer
        self.dropped: dict[int, Array] = {}

    @classmethod
    def for_program(cls, program: BackendLike, batch: int, capacity: int) -> KVCache:
        """The cache of a Program (or a backend) for ``batch`` rows and ``capacity`` slots."""
        return as_backend(program).new_cache(batch, capacity)

    def past(self, layer: int) -> tuple[Array, Array]:
        n = self.lengths[layer]
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def write(self, layer: int, k: Array, v: Array) -> None:
        start = self.lengths[layer]
        end = start + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {self.capacity}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        self.lengths[layer] = end

    def write_slots(self, layer: int, k: Array, v: Array, slots: Array, counts: Array, length: int) -> None:
        """Prefill of a layer that saw only some prompt tokens: their keys and values go to their own slots
        ``slots [batch, n]`` of ``0..length-1`` where ``counts [batch, n]`` is True; every other slot is zero
        (and masked, see ``dropped``)."""
        xp = self.xp
        index = slots[:, None, :, None]
        keep = xp.astype(counts, k.dtype)[:, None, :, None]
        for store, new in ((self.k[layer], k), (self.v[layer], v)):
            store[:, :, :length] = 0
            put_along_axis(xp, store[:, :, :length], index, new * keep, axis=2)
        self.lengths[layer] = length

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on, in every layer (rejected draft tokens)."""
        self.lengths = [min(n, length) for n in self.lengths]

    def compact(self, start: int, index: Array) -> None:
        """Close holes: in every layer, the slots ``start + index[b, j]`` of each row ``b`` move, in order, to
        slots ``start + j``, and the cache is filled to ``start + index.shape[1]``. Every layer must be filled
        to one length (speculative decoding between rounds; its rows leave holes where they rejected drafts
        that other rows accepted)."""
        if len(set(self.lengths)) != 1:
            raise RuntimeError(f"KV cache compaction needs layers filled to one length, got {self.lengths}")
        end, count = self.lengths[0], index.shape[1]
        index = index[:, None, :, None]
        for store in (*self.k, *self.v):
            store[:, :, start : start + count] = take_along_axis(
                self.xp, store[:, :, start:end], index, axis=2
            )
        self.lengths = [start + count] * len(self.lengths)


def check_left_padded(attention_mask: Array) -> None:
    """Decoder-only generation needs left padding: each row is 0...0 1...1 with at least one 1."""
    xp = namespace(attention_mask)
    m = xp.astype(attention_mask, xp.int8) != 0
    mi = xp.astype(m, xp.int8)
    if not bool(xp.all(m[:, -1])) or bool(xp.any(mi[:, 1:] < mi[:, :-1])):
        raise GenerationInputError(
            "attention_mask must be left-padded (zeros, then ones, every row ending in a real token); "
            "set tokenizer.padding_side = 'left' before batching prompts"
        )


def positions_from_mask(attention_mask: Array) -> Array:
    """Position ids that count real tokens only (pads get 0; they are masked anyway)."""
    xp = namespace(attention_mask)
    return xp.clip(xp.cumulative_sum(xp.astype(attention_mask, xp.int64), axis=-1) - 1, min=0)


def attention_masks(
    key_valid: Array,
    q_start: int,
    q_len: int,
    windows: Iterable[int | None],
    dtype: Any,
    key_pos: Array | None = None,
) -> dict[int | None, Array]:
    """Additive masks ``[batch, 1, q_len, keys]`` by sliding window (None: full causal attention).

    ``key_valid[b, j]`` is False for padding slots; query ``i`` (slot ``q_start + i``) sees slot ``j`` when
    ``j <= q_start + i``, ``key_valid[b, j]``, and, with a window ``w``, ``j > q_start + i - w``. Where a
    row's slots are not its positions (speculative decoding leaves holes in a batch's cache), ``key_pos [batch,
    slots]`` gives each slot's position and the window counts positions instead: ``key_pos[b, j] >
    key_pos[b, q_start + i] - w``, as the model counts them.
    """
    xp = namespace(key_valid)
    keys = key_valid.shape[1]
    q = xp.arange(q_start, q_start + q_len)[:, None]
    k = xp.arange(keys)[None, :]
    causal = k <= q
    valid = key_valid[:, None, None, :]
    zero = xp.zeros((), dtype=dtype)
    neg = xp.full((), xp.finfo(dtype).min, dtype=dtype)
    out: dict[int | None, Array] = {}
    for w in windows:
        if w is None:
            allowed = causal[None, None]
        elif key_pos is None:
            allowed = (causal & (k > q - w))[None, None]
        else:
            kp = key_pos[:, :keys]
            qp = kp[:, q_start : q_start + q_len]
            allowed = (causal[None] & (kp[:, None, :] > qp[:, :, None] - w))[:, None]
        out[w] = xp.where(allowed & valid, zero, neg)
    return out


class MaskCache:
    """Masks for one step, built once per query start and shared by every layer that needs them;
    ``key_pos``: each slot's position, where slots are not positions (see :func:`attention_masks`)."""

    def __init__(
        self, program: BackendLike, key_valid: Array, dtype: Any, key_pos: Array | None = None
    ) -> None:
        self.windows = program.plan.windows
        self.key_valid = key_valid
        self.key_pos = key_pos
        self.dtype = dtype
        self._masks: dict[tuple[int, int, int | None], dict[int | None, Array]] = {}

    def get(self, q_start: int, q_len: int, window: int | None, dropped: Array | None = None) -> Array:
        """The mask for ``q_len`` queries from slot ``q_start``; ``dropped [batch, n]`` marks the first ``n``
        slots that this layer never saw (TokenDrop) as invalid keys."""
        key = (q_start, q_len, None if dropped is None else id(dropped))
        if key not in self._masks:
            valid = self.key_valid
            if dropped is not None:
                xp = namespace(valid)
                n = dropped.shape[1]
                valid = xp.concat([valid[:, :n] & ~dropped, valid[:, n:]], axis=1)
            self._masks[key] = attention_masks(valid, q_start, q_len, self.windows, self.dtype, self.key_pos)
        return self._masks[key][window]


def layer_mask(masks: MaskCache, cache: KVCache, stage: StageLike, q_len: int) -> Array:
    """The attention mask of ``q_len`` new tokens at the layer ``stage``: its fill length, attention window
    and dropped slots."""
    i = cast(int, stage.layer)  # a layer stage's layer
    return masks.get(cache.lengths[i], q_len, stage.attrs.get("sliding_window"), cache.dropped.get(i))


def run_layer_stages(
    backend: Backend,
    cache: KVCache,
    layers: Sequence[StageLike],
    hidden: Array,
    cos: Array,
    sin: Array,
    masks: MaskCache,
) -> Array:
    """Run ``layers`` one stage at a time (the default of :meth:`Backend.run_layers`)."""
    for stage in layers:
        i = cast(int, stage.layer)  # a layer stage's layer
        mask = layer_mask(masks, cache, stage, hidden.shape[1])
        hidden, k, v = backend.run(stage, hidden, cos, sin, mask, *cache.past(i))
        cache.write(i, k, v)
    return hidden


def run_layers(
    backend: BackendLike,
    cache: KVCache,
    layers: Sequence[StageLike],
    hidden: Array,
    cos: Array,
    sin: Array,
    masks: MaskCache,
) -> Array:
    """Run ``layers`` (stages) on new tokens that start at each layer's filled length; fill the cache."""
    return as_backend(backend).run_layers(cache, layers, hidden, cos, sin, masks)


def run_step(
    backend: BackendLike,
    cache: KVCache,
    input_ids: Array,
    position_ids: Array,
    key_valid: Array,
    *,
    last_only: bool = True,
    stats: DecodeStats | None = None,
    key_pos: Array | None = None,
    features: list[Array] | None = None,
) -> Array:
    """Run embed, every layer (reading and filling ``cache``) and the head on ``input_ids``.

    ``key_valid`` covers every slot up to and including the new tokens (``key_pos``, where given, their
    positions: see :func:`attention_masks`). Returns logits of the last position (``[batch, vocab]``) or of
    all positions (``[batch, seq, vocab]``); ``features``, where given, receives the last layer's output
    ``[batch, seq, hidden]`` (a draft branch reads it).
    """
    from .vocab import head_logits

    backend = as_backend(backend)
    plan = backend.plan
    hidden, cos, sin = backend.run(plan.embed, input_ids, position_ids)
    masks = MaskCache(backend, key_valid, backend.dtype, key_pos)
    hidden = backend.run_layers(cache, plan.layers, hidden, cos, sin, masks)
    if features is not None:
        features.append(hidden)
    if last_only:
        return head_logits(backend, hidden[:, -1:], stats)[:, -1]
    return head_logits(backend, hidden, stats)


def forward_logits(backend: BackendLike, input_ids: Array, attention_mask: Array | None = None) -> Array:
    """Logits ``[batch, seq, vocab]`` for every position: a full forward of the Program, no cache kept."""
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise GenerationInputError(
            f"input_ids must be [batch, seq] with seq >= 1, got shape {tuple(input_ids.shape)}"
        )
    backend = as_backend(backend)
    xp = backend.xp
    if attention_mask is None:
        attention_mask = xp.ones_like(input_ids)
    batch, seq = input_ids.shape
    cache = backend.new_cache(batch, seq)
    with backend.compute():
        return run_step(
            backend,
            cache,
            input_ids,
            positions_from_mask(attention_mask),
            xp.astype(attention_mask, xp.bool),
            last_only=False,
        )
