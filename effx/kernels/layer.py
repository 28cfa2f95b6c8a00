"""A whole decoder layer in one kernel call: the torch backend's decode step without per-op dispatch.

A lowered Llama-family layer graph (:func:`effx.kernels.lower.lower_graph`) still makes about 15 calls
(norms, products, two cache appends, attention, reshapes, residual adds) and 27 attribute lookups per layer
and step; with 30 layers that Python and dispatch work cost about as much as the quantized products
themselves. :func:`fuse_layer` recognizes exactly that lowered graph::

    h = rms_norm(hidden); q, k, v = qkv_rope(h, wq, wk, wv, ...); append_kv(past_k, k); append_kv(past_v, v)
    a = sdpa(q, k_all, v_all, mask, scale, gqa); x2 = hidden + linear(a, wo)
    out = x2 + linear(gated(rms_norm(x2), wg, wu), wd)                -> (out, k, v)

and returns a :class:`FusedLayer` that runs it as one call of ``effx_layer`` (``cpu.c``): the same kernels
in the same order (so the same bits) for every product, norm and residual add, and its own attention (scores
in key order, softmax with the largest score subtracted, the weighted sum of values in key order: float32,
batch invariant, within float rounding of torch's SDPA). Anything else (another graph, inputs the kernels do
not take: a prefill of more than :data:`effx.kernels.MAX_ROWS` tokens, a cache that is not a buffer with
room after the filled slots) runs the lowered graph itself.
"""

from __future__ import annotations

import ctypes
import operator

import torch

from . import MAX_ROWS, append_kv, build, gated, linear, qkv_rope, rms_norm
from .weights import Weight, act8, descriptor, plain, rows_of

__all__ = ["PREFILL_ROWS", "FusedLayer", "FusedStack", "fuse_layer", "fuse_stack"]

#: The most new tokens a fused layer of quantized weights takes in one call (a longer prefill runs the
#: lowered graph).
PREFILL_ROWS = 512

aten = torch.ops.aten
_P = ctypes.c_void_p


class _Params(ctypes.Structure):
    """``effx_layer_params`` of cpu.c."""

    _fields_ = [
        ("D", ctypes.c_int), ("nq", ctypes.c_int), ("nkv", ctypes.c_int), ("hd", ctypes.c_int),
        ("F", ctypes.c_int), ("eps1", ctypes.c_float), ("eps2", ctypes.c_float), ("scale", ctypes.c_float),
        ("norm1", _P), ("norm2", _P),
        ("wq", Weight), ("wk", Weight), ("wv", Weight), ("wo", Weight), ("wg", Weight), ("wu", Weight),
        ("wd", Weight),
        ("bq", _P), ("bk", _P), ("bv", _P), ("bo", _P),
    ]  # fmt: skip


def _is(node, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target


def _value(gm, arg):
    """A graph argument as a value: a ``get_attr`` node's tensor, a tuple of them, or a constant."""
    if isinstance(arg, torch.fx.Node):
        if arg.op != "get_attr":
            raise _NoMatch(f"{arg} is not a stored tensor")
        obj = gm
        for part in arg.target.split("."):
            obj = getattr(obj, part)
        return obj
    if isinstance(arg, tuple):
        return tuple(_value(gm, a) for a in arg)
    return arg


class _NoMatch(Exception):
    pass


def _match(gm: torch.fx.GraphModule) -> dict:
    """The weights and sizes of a lowered layer graph of exactly the fused form, else :class:`_NoMatch`."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not aten.sym_size.int]
    holders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    if list(holders) != ["hidden", "cos", "sin", "mask", "past_k", "past_v"]:
        raise _NoMatch("not a layer stage's inputs")
    expected = [
        rms_norm, qkv_rope, operator.getitem, operator.getitem, operator.getitem, append_kv, append_kv,
        aten.scaled_dot_product_attention.default, aten.transpose.int, aten.reshape.default, linear,
        aten.add.Tensor, rms_norm, gated, linear, aten.add.Tensor,
    ]  # fmt: skip
    if [n.target for n in nodes] != expected:
        raise _NoMatch("another sequence of calls")
    norm1, qkv, q, k, v, ak, av, sdpa, tr, rs, lo, add1, norm2, gt, ld, add2 = nodes
    hidden = holders["hidden"]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    checks = [
        norm1.args[0] is hidden,
        qkv.args[0] is norm1 and qkv.args[7] is holders["cos"] and qkv.args[8] is holders["sin"],
        [a.args for a in (q, k, v)] == [(qkv, 0), (qkv, 1), (qkv, 2)],
        ak.args == (holders["past_k"], k) and av.args == (holders["past_v"], v),
        sdpa.args == (q, ak, av, holders["mask"]),
        set(sdpa.kwargs) <= {"scale", "enable_gqa"} and sdpa.kwargs.get("scale") is not None,
        tr.args == (sdpa, 1, 2) and rs.args[0] is tr,
        lo.args[0] is rs and add1.args == (hidden, lo),
        norm2.args[0] is add1 and gt.args[0] is norm2 and ld.args[0] is gt and add2.args == (add1, ld),
        len(ld.args) < 3 or ld.args[2] is None,
        tuple(out) == (add2, k, v),
    ]
    if not all(checks):
        raise _NoMatch("the calls are not wired as a decoder layer")
    wq, wk, wv, bq, bk, bv = (_value(gm, a) for a in qkv.args[1:7])
    head_dim = qkv.args[9]
    values = {
        "norm1": _value(gm, norm1.args[1]), "eps1": norm1.args[2],
        "norm2": _value(gm, norm2.args[1]), "eps2": norm2.args[2],
        "wq": wq, "wk": wk, "wv": wv, "bq": bq, "bk": bk, "bv": bv,
        "wo": _value(gm, lo.args[1]), "bo": _value(gm, lo.args[2]) if len(lo.args) > 2 else None,
        "wg": _value(gm, gt.args[1]), "wu": _value(gm, gt.args[2]), "wd": _value(gm, ld.args[1]),
        "hd": head_dim, "scale": float(sdpa.kwargs["scale"]),
    }  # fmt: skip
    # int8 activations (lower.py's int8=group): the products whose kernels round their input themselves
    values["int8"] = {
        name: node.kwargs.get("int8")
        for node, names in ((qkv, ("wq", "wk", "wv")), (lo, ("wo",)), (gt, ("wg", "wu")), (ld, ("wd",)))
        for name in names
    }
    if any(set(node.kwargs) - {"int8"} for node in (qkv, lo, gt, ld)):
        raise _NoMatch("products with other keyword arguments")
    return values


class FusedLayer(torch.nn.Module):
    """A layer stage as one ``effx_layer`` call; :attr:`graph_module` (the lowered graph) runs what the
    kernel does not take."""

    def __init__(self, graph_module: torch.fx.GraphModule, values: dict):
        super().__init__()
        self.graph_module = graph_module
        self.values = values  # keeps every tensor the descriptors point into alive
        norm1 = values["norm1"]
        self.D = norm1.shape[0]
        self.nq, self.nkv = rows_of(values["wq"]), rows_of(values["wk"])
        self.F = rows_of(values["wg"])
        self.hd = values["hd"]
        ok = (
            all(plain(values[n], False) and values[n].shape == (self.D,) for n in ("norm1", "norm2"))
            and rows_of(values["wv"]) == self.nkv
            and rows_of(values["wu"]) == self.F
            and rows_of(values["wo"]) == self.D
            and rows_of(values["wd"]) == self.D
            and self.hd % 2 == 0
            and self.nq % self.hd == 0
            and self.nkv % self.hd == 0
            and (self.nq // self.hd) % (self.nkv // self.hd) == 0
            and all(
                values[b] is None or (plain(values[b], False) and values[b].shape == (rows,))
                for b, rows in (("bq", self.nq), ("bk", self.nkv), ("bv", self.nkv), ("bo", self.D))
            )
        )
        descs = {}
        for name, k in (("wq", self.D), ("wk", self.D), ("wv", self.D), ("wo", self.nq), ("wg", self.D),
                        ("wu", self.D), ("wd", self.F)):  # fmt: skip
            descs[name] = descriptor(values[name], k, False) if ok else None
            group = values["int8"][name]
            if group is not None and descs[name] is not None:
                descs[name] = act8(descs[name], group)  # None (not fused) where the kernels cannot
        self.params = None
        # a prefill of more rows than MAX_ROWS: float32 weights go to F.linear (the lowered graph), faster
        # there; quantized ones would run as kernel calls of MAX_ROWS rows anyway, so they stay fused
        quantized = ok and all(d is not None and d.kind != 0 for d in descs.values())
        self.max_rows = PREFILL_ROWS if quantized else MAX_ROWS
        if ok and all(d is not None for d in descs.values()):
            ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
            self.params = _Params(
                self.D, self.nq, self.nkv, self.hd, self.F, values["eps1"], values["eps2"], values["scale"],
                ptr(values["norm1"]), ptr(values["norm2"]), *(descs[n] for n in ("wq", "wk", "wv", "wo", "wg", "wu", "wd")),
                ptr(values["bq"]), ptr(values["bk"]), ptr(values["bv"]), ptr(values["bo"]),
            )  # fmt: skip

    def forward(self, hidden, cos, sin, mask, past_k, past_v):
        lib = build.library()[0]
        if self.params is None or lib is None or not self._fits(hidden, cos, sin, mask, past_k, past_v):
            return self.graph_module(hidden, cos, sin, mask, past_k, past_v)
        batch, seq, _ = hidden.shape
        m = batch * seq
        past = past_k.shape[2]
        work = torch.empty(lib.effx_layer_work(ctypes.byref(self.params), m))  # per call: threads may share
        qkv = torch.empty(batch, seq, self.nq + 2 * self.nkv)
        out = torch.empty_like(hidden)
        cap = past_k.stride(1) // self.hd
        lib.effx_layer(
            ctypes.byref(self.params), hidden.data_ptr(), batch, seq, cos.data_ptr(), sin.data_ptr(),
            _base(past_k), _base(past_v), cap, past, mask.data_ptr(),
            mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2), qkv.data_ptr(), work.data_ptr(),
            out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        _, k, v = qkv.split((self.nq, self.nkv, self.nkv), dim=-1)
        heads = self.nkv // self.hd
        return (
            out,
            k.view(batch, seq, heads, self.hd).transpose(1, 2),
            v.view(batch, seq, heads, self.hd).transpose(1, 2),
        )

    def _fits(self, hidden, cos, sin, mask, past_k, past_v) -> bool:
        if torch.is_grad_enabled() or hidden.dim() != 3 or not plain(hidden, False):
            return False
        batch, seq, d = hidden.shape
        if d != self.D or batch * seq > self.max_rows or batch * seq == 0:
            return False
        if not all(plain(t, False) and tuple(t.shape) == (batch, seq, self.hd) for t in (cos, sin)):
            return False
        heads = self.nkv // self.hd
        past = past_k.shape[2] if past_k.dim() == 4 else -1
        for c in (past_k, past_v):  # a view of the filled front of a [batch, heads, capacity, hd] buffer
            if (
                c.dtype != torch.float32
                or c.device.type != "cpu"
                or tuple(c.shape) != (batch, heads, past, self.hd)
            ):
                return False
            cap = c.stride(1) // self.hd
            if c.stride() != (heads * cap * self.hd, cap * self.hd, self.hd, 1) or past + seq > cap:
                return False
            room = c.untyped_storage().nbytes() // 4 - c.storage_offset()
            if room < batch * heads * cap * self.hd:
                return False
        if past_k.stride() != past_v.stride():
            return False
        if (
            mask.dtype != torch.float32
            or mask.dim() != 4
            or mask.shape[1] != 1
            or mask.shape[0] not in (1, batch)
            or tuple(mask.shape[2:]) != (seq, past + seq)
            or mask.stride(3) != 1
        ):
            return False
        return True


class FusedStack:
    """Consecutive :class:`FusedLayer` s as one ``effx_layers`` call: a decode step returns to Python once
    for all of them, not once per layer (see :func:`fuse_stack`)."""

    def __init__(self, layers: list[FusedLayer]):
        self.layers = layers
        self.max_rows = min(f.max_rows for f in layers)
        self.widest = max(layers, key=lambda f: f.F)  # the most work space (effx_layer_work grows with F)
        self.params = (ctypes.c_void_p * len(layers))(*(ctypes.addressof(f.params) for f in layers))

    def __call__(self, hidden, cos, sin, mask, ks, vs, past: int) -> torch.Tensor | None:
        """The last layer's output for new tokens ``hidden`` after ``past`` filled slots of the caches ``ks``
        and ``vs`` (per layer, a whole ``[batch, heads, capacity, head_dim]`` buffer; each layer's new keys and
        values are written after its filled slots), every layer with ``mask``; None where the kernels do not
        take these inputs (nothing is written then: the caller runs the layers one at a time)."""
        lib = build.library()[0]
        first = self.layers[0]
        if lib is None or len(ks) != len(self.layers) or len(vs) != len(self.layers):
            return None
        buffer = ks[0]
        if (
            not all(
                t.dtype == torch.float32
                and t.device.type == "cpu"
                and t.shape == buffer.shape
                and t.is_contiguous()
                for t in (*ks, *vs)
            )
            or buffer.dim() != 4
        ):
            return None
        if not first._fits(hidden, cos, sin, mask, buffer[:, :, :past], vs[0][:, :, :past]):
            return None
        batch, seq, _ = hidden.shape
        m = batch * seq
        if m > self.max_rows:
            return None
        work = torch.empty(lib.effx_layer_work(ctypes.byref(self.widest.params), m))
        qkv = torch.empty(m, first.nq + 2 * first.nkv)
        tmp, out = torch.empty_like(hidden), torch.empty_like(hidden)
        n = len(self.layers)
        lib.effx_layers(
            self.params, n, hidden.data_ptr(), batch, seq, cos.data_ptr(), sin.data_ptr(),
            (ctypes.c_void_p * n)(*(t.data_ptr() for t in ks)), (ctypes.c_void_p * n)(*(t.data_ptr() for t in vs)),
            buffer.shape[2], past, mask.data_ptr(), mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2),
            qkv.data_ptr(), work.data_ptr(), tmp.data_ptr(), out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out


def fuse_stack(layers) -> FusedStack | None:
    """A :class:`FusedStack` of ``layers`` (the torch backend's modules of consecutive layer stages), or None
    unless there are two or more, every one a :class:`FusedLayer` the kernels run, all of one attention shape
    (their MLP widths may differ: a neuron-masked layer's is narrower)."""
    layers = list(layers)
    if len(layers) < 2 or not all(isinstance(f, FusedLayer) and f.params is not None for f in layers):
        return None
    shape = lambda f: (f.D, f.nq, f.nkv, f.hd)  # noqa: E731
    if any(shape(f) != shape(layers[0]) for f in layers):
        return None
    return FusedStack(layers)


def _base(t: torch.Tensor) -> int:
    """The address of ``t``'s first element, also for an empty view (whose ``data_ptr`` may be 0)."""
    return t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()


def fuse_layer(gm: torch.fx.GraphModule):
    """A :class:`FusedLayer` for the lowered layer graph ``gm``, or None where it is not of the fused form
    (or the kernels cannot read its weights)."""
    try:
        values = _match(gm)
    except (_NoMatch, AttributeError, IndexError, TypeError):
        return None
    layer = FusedLayer(gm, values)
    return layer if layer.params is not None else None
