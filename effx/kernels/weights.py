"""How the kernels read a weight operand: the ``effx_weight`` descriptor of ``cpu.c`` (:class:`Weight`) made
once per weight tensor (:func:`descriptor`) for a float32 ``[n, k]`` tensor or effx.quant's ``(q, scale,
minimum)``, and the checks on the plain float32 tensors the kernels take (:func:`plain`).
"""

from __future__ import annotations

import ctypes
import weakref

import torch

from ..quant import dequantize

__all__ = ["Weight", "act8", "dense", "descriptor", "plain", "rows_of"]

_P = ctypes.c_void_p
_I = ctypes.c_int


class Weight(ctypes.Structure):
    """``effx_weight`` of cpu.c: how the kernels read a float32 or quantized weight."""

    _fields_ = [
        ("kind", _I), ("data", _P), ("scale", _P), ("min", _P),
        ("scale_f16", _I), ("gshift", _I), ("ngroups", _I), ("ld", _I), ("act8", _I),
    ]  # fmt: skip


_KIND = {torch.uint8: 4, torch.int8: 8, torch.bfloat16: 16}


def rows_of(w) -> int:
    """The output size of a weight operand: a float ``[n, k]`` tensor or a quantized ``(q, scale, minimum)``."""
    return (w[0] if isinstance(w, tuple) else w).shape[0]


def dense(w, k: int) -> torch.Tensor:
    """A weight operand as a float32 ``[n, k]`` tensor (de-quantized if it is quantized; see effx.quant)."""
    if not isinstance(w, tuple):
        return w
    return dequantize(*w, k)


# descriptors made once per weight tensor (a decode step asks for every weight's each time): keyed by the
# identity of the float weight or the quantized values (an entry leaves when that tensor dies), checked
# against the other tensors, k and the data pointer
_DESCS: dict[int, tuple] = {}


def descriptor(w, k: int, grad: bool) -> Weight | None:
    """The kernels' view of a weight operand, or None if they do not take it (then the caller runs the
    reference op): a contiguous float32 ``[n, k]`` tensor, or effx.quant's ``(q, scale, minimum)``."""
    parts = w if isinstance(w, tuple) else (w, None, None)
    if len(parts) != 3 or not isinstance(parts[0], torch.Tensor):
        return None
    if grad and any(t is not None and t.requires_grad for t in parts):
        return None
    key = parts[0]
    hit = _DESCS.get(id(key))
    if (
        hit is not None
        and hit[0]() is key
        and hit[1] == k
        and hit[2] is parts[1]
        and hit[3] is parts[2]
        and hit[4] == key.data_ptr()
    ):
        return hit[5]
    desc = _make_weight(w, k, grad)
    if desc is not None:
        ident = id(key)
        ref = weakref.ref(key, lambda _, i=ident: _DESCS.pop(i, None))
        _DESCS[ident] = (ref, k, parts[1], parts[2], key.data_ptr(), desc)
    return desc


def _make_weight(w, k: int, grad: bool) -> Weight | None:
    if not isinstance(w, tuple):
        if w.dim() != 2 or w.shape[1] != k or not plain(w, grad):
            return None
        return Weight(0, w.data_ptr(), None, None, 0, 0, 0, k)
    q, scale, minimum = w
    kind = _KIND.get(q.dtype)
    if kind is None or q.dim() != 2 or q.device.type != "cpu" or not q.is_contiguous():
        return None
    kp = q.shape[1] * (2 if kind == 4 else 1)
    if kp < k or kp % 32:
        return None
    if kind == 16:
        if scale is not None or minimum is not None:
            return None
        return Weight(16, q.data_ptr(), None, None, 0, 0, 0, q.shape[1])
    for t in (scale, minimum):
        if t is None:
            continue
        if (
            t.dtype not in (torch.float16, torch.float32)
            or t.dtype != scale.dtype
            or t.shape != scale.shape
            or t.dim() != 2
            or t.shape[0] != q.shape[0]
            or not t.is_contiguous()
            or t.device.type != "cpu"
            or (grad and t.requires_grad)
        ):
            return None
    if scale is None or scale.shape[1] == 0 or kp % scale.shape[1]:
        return None
    group = kp // scale.shape[1]
    if group < 16 or group & (group - 1):
        return None
    return Weight(
        kind, q.data_ptr(), scale.data_ptr(), None if minimum is None else minimum.data_ptr(),
        int(scale.dtype == torch.float16), group.bit_length() - 1, scale.shape[1], q.shape[1],
    )  # fmt: skip


def act8(desc: Weight, group: int) -> Weight | None:
    """``desc`` multiplying int8 activations rounded per ``group`` values in integer arithmetic (see
    ``cpu.c``), or None where the kernels cannot: a float or bf16 weight, or a group other than the weight's
    own or below 32. Made once per descriptor."""
    if desc.kind not in (4, 8) or group < 32 or 1 << desc.gshift != group:
        return None
    twin = getattr(desc, "twin", None)
    if twin is None:
        twin = desc.twin = Weight.from_buffer_copy(desc)
        twin.act8 = 1
    return twin


def plain(t: torch.Tensor, grad: bool) -> bool:
    """Whether the kernels take ``t`` as it is: a contiguous float32 CPU tensor that autograd need not see
    (``grad``: whether grad mode is on; the kernels have no backward)."""
    return (
        t.dtype == torch.float32
        and t.device.type == "cpu"
        and t.is_contiguous()
        and not (grad and t.requires_grad)
    )
