"""Fused layer graphs for ONNX Runtime: a layer stage's attention as one ``com.microsoft.GroupQueryAttention``
node that reads and writes the KV cache in place, and its RMS norms as ONNX Runtime's fused norms.

A layer stage exported by ``torch.onnx`` computes attention the way the captured graph does: the step's keys
and values concatenated to the past (a copy of the whole cache, every layer, every step), repeated to the
query heads (``Expand``: another copy, ``heads / kv_heads`` times the cache), transposed, two products and a
softmax between them, each its own node. :func:`fuse_layer` rewrites that model into one where

* attention is ``GroupQueryAttention`` over the queries, keys and values the graph computes (rotary embedding
  included, so positions stay the plan's own), with the plan's additive mask as ``attention_bias`` (padding,
  holes a verifier left, dropped tokens and windows are all in it) and ``past_key``/``past_value`` the whole
  preallocated cache of the layer: the runtime binds each layer's ``present_k``/``present_v`` output to the
  same buffer, and ONNX Runtime writes the step's keys and values into their slots (``total_len - seq`` on)
  instead of returning them;
* each RMS norm (``x * rsqrt(mean(x^2) + eps) * w``) that a residual sum feeds is
  ``com.microsoft.SkipSimplifiedLayerNormalization``, which also returns the sum (ONNX Runtime's norm without
  a sum, ``SimplifiedLayerNormalization``, sits in the ONNX domain, which the ONNX checker refuses: such a
  norm stays as it is).

Inputs: the layer signature's ``hidden, cos, sin, mask, past_k, past_v``, then ``seqlens_k`` (int32
``[batch]``: filled length after the step, minus one, the same in every row since effx's rows share their slots)
and ``total_len`` (int32 scalar: that filled length). Outputs: ``hidden, present_k, present_v``.

Where the rewrite does not recognise the graph (an architecture whose attention is built otherwise), it
returns None and the artifact has no fused graphs: the runtime then runs the plain ones, which stay in the
artifact either way. ONNX Runtime 1.32's CPU kernel refuses a multi-token step over a past at batch > 1,
so the runtime runs those (batched verification and catch-up) on the plain graphs too.
"""

from __future__ import annotations

import numpy as np

from ..artifact import FUSED_INPUTS, fused_inputs

__all__ = ["fuse_layer", "fuse_norms", "reference_check"]

MS_DOMAIN = "com.microsoft"


class _Graph:
    """Producer and consumer maps of a graph, with constants by name."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for x in n.input:
                self.consumers.setdefault(x, []).append(n)
        self.constants = {t.name: t for t in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.constants[n.output[0]] = n.attribute[0].t
        self._np = numpy_helper.to_array

    def scalar(self, name):
        """The value of the constant ``name`` if it is one number, else None."""
        t = self.constants.get(name)
        if t is None:
            return None
        a = self._np(t)
        return float(a.reshape(-1)[0]) if a.size == 1 else None

    def only(self, name, op):
        """The one consumer of ``name``, if it is a node of type ``op``."""
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def made_by(self, name, op):
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op else None


def _scaled(g: _Graph, name: str):
    """``(x, factor)`` where ``name`` is ``x`` times constant scalars (or ``x`` itself, factor 1)."""
    factor = 1.0
    while True:
        n = g.made_by(name, "Mul") or g.made_by(name, "Div")
        if n is None:
            return name, factor
        values = [g.scalar(x) for x in n.input]
        if n.op_type == "Mul" and values[1] is not None:
            name, factor = n.input[0], factor * values[1]
        elif n.op_type == "Mul" and values[0] is not None:
            name, factor = n.input[1], factor * values[0]
        elif n.op_type == "Div" and values[1] is not None:
            name, factor = n.input[0], factor / values[1]
        else:
            return name, factor


def _attention(g: _Graph, past_k: str, past_v: str, k_new: str, v_new: str):
    """The parts of the decomposed attention: ``(q_rot, scale, context output, dead nodes)`` or None."""
    softmax = [n for n in g.graph.node if n.op_type == "Softmax"]
    if len(softmax) != 1:
        return None
    softmax = softmax[0]
    add = g.made_by(softmax.input[0], "Add")
    if add is None or "mask" not in add.input:
        return None
    scores, post = _scaled(g, add.input[1 - list(add.input).index("mask")])
    mm = g.made_by(scores, "MatMul")
    if mm is None:
        return None
    q_rot, q_factor = _scaled(g, mm.input[0])
    _, k_factor = _scaled(g, mm.input[1])
    pv = g.only(softmax.output[0], "MatMul")
    if pv is None:
        return None
    transpose = g.only(pv.output[0], "Transpose")
    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None) if transpose else None
    if perm != [0, 2, 1, 3]:
        return None
    reshape = g.only(transpose.output[0], "Reshape")
    if reshape is None:
        return None
    # the cache concatenations the fused node replaces: past first, then the step's own, on the slot axis
    for past, new in ((past_k, k_new), (past_v, v_new)):
        cat = g.only(past, "Concat")
        if cat is None or list(cat.input) != [past, new]:
            return None
    return q_rot, q_factor * k_factor * post, reshape.output[0]


def _heads(g: _Graph, name: str):
    """The ``[batch, seq, heads * dim]`` projection that ``name`` (``[batch, heads, seq, dim]``) is the
    Reshape-then-Transpose of, or None."""
    transpose = g.made_by(name, "Transpose")
    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None) if transpose else None
    reshape = g.made_by(transpose.input[0], "Reshape") if perm == [0, 2, 1, 3] else None
    return reshape.input[0] if reshape is not None else None


def _rotated(g: _Graph, name: str):
    """The projection whose rotary embedding ``name`` is, or None: ``name = t * cos + rotate_half(t) * sin``
    with ``t`` the projection's heads and ``rotate_half(t) = cat(-t[..., d/2:], t[..., :d/2])`` (its slice
    bounds are not read here: the exporter's numeric check holds the rewrite to the plain graph)."""
    add = g.made_by(name, "Add")
    if add is None:
        return None
    muls = [g.made_by(x, "Mul") for x in add.input]
    if None in muls:
        return None

    def angle(node, which):  # the Mul's other input, if it is `which` unsqueezed
        for a, b in (node.input, node.input[::-1]):
            u = g.made_by(b, "Unsqueeze")
            if u is not None and u.input[0] == which:
                return a
        return None

    t = angle(muls[0], "cos")
    rotated = angle(muls[1], "sin")
    if t is None or rotated is None:
        t, rotated = angle(muls[1], "cos"), angle(muls[0], "sin")
    cat = g.made_by(rotated, "Concat") if rotated else None
    if t is None or cat is None or len(cat.input) != 2:
        return None
    neg = g.made_by(cat.input[0], "Neg")
    halves = [g.made_by(neg.input[0], "Slice") if neg else None, g.made_by(cat.input[1], "Slice")]
    if None in halves or any(h.input[0] != t for h in halves):
        return None
    return _heads(g, t)


def _bsh(nodes, name: str, out: str):
    """Nodes that turn ``name`` ``[batch, heads, seq, dim]`` into ``out`` ``[batch, seq, heads * dim]``."""
    from onnx import helper

    nodes.append(helper.make_node("Transpose", [name], [out + "/bshd"], perm=[0, 2, 1, 3]))
    nodes.append(helper.make_node("Reshape", [out + "/bshd", out + "/shape"], [out]))
    return helper.make_tensor(out + "/shape", 7, [3], [0, 0, -1])


def _norms(g: _Graph, nodes: list):
    """Replace every RMS norm of ``g`` (Pow 2, ReduceMean over the last axis, Add eps, Sqrt, Reciprocal, Mul
    by the input, Mul by the weight) whose input is a residual ``Add`` that nothing but the norm and one
    later ``Add`` reads with ``SkipSimplifiedLayerNormalization``, which returns that sum too. Returns
    ``{id of the norm's last node: new node}`` and the ids of the nodes made dead."""
    from onnx import helper

    replaced, dead = {}, set()
    for pow_ in [n for n in nodes if n.op_type == "Pow"]:
        if g.scalar(pow_.input[1]) != 2.0:
            continue
        x = pow_.input[0]
        mean = g.only(pow_.output[0], "ReduceMean")
        add = g.only(mean.output[0], "Add") if mean else None
        sqrt = g.only(add.output[0], "Sqrt") if add else None
        recip = g.only(sqrt.output[0], "Reciprocal") if sqrt else None
        mul = g.only(recip.output[0], "Mul") if recip else None
        scale = g.only(mul.output[0], "Mul") if mul else None
        if scale is None or x not in mul.input:
            continue
        axes = g.constants.get(mean.input[1]) if len(mean.input) > 1 else None
        if axes is None or list(g._np(axes).reshape(-1)) != [-1]:
            continue
        eps = next((g.scalar(i) for i in add.input if g.scalar(i) is not None), None)
        weight = next((i for i in scale.input if i != mul.output[0]), None)
        if eps is None or weight not in g.constants:
            continue
        chain = (pow_, mean, add, sqrt, recip, mul, scale)
        residual = g.made_by(x, "Add")
        users = g.consumers.get(x, [])
        if residual is not None and len([u for u in users if u not in chain]) == 1:
            # the residual sum is read by the norm and by one later Add: take it from the fused node
            a, b = residual.input
            node = helper.make_node(
                "SkipSimplifiedLayerNormalization",
                [a, b, weight],
                [scale.output[0], "", "", x],
                domain=MS_DOMAIN,
                epsilon=eps,
            )
            dead.add(id(residual))
        else:
            # ONNX Runtime's SimplifiedLayerNormalization sits in the ONNX domain, which the ONNX checker
            # refuses: a norm without a residual sum stays as it is
            continue
        replaced[id(scale)] = node
        dead.update(id(n) for n in chain[:-1])
    return replaced, dead


def _sorted(nodes: list, known) -> list:
    """``nodes`` in an order where each comes after the nodes it reads (the ONNX checker asks for it),
    otherwise in the order given."""
    known, out, pending = set(known) | {""}, [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(x in known for x in n.input):
                out.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(
                f"the fused graph reads values nothing computes: {sorted(set(rest[0].input) - known)}"
            )
        pending = rest
    return out


def fuse_norms(nodes: list, initializers: list, inputs) -> list:
    """``nodes`` (a graph's, reading the graph ``inputs`` and ``initializers`` by name) with every RMS norm
    that follows a residual sum as ``SkipSimplifiedLayerNormalization`` (see :func:`_norms`), in an order the
    checker takes. A segment of fused layers (``effx.exporters.onnx._fuse_layers``) calls it once more over
    the composed graph: each layer's first norm reads the previous layer's residual sum, which no single
    layer's graph holds."""
    from onnx import helper

    g = _Graph(helper.make_graph(nodes, "g", [], [], initializers))
    nodes = list(g.graph.node)
    replaced, dead = _norms(g, nodes)
    nodes = [replaced.get(id(n), n) for n in nodes if id(n) not in dead]
    return _sorted(nodes, [*inputs, *(t.name for t in initializers)])


def fuse_layer(model, *, num_heads: int, kv_heads: int, rotary: bool = True):
    """``model`` (a layer stage as exported, inputs ``hidden, cos, sin, mask, past_k, past_v``, outputs
    ``hidden, k, v``) with fused attention and norms (see the module docstring), or None where its
    attention is not the decomposed form this rewrite knows."""
    import onnx
    from onnx import helper

    graph = model.graph
    ins = [x.name for x in graph.input]
    outs = [x.name for x in graph.output]
    if len(ins) != 6 or len(outs) != 3:
        return None
    hidden_in, _, _, mask, past_k, past_v = ins
    if mask != "mask":
        return None
    hidden_out, k_new, v_new = outs
    g = _Graph(graph)
    found = _attention(g, past_k, past_v, k_new, v_new)
    if found is None:
        return None
    q_rot, scale, context = found
    new_nodes, extra = _gqa_inputs(g, q_rot, k_new, v_new, num_heads, kv_heads, rotary)
    attn = helper.make_node(
        "GroupQueryAttention",
        ["gqa/q", "gqa/k", "gqa/v", past_k, past_v, FUSED_INPUTS[0], FUSED_INPUTS[1], "", "", "", mask],
        ["gqa/out", "present_k", "present_v"],
        domain=MS_DOMAIN,
        num_heads=num_heads,
        kv_num_heads=kv_heads,
        scale=float(scale),
    )
    nodes = []
    for n in graph.node:
        n2 = onnx.NodeProto()
        n2.CopyFrom(n)
        n2.input[:] = ["gqa/out" if x == context else x for x in n.input]
        nodes.append(n2)
    nodes += new_nodes + [attn]
    known = [x.name for x in graph.input] + list(FUSED_INPUTS)
    nodes = fuse_norms(nodes, list(graph.initializer) + extra, known)
    nodes = _live(nodes, {hidden_out, "present_k", "present_v"})
    used = {x for n in nodes for x in n.input}
    inits = [t for t in graph.initializer if t.name in used] + [t for t in extra if t.name in used]
    inputs, outputs = _fused_signature(graph, past_k)
    fused = helper.make_graph(nodes, graph.name, inputs, outputs, inits)
    opsets = list(model.opset_import)
    if not any(o.domain == MS_DOMAIN for o in opsets):
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    return helper.make_model(fused, opset_imports=opsets, ir_version=model.ir_version)


def _gqa_inputs(g, q_rot: str, k_new: str, v_new: str, num_heads: int, kv_heads: int, rotary: bool):
    """The nodes that make GroupQueryAttention's ``gqa/q``, ``gqa/k`` and ``gqa/v`` (``[batch, seq, heads *
    dim]``), and the initializers they add: ORT's rotary embedding on the projections as they come where
    the graph's rope is the form :func:`_rotated` knows (and ``rotary``), else the graph's own rotary
    embedding with its heads reshaped back."""
    from onnx import helper

    new_nodes: list = []
    sources = (_rotated(g, q_rot), _rotated(g, k_new), _heads(g, v_new)) if rotary else (None,)
    if None in sources:
        # the graph's own rotary embedding, its heads back to [batch, seq, heads * dim]
        extra = [
            _bsh(new_nodes, q_rot, "gqa/q"),
            _bsh(new_nodes, k_new, "gqa/k"),
            _bsh(new_nodes, v_new, "gqa/v"),
        ]
        return new_nodes, extra
    # rotary embedding on the projections as they come ([batch, seq, heads * dim]): no transposes
    q_proj, k_proj, v_proj = sources
    for proj, heads, out in ((q_proj, num_heads, "gqa/q"), (k_proj, kv_heads, "gqa/k")):
        new_nodes.append(
            helper.make_node(
                "RotaryEmbedding",
                [proj, *FUSED_INPUTS[2:]],
                [out],
                domain=MS_DOMAIN,
                num_heads=heads,
                interleaved=0,
            )
        )
    new_nodes.append(helper.make_node("Identity", [v_proj], ["gqa/v"]))
    return new_nodes, []


def _live(nodes: list, wanted: set[str]) -> list:
    """The nodes that the values ``wanted`` need, in their order in ``nodes``."""
    producer = {o: n for n in nodes for o in n.output if o}
    live, stack = set(), list(wanted)
    while stack:
        n = producer.get(stack.pop())
        if n is None or id(n) in live:
            continue
        live.add(id(n))
        stack.extend(x for x in n.input if x)
    return [n for n in nodes if id(n) in live]


def _fused_signature(graph, past_k: str) -> tuple[list, list]:
    """A fused layer's inputs (the layer's own, then :data:`FUSED_INPUTS`) and outputs (the hidden state,
    then the whole ``present_k``/``present_v`` caches, shaped as ``past_k`` with any length)."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [x for x in graph.input]
    half = [d.dim_value // 2 for d in graph.input[1].type.tensor_type.shape.dim][-1]
    inputs += [
        helper.make_tensor_value_info(FUSED_INPUTS[0], TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info(FUSED_INPUTS[1], TensorProto.INT32, []),
        helper.make_tensor_value_info(FUSED_INPUTS[2], TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info(FUSED_INPUTS[3], TensorProto.FLOAT, ["rows", half]),
        helper.make_tensor_value_info(FUSED_INPUTS[4], TensorProto.FLOAT, ["rows", half]),
    ]
    past = next(x for x in graph.input if x.name == past_k)
    outputs = [graph.output[0]]
    for name in ("present_k", "present_v"):
        value = onnx.ValueInfoProto()
        value.CopyFrom(past)
        value.name = name
        value.type.tensor_type.shape.dim[2].Clear()
        outputs.append(value)
    return inputs, outputs


def reference_check(
    plain_session, fused_session, *, hidden: int, kv_heads: int, head_dim: int, tables: int = 1, rng=None
):
    """The largest difference between a plain and a fused layer session's hidden output, over a decode step
    and a multi-token step on a random past (at batch 1, as the fused kernel allows); ``tables``: rotary
    tables side by side in ``cos``/``sin`` (``ModelInfo.rope_tables``)."""
    rng = rng or np.random.default_rng(0)
    worst = 0.0
    for s, p in ((1, 5), (3, 4), (4, 0)):
        x = rng.standard_normal((1, s, hidden), dtype=np.float32)
        ang = rng.standard_normal((1, s, tables, head_dim // 2), dtype=np.float32)
        # rotary angles: both halves of each table alike, as every plan's
        ang = np.concatenate([ang, ang], axis=-1).reshape(1, s, tables * head_dim)
        cos, sin = np.cos(ang), np.sin(ang)
        pk = rng.standard_normal((1, kv_heads, p, head_dim), dtype=np.float32)
        pv = rng.standard_normal((1, kv_heads, p, head_dim), dtype=np.float32)
        mask = np.zeros((1, 1, s, p + s), np.float32)
        for i in range(s):
            mask[..., i, p + i + 1 :] = np.finfo(np.float32).min
        feed = dict(hidden=x, cos=cos, sin=sin, mask=mask, past_k=pk, past_v=pv)
        a = plain_session.run(None, feed)[0]
        b = fused_session.run(None, {**feed, **fused_inputs(cos, sin, p, s)})[0]
        worst = max(worst, float(np.abs(a - b).max() / max(1.0, float(np.abs(a).max()))))
    return worst
