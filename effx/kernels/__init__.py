"""effx's CPU kernels for the torch backend: products whose cost follows the bytes of weight they read.

torch's default float32 ``F.linear`` (MKL) reaches about a third of this kind of machine's read bandwidth
for one token and doubles in cost from one token to two (it repacks the weight for every multi-row
product). A decode step, a batch of decode steps and a verification of a few drafted tokens all multiply a
few rows of activations by every weight once, so they should cost what reading the weights costs. The
kernels here (``cpu.c``) do that on the weights' own row-major layout, on the CPUs users have: AVX-512,
AVX2 + FMA (x86-64), Advanced SIMD (aarch64), and portable C elsewhere (see :data:`ISAS`):

* :func:`linear`: ``x @ w.T (+ b)``; :func:`linear_many`: several products of one input in one parallel
  loop (a layer's q, k and v); :func:`linear_rows`: a product with a gathered subset of weight rows (a pruned
  exit's per-token vocabulary, without copying the rows);
* :func:`gated`: ``silu(x @ wg.T) * (x @ wu.T)``, the gated MLP's input side in one pass;
* :func:`rms_norm`, and the rotary embedding inside :func:`qkv_rope`.

Every product takes a float32 ``[n, k]`` weight or a quantized one, ``(q, scale, minimum)`` in
:mod:`effx.quant`'s format (4-bit, int8 or bfloat16 values), read directly and de-quantized in registers
exactly as :func:`effx.quant.dequantize` computes it: a quantized product equals the float product over the
de-quantized weight bit for bit (for k a multiple of 32). Quantized products of more than :data:`MAX_ROWS`
rows run as calls of :data:`MAX_ROWS` rows (the reference op would de-quantize the whole weight).

Numerics: float32 throughout, every output one dot product in a fixed order (16 lanes of fused
multiply-adds, then a fixed tree), so the kernels are batch invariant (a token's row is bitwise the same
computed alone or with others) and give the same bits on every target, but differ from MKL in the last bits
(about 1e-6 relative; tests bound the logits). Products of more than :data:`MAX_ROWS`
activation rows (a prefill) go to torch's ``F.linear``, which is compute-bound there and faster.

The library is compiled for the best target this CPU runs (:func:`isas`; ``EFFX_KERNELS=avx2`` or another
target's name forces one, ``EFFX_KERNELS=off`` none) with the C compiler (``$CC``, else ``cc``/``gcc``) at
first use into the effx cache directory (``<cache>/kernels``, which must be this user's and not writable by
others; a few seconds, once). Where it cannot be (no compiler, an x86 CPU without AVX2/FMA, not Linux),
:func:`available` is False, :func:`unavailable_reason` says why, and the torch backend runs the reference
ATen ops. :func:`describe` says which target runs, for reports and benchmarks.

Modules: :mod:`effx.kernels.build` (building and loading the library, the functions above),
:mod:`effx.kernels.weights` (how the kernels read a weight operand), :mod:`effx.kernels.lower` and
:mod:`effx.kernels.layer` (the torch backend's graphs on these kernels).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from ..quant import round_int8_reference
from . import build
from .build import ISAS, available, cpu_features, describe, isa, isas, unavailable_reason, use
from .weights import Weight, act8, dense, descriptor, plain, rows_of

__all__ = [
    "ISAS",
    "MAX_ROWS",
    "act8",
    "append_kv",
    "available",
    "cpu_features",
    "describe",
    "gated",
    "isa",
    "isas",
    "linear",
    "linear_many",
    "linear_rows",
    "qkv_rope",
    "rms_norm",
    "round_int8",
    "unavailable_reason",
    "use",
]

# products with more activation rows than this go to F.linear (a prefill is compute-bound, not memory-bound)
MAX_ROWS = 32


def _fits_x(x: torch.Tensor) -> bool:
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.dim() < 1:
        return False
    k = x.shape[-1]
    if k < 1 or x.numel() > MAX_ROWS * k:
        return False
    return not (torch.is_grad_enabled() and x.requires_grad)


def _chunked(x: torch.Tensor, weights) -> bool:
    """Whether a product is better run as kernel calls over ``MAX_ROWS`` rows at a time than by the
    reference op: quantized weights, which the reference op would de-quantize whole, and a float32 input of
    more rows than the kernels take at once (a prefill)."""
    return (
        any(isinstance(w, tuple) for w in weights)
        and build.library()[0] is not None
        and x.dtype == torch.float32
        and x.dim() >= 1
        and x.shape[-1] >= 1
        and x.numel() > MAX_ROWS * x.shape[-1]
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def _by_rows(fn, x: torch.Tensor, *args):
    """``fn(x, *args)`` computed ``MAX_ROWS`` rows of ``x`` at a time (fn is row-wise); fn returns one tensor
    or a tuple of them."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    parts = [fn(flat[i : i + MAX_ROWS], *args) for i in range(0, flat.shape[0], MAX_ROWS)]
    shape = x.shape[:-1]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(col).reshape(*shape, -1) for col in zip(*parts, strict=True))
    return torch.cat(parts).reshape(*shape, -1)


def _descs(x: torch.Tensor, weights, biases=()) -> list[Weight] | None:
    """The kernels' views of ``weights`` if the kernels take these operands (else None: the caller runs the
    reference op, which also raises the reference error for operands that do not fit together): a float32
    CPU input, contiguous, of at most ``MAX_ROWS`` rows of ``k >= 1`` values; weights as :func:`effx.kernels.weights.descriptor`
    takes them; ``[n]`` float32 biases or None; nothing that autograd must see (the kernels have no
    backward)."""
    if not _fits_x(x):
        return None
    grad = torch.is_grad_enabled()
    descs = []
    for w in weights:
        d = descriptor(w, x.shape[-1], grad)
        if d is None:
            return None
        descs.append(d)
    for w, b in zip(weights, biases, strict=False):  # no biases: ()
        if b is not None and (b.dim() != 1 or b.shape[0] != rows_of(w) or not plain(b, grad)):
            return None
    return descs


def _fits(x: torch.Tensor, weights, biases=()) -> bool:
    return _descs(x, weights, biases) is not None


def _int8_input(x: torch.Tensor, weights, biases, group: int):
    """How a product with int8 activations (``effx.round_int8(x, group)`` as its input) runs: ``(x, descs)``
    with the weights' integer-path descriptors where the kernels take them all, else ``(round_int8(x,
    group), None)``, the rounded input for the float path (what the unlowered graph computes)."""
    descs = _descs(x, weights, biases) if build.library()[0] is not None else None
    if descs is not None:
        twins = [act8(d, group) for d in descs]
        if all(t is not None for t in twins):
            return x, twins
    return round_int8(x, group), None


def _ptrs(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[0 if t is None else t.data_ptr() for t in tensors])


def linear_many(x: torch.Tensor, weights, biases=None, int8: int | None = None) -> tuple[torch.Tensor, ...]:
    """``F.linear(x, w, b)`` for each weight operand (and bias), computed in one parallel loop; ``int8``: the
    products take ``effx.round_int8(x, int8)`` (int8 activations: integer dot products where the kernels
    can, see :func:`act8`)."""
    biases = list(biases) if biases is not None else [None] * len(weights)
    lib = build.library()[0]
    descs = None
    if int8 is not None:
        x, descs = _int8_input(x, weights, biases, int8) if len(weights) <= 4 else (round_int8(x, int8), None)
    if descs is None:
        descs = None if lib is None or len(weights) > 4 else _descs(x, weights, biases)
    if descs is None:
        if _chunked(x, weights):
            return _by_rows(linear_many, x, weights, biases)
        k = x.shape[-1]
        return tuple(F.linear(x, dense(w, k), b) for w, b in zip(weights, biases, strict=True))
    k = x.shape[-1]
    m = x.numel() // k
    sizes = [rows_of(w) for w in weights]
    out = torch.empty(*x.shape[:-1], sum(sizes), dtype=x.dtype)
    total = sum(sizes)
    views, start = [], 0
    for n in sizes:
        views.append(out.narrow(-1, start, n))
        start += n
    lib.effx_linear_w(
        x.data_ptr(),
        m,
        k,
        k,
        len(weights),
        (Weight * len(descs))(*descs),
        _ptrs(biases),
        (ctypes.c_int * len(sizes))(*sizes),
        _ptrs(views),
        (ctypes.c_int * len(sizes))(*([total] * len(sizes))),
        torch.get_num_threads(),
    )
    return tuple(views)


def linear(
    x: torch.Tensor, weight, bias: torch.Tensor | None = None, int8: int | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; ``weight`` a float tensor or a quantized ``(q, scale, minimum)``;
    ``int8``: the product takes ``effx.round_int8(x, int8)`` (see :func:`linear_many`)."""
    lib = build.library()[0]
    k = x.shape[-1]
    descs = None
    if int8 is not None:
        x, descs = _int8_input(x, (weight,), (bias,), int8)
    if isinstance(weight, tuple):
        if descs is None:
            descs = None if lib is None else _descs(x, (weight,), (bias,))
        if descs is None:
            if _chunked(x, (weight,)):
                return _by_rows(linear, x, weight, bias)
            return F.linear(x, dense(weight, k), bias)
        n = rows_of(weight)
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
        lib.effx_qlinear(
            x.data_ptr(), x.numel() // k, k, ctypes.byref(descs[0]), None if bias is None else bias.data_ptr(),
            n, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out
    if lib is None or not _fits(x, (weight,), (bias,)):
        return F.linear(x, weight, bias)
    n = weight.shape[0]
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    lib.effx_linear1(
        x.data_ptr(), x.numel() // k, k, weight.data_ptr(), None if bias is None else bias.data_ptr(), n,
        out.data_ptr(), n, torch.get_num_threads(),
    )  # fmt: skip
    return out


def _take(w, ids):
    return (
        tuple(None if t is None else t.index_select(0, ids) for t in w)
        if isinstance(w, tuple)
        else (w.index_select(0, ids))
    )


def linear_rows(x: torch.Tensor, weight, ids: torch.Tensor, int8: int | None = None) -> torch.Tensor:
    """``F.linear(x, weight[ids])`` without gathering the rows: ``ids`` is a 1-D int64 tensor; ``int8``: the
    product takes ``effx.round_int8(x, int8)`` (see :func:`linear_many`)."""
    lib = build.library()[0]
    descs = None
    if int8 is not None:
        x, descs = _int8_input(x, (weight,), (), int8)
    if descs is None:
        descs = None if lib is None else _descs(x, (weight,))
    fits = descs is not None and ids.dtype == torch.int64 and ids.ndim == 1
    if not fits or (ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < rows_of(weight))):
        if descs is not None and descs[0].act8:  # the rounding the integer path would have done
            x = round_int8(x, int8)
        if _chunked(x, (weight,)) and ids.dtype == torch.int64 and ids.ndim == 1:
            return _by_rows(linear, x, _take(weight, ids))
        return F.linear(x, dense(_take(weight, ids), x.shape[-1]))
    ids = ids.contiguous()
    k = x.shape[-1]
    out = torch.empty(*x.shape[:-1], ids.shape[0], dtype=x.dtype)
    lib.effx_linear_rows_w(
        x.data_ptr(), x.numel() // k, k, ctypes.byref(descs[0]), ids.data_ptr(), ids.shape[0], out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def gated(x: torch.Tensor, w_gate, w_up, int8: int | None = None) -> torch.Tensor:
    """``silu(F.linear(x, w_gate)) * F.linear(x, w_up)``; ``int8``: the products take
    ``effx.round_int8(x, int8)`` (see :func:`linear_many`)."""
    lib = build.library()[0]
    descs = None
    if int8 is not None:
        x, descs = (
            _int8_input(x, (w_gate, w_up), (), int8)
            if rows_of(w_gate) == rows_of(w_up)
            else (round_int8(x, int8), None)
        )
    if descs is None:
        descs = None if lib is None or rows_of(w_gate) != rows_of(w_up) else _descs(x, (w_gate, w_up))
    if descs is None:
        if _chunked(x, (w_gate, w_up)) and rows_of(w_gate) == rows_of(w_up):
            return _by_rows(gated, x, w_gate, w_up)
        k = x.shape[-1]
        return F.silu(F.linear(x, dense(w_gate, k))) * F.linear(x, dense(w_up, k))
    k = x.shape[-1]
    n = rows_of(w_gate)
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    lib.effx_gated_w(
        x.data_ptr(), x.numel() // k, k, ctypes.byref(descs[0]), ctypes.byref(descs[1]), n, out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x**2, -1) + eps))`` over the last axis."""
    lib = build.library()[0]
    if (
        lib is None
        or not _fits(x, ())
        or weight.shape != x.shape[-1:]
        or not plain(weight, torch.is_grad_enabled())
    ):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    out = torch.empty_like(x)
    d = x.shape[-1]
    lib.effx_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // d, d, eps)
    return out


def round_int8(x: torch.Tensor, group: int) -> torch.Tensor:
    """:func:`effx.quant.round_int8_reference` (``x`` rounded per block to ``scale * int8``), bitwise."""
    lib = build.library()[0]
    if lib is None or not plain(x, torch.is_grad_enabled()) or x.dim() < 1 or x.shape[-1] < 1 or group < 1:
        return round_int8_reference(x, group)
    out = torch.empty_like(x)
    k = x.shape[-1]
    lib.effx_round_int8(x.data_ptr(), out.data_ptr(), x.numel() // k, k, group)
    return out


def append_kv(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``torch.cat([past, new], dim=2)`` for ``[batch, heads, slots, dim]`` keys or values, without copying
    ``past`` when it is the filled front of a larger buffer (the runtime's KV cache, whose slots after the
    filled ones are free): ``new`` is written into the slots right after ``past`` and the longer view of the
    buffer is returned. Anything else (``past`` not such a view, no room left) is a plain ``cat``."""
    if past.dim() == 4 and new.dim() == 4 and past.dtype == new.dtype and past.shape[2] > 0:
        b, h, n, d = past.shape
        s = new.shape[2]
        sb, sh, sn, sd = past.stride()
        room = past.untyped_storage().nbytes() // past.element_size() - past.storage_offset()
        last = (
            (b - 1) * sb + (h - 1) * sh + (n + s - 1) * sn + (d - 1) * sd
        )  # the extended view's last element
        if (
            sd == 1
            and sn == d
            and sh >= (n + s) * d
            and sb >= h * sh
            and last < room
            and new.shape[:2] == (b, h)
        ):
            out = past.as_strided((b, h, n + s, d), past.stride(), past.storage_offset())
            out[:, :, n:] = new
            return out
    return torch.cat([past, new], dim=2)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding on ``[batch, heads, seq, dim]`` with ``cos``/``sin`` ``[batch, seq, dim]``."""
    half = t.shape[-1] // 2
    rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return t * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def qkv_rope(x, wq, wk, wv, bq, bk, bv, cos, sin, head_dim: int, int8: int | None = None):
    """A Llama attention's input side: the q, k and v projections of ``x [batch, seq, hidden]`` as
    ``[batch, heads, seq, head_dim]`` views, with the rotary embedding (``cos``/``sin`` ``[batch, seq,
    head_dim]``) applied to q and k; the three products run as one parallel loop, the rope in place.
    ``int8``: the products take ``effx.round_int8(x, int8)`` (see :func:`linear_many`)."""
    batch, seq = x.shape[0], x.shape[1]
    lib = build.library()[0]
    descs = pending = None  # pending: int8 rounding the products still owe x (integer path descriptors)
    if int8 is not None:
        x, descs = _int8_input(x, (wq, wk, wv), (bq, bk, bv), int8)
        pending = int8 if descs is not None else None
    if descs is None:
        descs = None if lib is None or x.dim() != 3 else _descs(x, (wq, wk, wv), (bq, bk, bv))
    nq, nkv = rows_of(wq), rows_of(wk)
    fused = (
        descs is not None
        and head_dim % 2 == 0
        and nkv == rows_of(wv)
        and nq % head_dim == 0
        and nkv % head_dim == 0
        and all(plain(t, False) and tuple(t.shape) == (batch, seq, head_dim) for t in (cos, sin))
    )
    if not fused:
        q, k, v = linear_many(x, (wq, wk, wv), (bq, bk, bv), pending)
        q, k, v = (t.view(batch, seq, -1, head_dim).transpose(1, 2) for t in (q, k, v))
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v
    out = torch.empty(batch, seq, nq + 2 * nkv, dtype=x.dtype)
    lib.effx_qkv_rope_w(
        x.data_ptr(), batch * seq, x.shape[-1], (Weight * 3)(*descs),
        None if bq is None else bq.data_ptr(), None if bk is None else bk.data_ptr(),
        None if bv is None else bv.data_ptr(), nq, nkv, out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        head_dim, torch.get_num_threads(),
    )  # fmt: skip
    q, k, v = out.split((nq, nkv, nkv), dim=-1)
    return tuple(t.view(batch, seq, -1, head_dim).transpose(1, 2) for t in (q, k, v))
