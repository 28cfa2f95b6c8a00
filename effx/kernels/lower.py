"""Lowering a stage graph onto effx's CPU kernels: the same computation with fewer, faster calls.

:func:`lower_graph` rewrites a copy of a captured (or pass-rewritten) stage graph; the Program's own graphs
are never touched, so passes, export, profiling and reports keep seeing plain ATen. Rewrites, each applied
where its pattern matches exactly and skipped otherwise:

* RMSNorm (``w * (x * rsqrt(mean(x**2, -1, keepdim) + eps))``) -> :func:`effx.kernels.rms_norm`;
* a Llama attention's q, k and v projections of one input, each viewed as heads and transposed, with the
  rotate-half rotary embedding on q and k -> :func:`effx.kernels.qkv_rope` (one parallel product, rope in
  place; 27 ATen calls become one);
* ``silu(linear(x, wg)) * linear(x, wu)`` -> :func:`effx.kernels.gated`;
* ``linear(x, index_select(w, 0, ids))`` (a pruned exit's per-token rows) -> :func:`effx.kernels.linear_rows`;
* every other ``aten.linear`` -> :func:`effx.kernels.linear`;
* ``effx.round_int8`` (int8 activations) -> :func:`effx.kernels.round_int8`, and where its result is the
  input of a product above, the product takes the unrounded input and ``int8=group`` instead: the kernels
  round it themselves and multiply in integer arithmetic (:func:`effx.kernels.act8`);
* ``cat([past_k, k], 2)`` (and v) -> :func:`effx.kernels.append_kv`: the new keys and values are written into
  the cache's free slots after ``past`` instead of copying the whole past every layer and step.

Every replacement falls back to the reference computation at run time for inputs the kernels do not take
(more than :data:`effx.kernels.MAX_ROWS` rows, other dtypes), so a lowered graph runs anything the
original runs.
"""

from __future__ import annotations

import copy
import operator
import weakref
from collections import Counter

import torch

from . import append_kv, gated, linear, linear_rows, qkv_rope, rms_norm, round_int8

__all__ = ["lower_graph", "lowered", "lowered_ops"]

from .. import quant as _quant  # noqa: F401  (registers effx.qlinear)

aten = torch.ops.aten
_LINEAR = aten.linear.default
_QLINEAR = torch.ops.effx.qlinear.default
_ROUND_INT8 = torch.ops.effx.round_int8.default
_KERNELS = {
    linear: "linear",
    gated: "gated",
    rms_norm: "rms_norm",
    qkv_rope: "qkv_rope",
    linear_rows: "linear_rows",
    append_kv: "append_kv",
    round_int8: "round_int8",
}


def _is(node, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _get_attr(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def _linear_parts(node):
    """``(x, weight, bias)`` of a linear node whose weight is a graph attribute, else None; the weight of a
    quantized product (``effx.qlinear``) is the tuple ``(q, scale, minimum)`` of its attributes."""
    if node.kwargs:
        return None
    if _is(node, _QLINEAR):
        x, q, scale, minimum, b = node.args
        if all(p is None or _get_attr(p) for p in (scale, minimum)) and _get_attr(q):
            return x, (q, scale, minimum), b
        return None
    if not _is(node, _LINEAR):
        return None
    x, w, *rest = node.args
    b = rest[0] if rest else None
    if not _get_attr(w):
        return None
    return x, w, b


def _gathered(node):
    """``(x, (q, scale, minimum), ids)`` of a quantized product over the rows ``ids`` of its attributes
    (``index_select(t, 0, ids)`` of each: a pruned exit's per-token vocabulary), else None."""
    if not _is(node, _QLINEAR) or node.kwargs or node.args[4] is not None:
        return None
    x, *parts = node.args[:4]
    sources, ids = [], None
    for p in parts:
        if p is None:
            sources.append(None)
            continue
        if not (_is(p, aten.index_select.default) and p.args[1] == 0 and _get_attr(p.args[0])):
            return None
        if ids is not None and p.args[2] is not ids:
            return None
        ids = p.args[2]
        sources.append(p.args[0])
    return x, tuple(sources), ids


def _new(graph, like, target, args):
    node = graph.call_function(target, tuple(args))
    node.meta.update({k: v for k, v in like.meta.items() if k.startswith("effx_")})
    return node


def _rms_norms(graph) -> None:
    for out in list(graph.nodes):
        if not _is(out, aten.mul.Tensor) or len(out.args) != 2:
            continue
        w, inner = out.args
        if _is(w, aten.mul.Tensor):
            w, inner = inner, w
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr" and _is(inner, aten.mul.Tensor)):
            continue
        x, r = inner.args
        if not _is(r, aten.rsqrt.default) or _only_user(inner) is not out:
            continue
        add = r.args[0]
        if not (_is(add, aten.add.Tensor) and isinstance(add.args[1], float)):
            continue
        mean = add.args[0]
        if not (_is(mean, aten.mean.dim) and list(mean.args[1]) == [-1] and mean.args[2:3] == (True,)):
            continue
        sq = mean.args[0]
        if not (_is(sq, aten.pow.Tensor_Scalar) and sq.args[0] is x and sq.args[1] == 2):
            continue
        with graph.inserting_before(out):
            node = _new(graph, out, rms_norm, (x, w, add.args[1]))
        out.replace_all_uses_with(node)


def _heads(lin):
    """``linear -> view(b, s, -1, d) -> transpose(1, 2)``: returns ``(transpose, d)``."""
    view = _only_user(lin)
    if not _is(view, aten.view.default) or len(view.args[1]) != 4:
        return None
    tr = _only_user(view)
    if not (_is(tr, aten.transpose.int) and tuple(tr.args[1:]) == (1, 2)):
        return None
    d = view.args[1][3]
    return (tr, d) if isinstance(d, int) else None


def _rope(t, d):
    """The rotate-half rotary embedding of ``t``: returns ``(result, cos, sin)``."""
    users = list(t.users)
    muls = [u for u in users if _is(u, aten.mul.Tensor)]
    slices = [u for u in users if _is(u, aten.slice.Tensor)]
    if len(users) != 3 or len(muls) != 1 or len(slices) != 2:
        return None
    half = d // 2
    lo = next((s for s in slices if tuple(s.args[1:4]) == (3, 0, half)), None)
    hi = next((s for s in slices if s is not lo and s.args[1:3] == (3, half)), None)
    if lo is None or hi is None or not hi.args[3:] or hi.args[3] < d:
        return None
    neg = _only_user(hi)
    if not _is(neg, aten.neg.default):
        return None
    cat = _only_user(neg)
    if not (_is(cat, aten.cat.default) and list(cat.args[0]) == [neg, lo] and cat.args[1] in (-1, 3)):
        return None
    m1, m2 = muls[0], _only_user(cat)
    if not (_is(m2, aten.mul.Tensor) and m2.args[0] is cat and m1.args[0] is t):
        return None
    add = _only_user(m1)
    if not (_is(add, aten.add.Tensor) and list(add.args) == [m1, m2]):
        return None
    cs = []
    for u in (m1.args[1], m2.args[1]):
        if not (_is(u, aten.unsqueeze.default) and u.args[1] == 1 and u.args[0].op == "placeholder"):
            return None
        cs.append(u.args[0])
    return add, cs[0], cs[1]


def _qkv_ropes(graph) -> None:
    groups: dict = {}
    for n in graph.nodes:
        role = n.meta.get("effx_role")
        parts = _linear_parts(n)
        if parts is not None and role in ("attn.q", "attn.k", "attn.v"):
            groups.setdefault(parts[0], {})[role] = n
    for x, found in groups.items():
        if len(found) != 3:
            continue
        heads = {role: _heads(lin) for role, lin in found.items()}
        if any(h is None for h in heads.values()) or len({d for _, d in heads.values()}) != 1:
            continue
        d = heads["attn.q"][1]
        rq, rk = _rope(heads["attn.q"][0], d), _rope(heads["attn.k"][0], d)
        if rq is None or rk is None or rq[1:] != rk[1:]:
            continue
        (_, wq, bq), (_, wk, bk), (_, wv, bv) = (
            _linear_parts(found[r]) for r in ("attn.q", "attn.k", "attn.v")
        )
        first = min((rq[0], rk[0], heads["attn.v"][0]), key=list(graph.nodes).index)
        with graph.inserting_before(first):
            fused = _new(graph, found["attn.q"], qkv_rope, (x, wq, wk, wv, bq, bk, bv, rq[1], rq[2], d))
            outs = [_new(graph, found["attn.q"], operator.getitem, (fused, i)) for i in range(3)]
        rq[0].replace_all_uses_with(outs[0])
        rk[0].replace_all_uses_with(outs[1])
        heads["attn.v"][0].replace_all_uses_with(outs[2])


def _gated(graph) -> None:
    for mul in list(graph.nodes):
        if not _is(mul, aten.mul.Tensor) or len(mul.args) != 2:
            continue
        act, up = mul.args
        if not _is(act, aten.silu.default) or _only_user(act) is not mul:
            continue
        g, u = _linear_parts(act.args[0]), _linear_parts(up)
        if g is None or u is None or g[0] is not u[0] or g[2] is not None or u[2] is not None:
            continue
        if _only_user(act.args[0]) is not act or _only_user(up) is not mul:
            continue
        with graph.inserting_before(mul):
            node = _new(graph, mul, gated, (g[0], g[1], u[1]))
        mul.replace_all_uses_with(node)


def _linears(graph) -> None:
    for n in list(graph.nodes):
        rows = _gathered(n)
        if rows is not None:
            with graph.inserting_before(n):
                node = _new(graph, n, linear_rows, rows)
            n.replace_all_uses_with(node)
            continue
        parts = _linear_parts(n) if _is(n, _QLINEAR) else None
        if parts is not None:
            with graph.inserting_before(n):
                node = _new(graph, n, linear, parts)
            n.replace_all_uses_with(node)
            continue
        if not _is(n, _LINEAR) or n.kwargs:
            continue
        x, w, *rest = n.args
        b = rest[0] if rest else None
        with graph.inserting_before(n):
            if _is(w, aten.index_select.default) and w.args[1] == 0 and b is None and len(w.users) == 1:
                node = _new(graph, n, linear_rows, (x, w.args[0], w.args[2]))
            else:
                node = _new(graph, n, linear, (x, w, b))
        n.replace_all_uses_with(node)


def _rounds(graph) -> None:
    """``effx.round_int8`` (int8 activations) -> :func:`effx.kernels.round_int8`."""
    for n in list(graph.nodes):
        if _is(n, _ROUND_INT8) and not n.kwargs:
            with graph.inserting_before(n):
                node = _new(graph, n, round_int8, n.args)
            n.replace_all_uses_with(node)


_INT8_TAKERS = (linear, gated, qkv_rope, linear_rows)


def _int8_products(graph) -> None:
    """A product of :data:`_INT8_TAKERS` whose input is :func:`effx.kernels.round_int8` ``(x, group)`` takes
    ``x`` and ``int8=group`` (the rounding node goes once no one reads it)."""
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in _INT8_TAKERS or n.kwargs or not n.args:
            continue
        r = n.args[0]
        if _is(r, round_int8) and not r.kwargs and len(r.args) == 2 and isinstance(r.args[1], int):
            n.args = (r.args[0], *n.args[1:])
            n.kwargs = {"int8": r.args[1]}


def _kv_appends(graph) -> None:
    """``cat([past_k, k], 2)`` of a layer's cache input -> :func:`effx.kernels.append_kv` (no copy of the past)."""
    for n in list(graph.nodes):
        if not _is(n, aten.cat.default) or n.args[1:] != (2,) or len(n.args[0]) != 2:
            continue
        past, new = n.args[0]
        if not (
            isinstance(past, torch.fx.Node)
            and past.op == "placeholder"
            and past.target in ("past_k", "past_v")
        ):
            continue
        with graph.inserting_before(n):
            node = _new(graph, n, append_kv, (past, new))
        n.replace_all_uses_with(node)


def lower_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose products, norms and rotary embeddings run on effx's CPU kernels."""
    graph = copy.deepcopy(gm.graph)
    _rms_norms(graph)
    _qkv_ropes(graph)
    _gated(graph)
    _linears(graph)
    _kv_appends(graph)
    _rounds(graph)
    _int8_products(graph)
    # stage graphs have no side effects (fx counts SDPA as impure because of its dropout argument)
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    graph.lint()
    return torch.fx.GraphModule(gm, graph)


_LOWERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lowered(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """:func:`lower_graph` of ``gm``, made once per graph: Programs share unchanged stage graphs, and the
    lower step's report and the torch backend ask for the same ones."""
    out = _LOWERED.get(gm)
    if out is None:
        out = _LOWERED[gm] = lower_graph(gm)
    return out


def lowered_ops(gm: torch.fx.GraphModule) -> Counter:
    """How many calls of each effx kernel a lowered graph makes."""
    return Counter(
        _KERNELS[n.target] for n in gm.graph.nodes if n.op == "call_function" and n.target in _KERNELS
    )
