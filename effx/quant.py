"""Quantized weights: effx's storage format, its two graph ops, round-to-nearest quantization, GGUF import.

A quantized ``[n, k]`` weight is up to three tensors, ``(q, scale, minimum)``:

* ``q``: the values. 4 bits: ``uint8 [n, kp / 2]``, two values per byte; in every block of 32 values, byte
  ``j`` holds value ``j`` in its low nibble and value ``j + 16`` in its high nibble (GGUF's Q4_0/Q4_1
  order). 8 bits: ``int8 [n, kp]``. ``bfloat16 [n, kp]``: bf16 storage, no scale.
* ``scale`` and ``minimum``: ``float16`` or ``float32`` ``[n, kp / group]``, one per ``group`` values
  (a power of two, at least 16); ``minimum`` may be None.
* ``kp`` is ``k`` rounded up to a multiple of 32 and of ``group``; padded values are zeros.

A value ``u`` stands for the weight::

    4 bits with a minimum:   scale * u + minimum       (u in 0..15; GGUF Q4_1, Q4_K)
    4 bits, symmetric:       scale * (u - 8)           (GGUF Q4_0)
    8 bits with a minimum:   scale * u + minimum       (u in -128..127; GGUF Q5_1)
    8 bits, symmetric:       scale * u                 (GGUF Q8_0, Q5_0, Q6_K with group 16)
    bfloat16:                float(u)

computed in float32 in exactly this order (a product, then a sum): it is how ``gguf`` de-quantizes, so a
weight imported from a GGUF file de-quantizes bitwise to the float32 weight transformers loads from it.

Graphs hold quantized weights through three ops, registered with ``torch.library`` so that fx, ``torch.export``
and the ONNX exporter see them as ordinary operators:

* ``torch.ops.effx.qlinear(x, q, scale, minimum, bias)``: ``F.linear(x, dequantize(...), bias)``;
* ``torch.ops.effx.round_int8(x, group)``: the input of a product with int8 activations
  (``quantize{activations=int8}``), rounded per block to ``scale * int8``;
* ``torch.ops.effx.qembedding(ids, q, scale, minimum, k)``: the de-quantized rows ``ids`` of an embedding.

Their reference implementations de-quantize and run the float op (exact, and slow: the whole weight every
call); the torch backend's fast kernels (:mod:`effx.kernels`) read the quantized bytes directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import PassConfigError

__all__ = [
    "GGUF_EXACT",
    "QWeight",
    "dequantize",
    "gguf_weights",
    "pack4",
    "quantize_rtn",
    "unpack4",
]

BLOCK = 32


def _padded(k: int, group: int) -> int:
    step = max(BLOCK, group)
    return -(-k // step) * step


def pack4(u: torch.Tensor) -> torch.Tensor:
    """``uint8 [n, kp]`` values in 0..15 (kp a multiple of 32) -> ``uint8 [n, kp / 2]`` in effx's nibble order."""
    n, kp = u.shape
    blocks = u.reshape(n, kp // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, kp // 2).contiguous()


def unpack4(q: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack4`: ``uint8 [n, kp]`` values in 0..15."""
    n, half = q.shape
    blocks = q.reshape(n, half // (BLOCK // 2), 1, BLOCK // 2)
    return torch.cat([blocks & 15, blocks >> 4], dim=2).reshape(n, half * 2)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor | None, minimum: torch.Tensor | None, k: int
) -> torch.Tensor:
    """The float32 ``[n, k]`` weight that ``(q, scale, minimum)`` stands for (see the module docstring)."""
    if q.dtype == torch.bfloat16:
        return q[:, :k].float().contiguous()
    if q.dtype == torch.uint8:
        u = unpack4(q).float()
        if minimum is None:
            u = u - 8.0
    elif q.dtype == torch.int8:
        u = q.float()
    else:
        raise TypeError(f"quantized values are uint8 (4-bit), int8 or bfloat16, not {q.dtype}")
    n, kp = u.shape
    group = kp // scale.shape[1]
    w = u.view(n, -1, group) * scale.float().unsqueeze(-1)
    if minimum is not None:
        w = w + minimum.float().unsqueeze(-1)
    w = w.reshape(n, kp)
    return w if k == kp else w[:, :k].contiguous()


@torch.library.custom_op("effx::qlinear", mutates_args=())
def qlinear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor | None,
    minimum: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``F.linear(x, dequantize(q, scale, minimum, k), bias)`` with ``k = x.shape[-1]``."""
    return F.linear(x, dequantize(q, scale, minimum, x.shape[-1]).to(x.dtype), bias)


@qlinear.register_fake
def _(x, q, scale, minimum, bias):
    return x.new_empty(*x.shape[:-1], q.shape[0])


def round_int8_reference(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` rounded per block of ``group`` values along its last axis to ``scale * int8``, scale the block's
    largest magnitude / 127 (a block of zeros stays zero); the last axis is padded with zeros to whole
    blocks for the rounding. The input that int8 activations multiply (:data:`effx.plan.ACTIVATIONS`)."""
    k = x.shape[-1]
    kp = -(-k // group) * group
    blocks = F.pad(x.float(), (0, kp - k)).reshape(*x.shape[:-1], kp // group, group)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    out = torch.where(scale > 0, torch.round(blocks / safe) * scale, torch.zeros_like(blocks))
    return out.reshape(*x.shape[:-1], kp)[..., :k].to(x.dtype)


@torch.library.custom_op("effx::round_int8", mutates_args=())
def round_int8(x: torch.Tensor, group: int) -> torch.Tensor:
    """:func:`round_int8_reference` (the torch backend's kernels run it in C)."""
    return round_int8_reference(x, group)


@round_int8.register_fake
def _(x, group):
    return torch.empty_like(x)


@torch.library.custom_op("effx::qembedding", mutates_args=())
def qembedding(
    ids: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None, minimum: torch.Tensor | None, k: int
) -> torch.Tensor:
    """The rows ``ids`` of the embedding ``dequantize(q, scale, minimum, k)``: ``[*ids.shape, k]``, float32."""
    flat = ids.reshape(-1)
    rows = dequantize(
        q.index_select(0, flat),
        None if scale is None else scale.index_select(0, flat),
        None if minimum is None else minimum.index_select(0, flat),
        k,
    )
    return rows.reshape(*ids.shape, k)


@qembedding.register_fake
def _(ids, q, scale, minimum, k):
    return torch.empty(*ids.shape, k, dtype=torch.float32, device=ids.device)


@dataclass(frozen=True)
class QWeight:
    """One quantized weight: its tensors, its float shape and where its values came from."""

    q: torch.Tensor
    scale: torch.Tensor | None
    minimum: torch.Tensor | None
    k: int
    origin: str  # "rtn int4 g32 asym", "gguf Q4_1", "bf16", ...

    @property
    def bits(self) -> int:
        return {torch.uint8: 4, torch.int8: 8, torch.bfloat16: 16}[self.q.dtype]

    @property
    def group(self) -> int | None:
        if self.scale is None:
            return None
        kp = self.q.shape[1] * (2 if self.q.dtype == torch.uint8 else 1)
        return kp // self.scale.shape[1]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return self.q, self.scale, self.minimum

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.minimum, self.k)

    def rows(self, ids: torch.Tensor) -> QWeight:
        """The rows ``ids`` (exact: rows are quantized independently)."""
        pick = lambda t: None if t is None else t.index_select(0, ids).contiguous()  # noqa: E731
        return QWeight(pick(self.q), pick(self.scale), pick(self.minimum), self.k, self.origin)


def quantize_rtn(w: torch.Tensor, bits: int, group: int = 32, *, symmetric: bool = False,
                 scale_dtype: torch.dtype = torch.float16) -> QWeight:  # fmt: skip
    """Round-to-nearest weight-only quantization of a float ``[n, k]`` weight, one scale (and minimum, unless
    ``symmetric``) per ``group`` values of a row. ``bits=16`` stores bfloat16. The scales are rounded to
    ``scale_dtype`` first and the values quantized against the rounded scales."""
    if w.dim() != 2:
        raise ValueError(f"quantize a 2-D weight, not {tuple(w.shape)}")
    n, k = w.shape
    w = w.detach().float()
    if bits == 16:
        kp = _padded(k, BLOCK)
        return QWeight(F.pad(w, (0, kp - k)).to(torch.bfloat16).contiguous(), None, None, k, "bf16")
    if bits not in (4, 8):
        raise PassConfigError(f"quantize: bits must be 4, 8 or 16 (bfloat16), got {bits}")
    if group < 16 or group & (group - 1):
        raise PassConfigError(f"quantize: group must be a power of two >= 16, got {group}")
    kp = _padded(k, group)
    blocks = F.pad(w, (0, kp - k)).view(n, kp // group, group)
    if symmetric:
        # the value of largest magnitude maps to the grid's end (-8 or -128), as GGUF's Q4_0 / Q8_0 do
        top = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
        d = (top / -8.0 if bits == 4 else blocks.abs().amax(-1) / 127.0).to(scale_dtype).float()
        inv = torch.where(d == 0, 0.0, 1.0 / d).unsqueeze(-1)
        if bits == 4:
            u = (blocks * inv + 8.0).round().clamp(0, 15).to(torch.uint8)
            q = pack4(u.view(n, kp))
        else:
            q = (blocks * inv).round().clamp(-127, 127).to(torch.int8).view(n, kp)
        return QWeight(q.contiguous(), d.to(scale_dtype), None, k, f"rtn int{bits} g{group} sym")
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    levels = 15.0 if bits == 4 else 255.0
    d = ((hi - lo) / levels).to(scale_dtype).float()
    offset = 0.0 if bits == 4 else 128.0  # 8-bit values are signed: u = level - 128
    m = (lo + offset * d).to(scale_dtype).float()
    inv = torch.where(d == 0, 0.0, 1.0 / d).unsqueeze(-1)
    u = ((blocks - m.unsqueeze(-1)) * inv).round()
    if bits == 4:
        q = pack4(u.clamp(0, 15).to(torch.uint8).view(n, kp))
    else:
        q = u.clamp(-128, 127).to(torch.int8).view(n, kp)
    return QWeight(q.contiguous(), d.to(scale_dtype), m.to(scale_dtype), k, f"rtn int{bits} g{group} asym")


# -- GGUF ---------------------------------------------------------------------------------------------------

# GGUF types whose values effx keeps exactly, and the form they take
GGUF_EXACT = {
    "Q4_0": "4-bit symmetric, group 32, float16 scales",
    "Q4_1": "4-bit with minimum, group 32, float16 scales and minimums",
    "Q8_0": "8-bit symmetric, group 32, float16 scales",
    "Q5_0": "8-bit symmetric, group 32, float16 scales (5-bit values widened to 8 bits)",
    "Q5_1": "8-bit with minimum, group 32, float16 scales and minimums (5-bit values widened to 8 bits)",
    "Q4_K": "4-bit with minimum, group 32, float32 scales and minimums (super-block scale x 6-bit scale)",
    "Q6_K": "8-bit symmetric, group 16, float32 scales (6-bit values widened to 8 bits)",
}


def _q4_values(qs: np.ndarray, chunk: int) -> np.ndarray:
    """4-bit values of GGUF nibble bytes ``[blocks, bytes]``: in every ``chunk`` bytes, the low nibbles are
    values 0..chunk-1 and the high nibbles the next ``chunk``."""
    b = qs.reshape(qs.shape[0], -1, 1, chunk) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (b & 15).reshape(qs.shape[0], -1)


def _gguf_parts(kind: str, blocks: np.ndarray):
    """``(values [blocks, per block], scales [blocks, groups], minimums or None, group, scale dtype)`` of one
    GGUF tensor's raw blocks (``uint8 [blocks, block bytes]``)."""
    n = blocks.shape[0]
    if kind in ("Q4_0", "Q4_1", "Q8_0"):
        d = blocks[:, :2].copy().view(np.float16)
        if kind == "Q8_0":
            return blocks[:, 2:].copy().view(np.int8), d, None, 32, np.float16
        if kind == "Q4_0":
            return _q4_values(blocks[:, 2:], 16), d, None, 32, np.float16
        m = blocks[:, 2:4].copy().view(np.float16)
        return _q4_values(blocks[:, 4:], 16), d, m, 32, np.float16
    if kind in ("Q5_0", "Q5_1"):  # d (, m), 32 high bits, 16 nibble bytes: values 0..31
        d = blocks[:, :2].copy().view(np.float16)
        m = blocks[:, 2:4].copy().view(np.float16) if kind == "Q5_1" else None
        rest = blocks[:, 2:] if m is None else blocks[:, 4:]
        high = rest[:, :4].copy().view(np.uint32) >> np.arange(32, dtype=np.uint32).reshape(1, 32)
        q = _q4_values(rest[:, 4:], 16).astype(np.int8) | ((high & 1).astype(np.int8) << 4)
        return (q - np.int8(16) if m is None else q), d, m, 32, np.float16
    from gguf.quants import Q4_K

    if kind == "Q4_K":
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
        scale = (d * sc.reshape(n, -1).astype(np.float32)).astype(np.float32)
        minimum = -(dmin * m.reshape(n, -1).astype(np.float32))
        return _q4_values(blocks[:, 16:], 32), scale, minimum, 32, np.float32
    if kind == "Q6_K":
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        scales = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
        d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
        low = (ql.reshape(n, -1, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 15
        high = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
        q = (low.reshape(n, -1, 32) | (high.reshape(n, -1, 32) << 4)).astype(np.int8) - np.int8(32)
        return q.reshape(n, -1), (d * scales).astype(np.float32), None, 16, np.float32
    raise KeyError(kind)


def _from_gguf(kind: str, data: np.ndarray, rows: int, k: int) -> QWeight:
    """A GGUF tensor's raw bytes (``rows`` rows of ``k`` values) as an effx QWeight, exactly."""
    per_row = k // _block_size(kind)
    blocks = np.ascontiguousarray(data).reshape(rows * per_row, -1)
    values, scale, minimum, group, sdt = _gguf_parts(kind, blocks)
    values = values.reshape(rows, k)
    scale = np.ascontiguousarray(scale.reshape(rows, -1).astype(sdt))
    minimum = None if minimum is None else np.ascontiguousarray(minimum.reshape(rows, -1).astype(sdt))
    if kind in ("Q4_0", "Q4_1", "Q4_K"):
        q = pack4(torch.from_numpy(np.ascontiguousarray(values.astype(np.uint8))))
    else:
        q = torch.from_numpy(np.ascontiguousarray(values.astype(np.int8)))
    return QWeight(
        q,
        torch.from_numpy(scale),
        None if minimum is None else torch.from_numpy(minimum),
        k,
        f"gguf {kind}",
    )


def _block_size(kind: str) -> int:
    return 256 if kind.endswith("_K") else 32


@dataclass
class GGUFTensor:
    name: str
    kind: str
    rows: int
    k: int
    data: np.ndarray  # raw bytes, [rows, row bytes]

    def weight(self) -> QWeight:
        return _from_gguf(self.kind, self.data, self.rows, self.k)

    def dequantized(self) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        out = gguf_dequantize(self.data, GGMLQuantizationType[self.kind])
        return np.asarray(out, dtype=np.float32).reshape(self.rows, self.k)


def gguf_weights(path) -> list[GGUFTensor]:
    """The 2-D tensors of a GGUF file, with their raw quantized bytes (memory-mapped)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = []
    for t in reader.tensors:
        shape = [int(s) for s in t.shape]
        if len(shape) != 2:
            continue
        k, rows = shape  # GGUF lists the fastest axis first
        out.append(GGUFTensor(t.name, t.tensor_type.name, rows, k, np.asarray(t.data).reshape(rows, -1)))
    return out
