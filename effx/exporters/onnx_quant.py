"""Quantized weights in ONNX artifacts: ``effx.qlinear`` and ``effx.qembedding`` (:mod:`effx.quant`) as ONNX
Runtime operators that read the quantized bytes.

Two steps. ``torch.onnx.export`` translates the two ops (:func:`translations`) into placeholder nodes of the
domain ``effx`` (``QLinear``, ``QEmbedding``) over the stage's quantized initializers, under their state-dict
names: one layer's export can then take another layer's weights by name, as for float stages. :func:`lower`
then rewrites each stage's own model, from its own tensors, into standard ONNX and ``com.microsoft`` nodes:

* Every quantized tensor is stored in one form, whichever node reads it, so that a tied embedding and LM
  head (and a pruned exit's gather of the head's rows) keep sharing bytes in the weight store:
  4-bit values repacked into MatMulNBits' nibble order (value ``2j`` in the low nibble of byte ``j``,
  ``2j + 1`` in its high nibble; effx pairs values ``j`` and ``j + 16`` of every block of 32), 8-bit values
  as ``uint8 q + 128``, scales and minimums as float32 (MatMulNBits takes scales of the input's type),
  bfloat16 values as they are. Nothing is stored as float weights.
* ``qlinear`` over stored tensors:

  - 4 bits with a minimum (``w = scale * u + minimum``): ``MatMulNBits(x, B, scale)`` (its default zero
    point 8, the kernels without a zero-point input: 2x faster than zero points 0 on ``down_proj``) plus the
    minimum term ``(x summed over each group) @ (minimum + 8 * scale)^T``, a product of inner size
    ``k / group`` (float zero points ``-minimum / scale`` are exact too, but ONNX Runtime runs them 15x
    slower);
  - 4 bits symmetric (``w = scale * (u - 8)``): ``MatMulNBits`` with its default zero point 8;
  - 8 bits (``w = scale * q (+ minimum)``): ``MatMulNBits bits=8`` on ``q + 128`` (its default zero point
    128; plus the minimum term) at ``accuracy_level=4``, int8 arithmetic, over the input split into
    :data:`TERMS` int8-exact terms that sum to it (:meth:`_Lowering.int8_terms`): each term is on the grid
    ONNX Runtime quantizes it to, so each term's product is exact and their sum is the float product
    within about 2^-24 of the input (level 4 on the plain input is 2^-8; ONNX Runtime 1.32 has no float
    kernel for 8 bits: level 1 ran SmolLM2 at 4.1 tok/s). SmolLM2's Q8_0 head in a decode step: 3.5 ms
    as the folded float32 product, about 1.2 ms as three terms;
  - bfloat16: the weight de-quantized in the graph (as for gathered rows, below), then ``MatMul``; ONNX
    Runtime folds the de-quantization to a float32 weight when it loads the stage, so the artifact holds
    the bfloat16 bytes and the session float32 ones.

  4-bit MatMulNBits runs at ``accuracy_level=1`` (float32 arithmetic: exact up to float rounding; level 4
  on the plain input is lossy: SmolLM2 agreed with float32 on 0.975 of forced tokens, 7% faster). A bias is added after the product. Placeholders that read one input
  with weights of one layout (a layer's q, k and v projections; its gate and up) become one MatMulNBits
  over their weights concatenated along the rows, then a ``Split``: every output column is the same sum,
  in fewer, larger products (SmolLM2's layers 11.6 -> 9.1 ms per token).
* ``qlinear`` over gathered rows (a reduced head's ``index_select`` of the tensors): the rows de-quantized in
  the graph, then ``MatMul``; ``qembedding``: ``Gather`` of the rows' bytes, scales and minimums, then
  their de-quantization (unpack nibbles, ``(u - zero) * scale (+ minimum)`` in float32, the order
  :func:`effx.quant.dequantize` computes), bitwise the float rows torch computes.
"""

from __future__ import annotations

import copy

import numpy as np

from ..errors import ArtifactError
from .onnx_quant_ops import DOMAIN, translations

__all__ = ["DOMAIN", "lower", "repack4", "translations"]

MS_DOMAIN = "com.microsoft"
ACCURACY_LEVEL = 1  # 4-bit products: float32 arithmetic
# the widths whose products run as MatMulNBits (8 bits at accuracy level 4, on split inputs: see above)
NBITS = (4, 8)
# 8-bit products: the input as this many int8-exact terms (the input rounded to int8 per block, then what
# that left, ...), each term's product exact in ONNX Runtime's int8 arithmetic
TERMS = 3
_BLOCK = 32  # effx's nibble blocks (effx.quant.BLOCK)


# -- lowering ---------------------------------------------------------------------------------------------


def repack4(q: np.ndarray) -> np.ndarray:
    """effx's 4-bit bytes ``[n, kp / 2]`` (in every block of 32 values, byte ``j`` holds value ``j`` low and
    value ``j + 16`` high) in MatMulNBits' order (byte ``j``: value ``2j`` low, value ``2j + 1`` high)."""
    n, half = q.shape
    blocks = q.reshape(n, half // (_BLOCK // 2), 1, _BLOCK // 2)
    u = np.concatenate([blocks & 15, blocks >> 4], axis=2).reshape(n, half * 2)  # effx.quant.unpack4
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def _attr(node, name: str):
    """The int attribute ``name`` of ``node``, or None."""
    return next((a.i for a in node.attribute if a.name == name), None)


def _bias(node):
    """A QLinear placeholder's bias input, or None."""
    return node.input[4] if len(node.input) > 4 and node.input[4] else None


class _Weight:
    """A placeholder's weight: its stored form, bits (4, 8, 16), rows, padded input size, group, minimum."""

    def __init__(self, form: str, q, scale, minimum):
        self.bits = {"q4": 4, "q8": 8, "bf16": 16}[form]
        self.n = int(q.dims[0])
        self.kp = int(q.dims[-1]) * (2 if self.bits == 4 else 1)
        self.blocks = None if scale is None else int(scale.dims[-1])
        self.group = None if scale is None else self.kp // self.blocks
        self.has_minimum = minimum is not None

    def rows(self, n: int) -> _Weight:
        """This layout with ``n`` rows (weights concatenated along their rows)."""
        w = copy.copy(self)
        w.n = n
        return w


class _Lowering:
    """Rewrites one model's placeholders; new values are named after the placeholder's output."""

    def __init__(self, model, int8: bool = False):
        import onnx

        self.onnx = onnx
        self.int8 = int8  # int8 activations: accuracy level 4 on the plain input
        self.rounds: dict[str, object] = {}  # RoundInt8 placeholders by output: made where a reader needs it
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producers = {o: n for n in self.graph.node for o in n.output}
        self.stored: dict[str, str] = {}  # initializer -> its stored form: "q4", "q8", "bf16", "f32"
        self.nodes: list = []
        self.made: set[str] = set()
        self.used_ms = False

    # -- building
    def const(self, name: str, array) -> str:
        name = f"effx_quant.{name}"
        if name not in self.inits:
            self.graph.initializer.append(self.onnx.numpy_helper.from_array(np.asarray(array), name))
            self.inits[name] = self.graph.initializer[-1]
        return name

    def node(self, op: str, inputs, out: str, domain: str = "", **attrs) -> str:
        if out not in self.made:  # a value asked for twice (a padded input) is made once
            self.made.add(out)
            self.nodes.append(
                self.onnx.helper.make_node(op, list(inputs), [out], name=out, domain=domain, **attrs)
            )
        return out

    def shape_with(self, lead: str, tail, out: str) -> str:
        """``lead`` (a Shape) followed by the static dims ``tail``."""
        name = "x".join(map(str, tail))
        return self.node("Concat", [lead, self.const(f"tail.{name}", np.array(tail))], out, axis=0)

    # -- the stored tensors
    def source(self, value: str) -> tuple[str, bool]:
        """The initializer behind ``value``: itself (True) or the data of the Gather that makes it (False)."""
        if value in self.inits:
            return value, True
        node = self.producers.get(value)
        if node is not None and node.op_type == "Gather" and node.input[0] in self.inits:
            return node.input[0], False
        raise ArtifactError(
            f"the quantized tensor {value!r} is neither a stored tensor nor rows gathered from one"
        )

    def convert(self, name: str, role: str) -> None:
        """The initializer ``name`` in its stored form (once, whichever nodes read it)."""
        if name in self.stored:
            return
        from onnx import numpy_helper

        init = self.inits[name]
        TP = self.onnx.TensorProto
        array = None
        if role == "q" and init.data_type == TP.UINT8:
            form, array = "q4", repack4(numpy_helper.to_array(init))
        elif role == "q" and init.data_type == TP.INT8:
            form, array = "q8", (numpy_helper.to_array(init).astype(np.int16) + 128).astype(np.uint8)
        elif role == "q" and init.data_type == TP.BFLOAT16:
            form = "bf16"
        elif role == "q":
            raise ArtifactError(f"quantized values {name!r} of ONNX type {init.data_type} are not effx's")
        else:
            form = "f32"
            if init.data_type == TP.FLOAT16:
                array = numpy_helper.to_array(init).astype(np.float32)
        self.stored[name] = form
        if array is not None:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))

    def tensors(self, node):
        """``(values, initializers, weight, stored directly)`` of a placeholder's q, scale and minimum."""
        values = [node.input[i] if len(node.input) > i and node.input[i] else None for i in (1, 2, 3)]
        names, direct = [], True
        for value, role in zip(values, ("q", "scale", "minimum"), strict=True):
            if value is None:
                names.append(None)
                continue
            name, itself = self.source(value)
            self.convert(name, role)
            names.append(name)
            direct = direct and itself
        weight = _Weight(self.stored[names[0]], *(None if n is None else self.inits[n] for n in names))
        return values, names, weight, direct

    # -- de-quantization in the graph: rows [..., kp / 2] (4 bits) or [..., kp] -> float32 [..., k]
    def dequantize(self, values, w: _Weight, k: int, out: str) -> str:
        q, scale, minimum = values
        TP = self.onnx.TensorProto
        last = self.const("axes.last", np.array([-1]))
        if w.bits == 16:
            return self.slice_k(self.node("Cast", [q], f"{out}/float", to=TP.FLOAT), w, k, out)
        lead = self.node("Shape", [q], f"{out}/lead", end=-1)
        if w.bits == 4:
            low = self.node("BitwiseAnd", [q, self.const("u8.15", np.array(15, np.uint8))], f"{out}/low")
            four = self.const("u8.4", np.array(4, np.uint8))
            high = self.node("BitShift", [q, four], f"{out}/high", direction="RIGHT")
            pairs = [self.node("Unsqueeze", [v, last], f"{v}/pair") for v in (low, high)]
            q = self.node("Concat", pairs, f"{out}/pairs", axis=-1)  # [..., kp / 2, 2]: consecutive values
        shape = self.shape_with(lead, [w.blocks, w.group], f"{out}/blocks_shape")
        blocks = self.node("Reshape", [q, shape], f"{out}/blocks")
        u = self.node("Cast", [blocks], f"{out}/u", to=TP.FLOAT)
        zero = 128 if w.bits == 8 else None if w.has_minimum else 8
        if zero is not None:
            u = self.node(
                "Sub", [u, self.const(f"f32.{zero}", np.array(zero, np.float32))], f"{out}/centered"
            )
        rows = self.node("Mul", [u, self.node("Unsqueeze", [scale, last], f"{out}/scale")], f"{out}/scaled")
        if w.has_minimum:
            rows = self.node("Add", [rows, self.node("Unsqueeze", [minimum, last], f"{out}/min")], f"{out}/w")
        rows = self.node("Reshape", [rows, self.shape_with(lead, [w.kp], f"{out}/rows_shape")], f"{out}/rows")
        return self.slice_k(rows, w, k, out)

    def slice_k(self, rows: str, w: _Weight, k: int, out: str) -> str:
        if k == w.kp:
            return rows
        bounds = [self.const("i64.0", np.array([0])), self.const(f"i64.{k}", np.array([k]))]
        return self.node("Slice", [rows, *bounds, self.const("axes.last", np.array([-1]))], f"{out}/sliced")

    def pad_k(self, x: str, k: int, w: _Weight, out: str) -> str:
        """``x`` padded with zeros to the weight's padded input size."""
        if k == w.kp:
            return x
        pads = self.const(f"pads.{w.kp - k}", np.array([0, w.kp - k]))
        zero = self.const("f32.0", np.array(0, np.float32))
        # named after the input: one padded copy per input and size, whichever product asks
        return self.node(
            "Pad", [x, pads, zero, self.const("axes.last", np.array([-1]))], f"{x}/padded.{w.kp}"
        )

    # -- the placeholders
    def qlinear(self, node) -> None:
        x, out = node.input[0], node.output[0]
        bias = _bias(node)
        k, rank = _attr(node, "k"), _attr(node, "rank")
        values, names, w, direct = self.tensors(node)
        y = f"{out}/product" if bias else out
        if w.bits not in NBITS or not direct:  # stored tensors: ONNX Runtime folds this to float32 at load
            rows = self.dequantize(values, w, k, out)
            x = self.rounded(x)
            self.node("MatMul", [x, self.node("Transpose", [rows], f"{out}/wT", perm=[1, 0])], y)
        else:
            self.matmul_nbits(x, names, w, k, rank, out, y)
        if bias:
            self.node("Add", [y, bias], out)

    def siblings(self) -> dict:
        """Placeholders that read one input and stored tensors of one layout (a layer's q, k and v
        projections; its gate and up): each one's output -> its group, ``[(node, names, weight)]``, made as
        one MatMulNBits (and one minimum term) over the weights concatenated along their rows, then split.
        Each output column is the same sum as apart: exact as they are, and fewer, larger products."""
        readers: dict[str, int] = {}
        for n in self.graph.node:
            for i in n.input:
                readers[i] = readers.get(i, 0) + 1
        by_layout: dict[tuple, list] = {}
        for node in self.graph.node:
            if node.domain != DOMAIN or node.op_type != "QLinear":
                continue
            bias = _bias(node)
            values, names, w, direct = self.tensors(node)
            if not direct or w.bits not in NBITS or (bias and bias not in self.inits):
                continue
            if readers.get(names[0], 0) != 1:  # bytes shared with another reader (a tied embedding) stay so
                continue
            key = (node.input[0], w.bits, w.kp, w.group, w.has_minimum, _attr(node, "k"), _attr(node, "rank"))
            by_layout.setdefault(key, []).append((node, names, w))
        return {m[0].output[0]: group for group in by_layout.values() if len(group) > 1 for m in group}

    def qlinear_merged(self, group) -> None:
        from onnx import numpy_helper

        first = group[0][0]
        x, out = first.input[0], f"{first.output[0]}/merged"
        k, rank = _attr(first, "k"), _attr(first, "rank")
        names = []
        for part in range(3):  # values, scales, minimums: concatenated along the rows
            if group[0][1][part] is None:
                names.append(None)
                continue
            name = f"{group[0][1][part]}.and{len(group) - 1}"
            arrays = [numpy_helper.to_array(self.inits[names_[part]]) for _, names_, _ in group]
            self.graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=0), name))
            self.inits[name] = self.graph.initializer[-1]
            self.stored[name] = self.stored[group[0][1][part]]
            names.append(name)
        w = group[0][2].rows(sum(m[2].n for m in group))
        self.matmul_nbits(x, names, w, k, rank, out, out)
        outputs = [f"{n.output[0]}/product" if _bias(n) else n.output[0] for n, _, _ in group]
        splits = self.const(
            "split." + "x".join(str(m[2].n) for m in group), np.array([m[2].n for m in group])
        )
        self.nodes.append(
            self.onnx.helper.make_node("Split", [out, splits], outputs, name=f"{out}/split", axis=-1)
        )
        for node, _, _ in group:
            if _bias(node):
                self.node("Add", [f"{node.output[0]}/product", _bias(node)], node.output[0])

    def matmul_nbits(self, x: str, names, w: _Weight, k: int, rank, out: str, y: str) -> None:
        q, scale, minimum = names
        # int8 activations: MatMulNBits at level 4 rounds the input itself, and the minimum term reads the
        # input as it is; elsewhere a rounded input is made in the graph
        given, x = x, self.rounds[x].input[0] if self.int8 and x in self.rounds else self.rounded(x)
        packed = (
            f"{q}.nbits"  # the stored bytes, shaped [n, blocks, bytes per block] as MatMulNBits takes them
        )
        if packed not in self.inits:
            self.graph.initializer.append(self.inits[q])
            b = self.graph.initializer[-1]
            b.name = packed
            del b.dims[:]
            b.dims.extend([w.n, w.blocks, w.group // 2 if w.bits == 4 else w.group])
            self.inits[packed] = b
        # MatMulNBits takes ceil(K / block) blocks: pad x where effx padded a whole block more (group 16)
        a, K = (x, k) if -(-k // w.group) == w.blocks else (self.pad_k(x, k, w, out), w.kp)
        level, product = ACCURACY_LEVEL, f"{out}/nbits" if w.has_minimum else y
        if self.int8:  # int8 activations: the input as ONNX Runtime rounds it per block (lossy)
            a, K, level = self.pad_k(x, k, w, out), w.kp, 4
        elif (
            w.bits == 8
        ):  # int8 arithmetic, exact on int8-exact inputs: the product of each term, then the sum
            a, K = self.pad_k(x, k, w, out), w.kp  # (whole blocks)
            a, level, terms = self.int8_terms(a, K, w.group, rank), 4, f"{out}/terms"
            product, y_terms = terms, product
        inputs = [a, packed, scale]
        # the default zero points (8 for 4 bits: ONNX Runtime's fastest kernels have no zero-point input; 128
        # for 8 bits, stored as q + 128); a minimum's term adds the rest: scale * u + minimum is
        # scale * (u - 8) + (minimum + 8 * scale)
        attrs = dict(K=K, N=w.n, bits=w.bits, block_size=w.group, accuracy_level=level)
        self.node("MatMulNBits", inputs, product, domain=MS_DOMAIN, **attrs)
        self.used_ms = True
        if w.bits == 8 and not self.int8:
            product = self.node(
                "ReduceSum", [terms, self.const("axes.first", np.array([0]))], y_terms, keepdims=0
            )
        if w.has_minimum:
            # (x summed over each group of its values) @ minimum^T, of inner size blocks
            # (int8 activations: the float input, as it is: rounding it in the graph cost what level 4 saved)
            padded = self.pad_k(x if self.int8 else self.rounded(given), k, w, out)
            if rank is None:  # (placeholders of effx before the rank attribute)
                lead = self.node("Shape", [padded], f"{out}/x_lead", end=-1)
                groups = self.shape_with(lead, [w.blocks, w.group], f"{out}/x_groups_shape")
            else:  # a static shape: Reshape's 0 keeps the lead dimensions
                dims = [0] * (rank - 1) + [w.blocks, w.group]
                groups = self.const("groups." + "x".join(map(str, dims)), np.array(dims))
            grouped = self.node("Reshape", [padded, groups], f"{out}/x_groups")
            last = self.const("axes.last", np.array([-1]))
            sums = self.node("ReduceSum", [grouped, last], f"{out}/x_sums", keepdims=0)
            if w.bits == 4:  # (folded by ONNX Runtime when it loads the stage: initializers only)
                eight = self.const("f32.8", np.array(8, np.float32))
                shift = self.node("Mul", [scale, eight], f"{out}/scale8")
                minimum = self.node("Add", [minimum, shift], f"{out}/minimum8")
            minimum_t = self.node("Transpose", [minimum], f"{out}/minT", perm=[1, 0])
            term = self.node("MatMul", [sums, minimum_t], f"{out}/min_term")
            self.node("Add", [product, term], y)

    def rounded(self, x: str) -> str:
        """``x``, made as a rounding to ``scale * int8`` per block if a RoundInt8 placeholder outputs it."""
        node = self.rounds.get(x)
        if node is None or x in self.made:
            return x
        a, group, k, rank = node.input[0], _attr(node, "group"), _attr(node, "k"), _attr(node, "rank")
        kp = -(-k // group) * group
        if kp != k:
            pads = self.const(f"pads.{kp - k}", np.array([0, kp - k]))
            zero = self.const("f32.0", np.array(0, np.float32))
            a = self.node("Pad", [a, pads, zero, self.const("axes.last", np.array([-1]))], f"{x}/padded")
        dims = [0] * (rank - 1) + [kp // group, group]
        blocks = self.node(
            "Reshape", [a, self.const("groups." + "x".join(map(str, dims)), np.array(dims))], f"{x}/blocks"
        )
        amax = self.node(
            "ReduceMax",
            [self.node("Abs", [blocks], f"{x}/abs"), self.const("axes.last", np.array([-1]))],
            f"{x}/amax",
            keepdims=1,
        )
        scale = self.node("Div", [amax, self.const("f32.127", np.array(127, np.float32))], f"{x}/scale")
        safe = self.node(
            "Max",
            [scale, self.const("f32.tiny", np.array(np.finfo(np.float32).tiny, np.float32))],
            f"{x}/safe",
        )
        levels = self.node("Round", [self.node("Div", [blocks, safe], f"{x}/ratio")], f"{x}/levels")
        flat = [0] * (rank - 1) + [kp]
        y = self.node(
            "Reshape",
            [
                self.node("Mul", [levels, scale], f"{x}/values"),
                self.const("flat." + "x".join(map(str, flat)), np.array(flat)),
            ],
            x if kp == k else f"{x}/whole",
        )
        if kp != k:
            self.node(
                "Slice",
                [y, self.const("i64.0", np.array([0])), self.const(f"i64.{k}", np.array([k])),
                 self.const("axes.last", np.array([-1]))],
                x,
            )  # fmt: skip
        return x

    def int8_terms(self, a: str, K: int, group: int, rank) -> str:
        """``a`` ``[..., K]`` as :data:`TERMS` stacked terms ``[TERMS, ..., K]`` that sum to it: each the
        rest of ``a`` rounded per block of ``group`` values to ``scale * int8`` (scale = the block's largest
        magnitude / 127), the grid ONNX Runtime quantizes a block to at accuracy level 4, so that its int8
        arithmetic is exact on each term. Three terms leave about 2^-24 of the input (two: 2^-16); made once per
        input."""
        name = f"{a}/int8_terms{TERMS}.{group}"
        if name in self.made:
            return name
        if rank is None:
            raise ArtifactError(f"{a}: 8-bit products need the input's rank (re-export with this effx)")
        dims = [0] * (rank - 1) + [K // group, group]
        blocks = self.node(
            "Reshape",
            [a, self.const("groups." + "x".join(map(str, dims)), np.array(dims))],
            f"{a}/blocks.{group}",
        )
        rest = self.node(
            "Unsqueeze", [blocks, self.const("axes.first", np.array([0]))], f"{a}/blocks1.{group}"
        )
        parts = []
        for t in range(TERMS - 1):
            p = f"{a}/int8_term{t}.{group}"
            amax = self.node(
                "ReduceMax",
                [self.node("Abs", [rest], f"{p}/abs"), self.const("axes.last", np.array([-1]))],
                f"{p}/amax",
                keepdims=1,
            )
            scale = self.node(
                "Mul", [amax, self.const("f32.1/127", np.array(1 / 127, np.float32))], f"{p}/scale"
            )
            scale = self.node(
                "Max",
                [scale, self.const("f32.tiny", np.array(np.finfo(np.float32).tiny, np.float32))],
                f"{p}/scale_",
            )
            level = self.node("Round", [self.node("Div", [rest, scale], f"{p}/ratio")], f"{p}/int8")
            parts.append(self.node("Mul", [level, scale], f"{p}/term"))
            rest = self.node("Sub", [rest, parts[-1]], f"{p}/rest")
        stacked = self.node("Concat", [*parts, rest], f"{a}/int8_terms.{group}", axis=0)
        flat = [0] * rank + [K]
        return self.node(
            "Reshape", [stacked, self.const("terms." + "x".join(map(str, flat)), np.array(flat))], name
        )

    def qembedding(self, node) -> None:
        ids, out = node.input[0], node.output[0]
        k = _attr(node, "k")
        _, names, w, direct = self.tensors(node)
        if not direct:
            raise ArtifactError(f"{out}: effx.qembedding reads stored tensors, not gathered ones")
        rows = [
            None if n is None else self.node("Gather", [n, ids], f"{out}/{part}_rows", axis=0)
            for n, part in zip(names, ("q", "scale", "min"), strict=True)
        ]
        self.node("Identity", [self.dequantize(rows, w, k, out)], out)

    def run(self) -> None:
        placeholders = {"QLinear": self.qlinear, "QEmbedding": self.qembedding}
        siblings = self.siblings()
        self.rounds = {
            n.output[0]: n for n in self.graph.node if n.domain == DOMAIN and n.op_type == "RoundInt8"
        }
        for node in list(self.graph.node):
            if node.domain != DOMAIN:
                for i in node.input:  # an ONNX node that reads a rounded input (none that effx writes)
                    self.rounded(i)
                self.nodes.append(node)
            elif node.op_type == "RoundInt8":
                continue  # made where a reader needs it (self.rounded)
            elif node.op_type == "QLinear" and node.output[0] in siblings:
                group = siblings[node.output[0]]
                if group[0][0] is node:  # the others are made with the first
                    self.qlinear_merged(group)
            elif node.op_type in placeholders:
                placeholders[node.op_type](node)
            else:
                raise ArtifactError(f"unknown effx node {node.op_type!r}")
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        # the types export recorded for converted tensors (float16 scales, int8 values) and rows gathered
        # from them are stale
        stale = set(self.stored)
        stale |= {n.output[0] for n in self.nodes if n.op_type == "Gather" and n.input[0] in self.stored}
        infos = [v for v in self.graph.value_info if v.name not in stale]
        del self.graph.value_info[:]
        self.graph.value_info.extend(infos)
        # stored tensors that nothing reads now (a 4-bit or 8-bit weight's bytes live under their .nbits name)
        read = {i for n in self.graph.node for i in n.input}
        keep = [t for t in self.graph.initializer if t.name in read or t.name not in self.stored]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)


def lower(model, activations: str = "float"):
    """``model`` (an exported stage with its own weights) with its ``effx`` placeholders rewritten into ONNX
    and ``com.microsoft`` operators, in place; returns it. A model without placeholders is left as it is.
    ``activations="int8"`` (:data:`effx.plan.ACTIVATIONS`) runs every MatMulNBits at accuracy level 4 on the
    plain input (int8 activations, lossy), without the 8-bit products' exact terms."""
    import onnx

    if not any(n.domain == DOMAIN for n in model.graph.node):
        return model
    lowering = _Lowering(model, int8=activations == "int8")
    lowering.run()
    imports = [o for o in model.opset_import if o.domain not in (DOMAIN, MS_DOMAIN)]
    if lowering.used_ms:
        imports.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    del model.opset_import[:]
    model.opset_import.extend(imports)
    return model
