"""Quantize: weight-only quantization of a Program's products (and its embedding) in place of float weights.

Every selected ``aten.linear`` whose weight is a stored tensor becomes ``torch.ops.effx.qlinear`` over that
weight's quantized tensors (:mod:`effx.quant`), and the embedding lookup becomes ``effx.qembedding``; the
float weights leave the Program (it holds no float copy)::

    before:  y = linear(x, W[n, k])                       W float32: 4 bytes per weight
    after:   y = qlinear(x, q[n, k/2], scale[n, k/32], minimum[n, k/32])     4-bit: 0.625 bytes per weight

Sources of the quantized values:

* ``source=weights`` (default): round-to-nearest of the float weights, ``bits`` 4 or 8 (or ``bits=16`` /
  ``dtype=bf16``: bfloat16 storage), one scale per ``group`` values of a row, with a minimum per group
  (``symmetric=false``, like GGUF's Q4_1) or without (``symmetric=true``, like Q4_0 / Q8_0).
* ``source=gguf``: the values of the GGUF file the model was loaded from (``file=`` names another), kept
  exactly: every row of a weight is found among the file's de-quantized rows (so row permutations such
  as transformers' q/k reordering, tied embeddings, a vocabulary subset's rows and neuron-masked gate/up
  rows all match), and the quantized Program de-quantizes bitwise to the float32 weights it had. Exact
  types are listed in :data:`effx.quant.GGUF_EXACT`; a weight whose rows are not all in the file (a
  neuron-masked down projection, whose kept columns break the file's groups; a trained exit adapter) or
  whose type is not exact is re-quantized with ``bits``/``group``, and the report says which.

Activations: ``activations=float`` (default) multiplies the float32 input, so the quantized Program is the
float product over the de-quantized weights; ``activations=int8`` rounds the input of every quantized
product per block (the weight's group) to ``scale * int8`` (llama.cpp's Q8_1 activations), lossy, and
both backends multiply it in integer arithmetic (ONNX: MatMulNBits accuracy level 4, whose minimum terms
read the float input, docs/onnx.md; torch: effx's kernels, which round the input themselves and sum the
integer products exactly, within float rounding of the float product over the rounded input; groups below
32 take the rounding and then the float product). The rounding
is an ``effx.round_int8`` node before the products of each input (the graph shows it); the plan records
the mode (:data:`effx.plan.ACTIVATIONS`)::

    before:  y = qlinear(x, q, scale, minimum)
    after:   y = qlinear(round_int8(x, 32), q, scale, minimum)

Selection: ``layers=`` (default all), ``embed``, ``head`` (the LM head, the heads of exits and reduced
heads) and ``exits`` (trained exit adapters). The pass runs after every pass that slices, shares or adds
weights (NeuronMask's static slices, VocabReduce's subsets, EarlyExit's heads) and before ``lower``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeGuard, cast

import torch

from ..errors import PassConfigError, PassError, PassPreconditionError
from ..flops import weight_bytes
from ..fx import fetch
from ..models import gguf_file
from ..plan import ACTIVATIONS
from ..quant import GGUF_EXACT, QWeight, gguf_weights, quantize_rtn
from .base import Pass, PassResult, check_size, register_pass

if TYPE_CHECKING:
    from ..plan import ModelInfo
    from ..program import Program, Stage

__all__ = ["Quantize", "quantize_stage"]

aten = torch.ops.aten
_LINEAR = aten.linear.default
_QLINEAR = torch.ops.effx.qlinear.default
_QEMBEDDING = torch.ops.effx.qembedding.default
_ROUND_INT8 = torch.ops.effx.round_int8.default
SOURCES = ("weights", "gguf")
SCALES = {"float16": torch.float16, "float32": torch.float32}
_HEADS = ("lm_head",)


def _is(node: object, target: object) -> TypeGuard[torch.fx.Node]:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target


def _attr(gm: torch.fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, or None for any other argument."""
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        return None
    value = fetch(gm, node)
    return value if isinstance(value, torch.Tensor) else None


class _GGUFIndex:
    """Rows of a GGUF file's exactly-importable tensors, by the hash of their de-quantized float32 bytes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from tqdm.auto import tqdm

        every = gguf_weights(path)
        self.tensors = [t for t in every if t.kind in GGUF_EXACT]
        self.others = Counter(
            t.kind for t in every if t.kind not in GGUF_EXACT and t.kind not in ("F32", "F16")
        )
        self.rows: dict[bytes, tuple[int, int]] = {}
        self._weights: dict[int, QWeight] = {}
        for i, t in enumerate(tqdm(self.tensors, desc="index GGUF rows", unit="tensor", leave=False)):
            for r, row in enumerate(t.dequantized()):
                self.rows.setdefault(_digest(row.tobytes()), (i, r))

    def find(self, w: torch.Tensor) -> tuple[QWeight | None, str]:
        """The file's quantized rows that de-quantize to ``w``'s rows exactly, or ``(None, why not)``."""
        found = [self.rows.get(_digest(row.tobytes())) for row in w.detach().contiguous().numpy()]
        if any(f is None for f in found):
            missing = sum(f is None for f in found)
            return None, f"{missing} of its {len(found)} rows are not in the GGUF file"
        located = cast("list[tuple[int, int]]", found)  # no None (returned above)
        sources = {i for i, _ in located}
        if len(sources) != 1:
            return None, "its rows come from several GGUF tensors"
        (i,) = sources
        if i not in self._weights:
            self._weights[i] = self.tensors[i].weight()
        whole = self._weights[i]
        ids = torch.tensor([r for _, r in located])
        qw = whole if torch.equal(ids, torch.arange(whole.q.shape[0])) else whole.rows(ids)
        if not torch.equal(qw.dequantize(), w.detach()):
            return None, "its GGUF rows do not de-quantize to it exactly"
        return qw, f"gguf {self.tensors[i].kind}"


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _store(
    gm: torch.fx.GraphModule, qw: QWeight, base: str, like: torch.fx.Node
) -> list[torch.fx.Node | None]:
    """``qw``'s tensors as buffers of ``gm`` (``{base}_q``, ``{base}_scale``, ``{base}_min``) and the
    ``get_attr`` nodes that read them, made at the graph's insertion point and tagged as weights of
    ``like``'s layer; None for a tensor ``qw`` lacks."""
    nodes: list[torch.fx.Node | None] = []
    for part, t in zip(("q", "scale", "min"), qw.tensors(), strict=True):
        if t is None:
            nodes.append(None)
            continue
        name = f"{base}_{part}"
        gm.register_buffer(name, t)
        node = gm.graph.get_attr(name)
        node.meta.update(effx_role="weight", effx_layer=like.meta.get("effx_layer"), effx_module="")
        nodes.append(node)
    return nodes


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    """Weight-only quantization (round-to-nearest, or a GGUF file's own values) of the selected products."""

    name: ClassVar[str] = "quantize"
    phase: ClassVar[str] = "weights"
    order_reason: ClassVar[str] = (
        "it stores the final weights, after every pass that slices, shares or adds weights"
    )

    bits: int = 4
    group: int = 32
    symmetric: bool = False
    dtype: str = ""
    source: str = "weights"
    file: str = ""
    scale: str = "float16"
    activations: str = "float"
    layers: tuple[int, ...] = ()
    embed: bool = True
    head: bool = True
    exits: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in ("", "bf16", "bfloat16"):
            raise PassConfigError(f"quantize: dtype is bf16 (bfloat16 storage) or unset, got {self.dtype!r}")
        if self.dtype:
            object.__setattr__(self, "dtype", "bf16")
            object.__setattr__(self, "bits", 16)
        if self.bits not in (4, 8, 16):
            raise PassConfigError(f"quantize: bits must be 4, 8 or 16 (bfloat16), got {self.bits!r}")
        if not isinstance(self.group, int) or self.group < 16 or self.group & (self.group - 1):
            raise PassConfigError(f"quantize: group must be a power of two >= 16, got {self.group!r}")
        if self.source not in SOURCES:
            raise PassConfigError(
                f"quantize: source must be one of {', '.join(SOURCES)}, got {self.source!r}"
            )
        if self.file and self.source != "gguf":
            raise PassConfigError("quantize: file= names a GGUF file, for source=gguf only")
        if self.scale not in SCALES:
            raise PassConfigError(f"quantize: scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if self.activations not in ACTIVATIONS:
            raise PassConfigError(
                f"quantize: activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}"
            )
        if self.activations == "int8" and self.bits == 16:
            raise PassConfigError("quantize: activations=int8 multiplies 4- or 8-bit weights, not bf16")
        if any(not isinstance(i, int) or i < 0 for i in self.layers):
            raise PassConfigError(f"quantize: layers are layer indices >= 0, got {self.layers!r}")

    def check_model(self, info: ModelInfo) -> None:
        # a group is a block of one weight row; every layer's products read rows of hidden_size values
        check_size("quantize group", self.group, info.hidden_size, "hidden_size")
        bad = [i for i in self.layers if i >= info.num_layers]
        if bad:
            raise PassConfigError(
                f"quantize: layers {bad} out of range (the model has {info.num_layers} layers)"
            )

    def check_after(self, earlier: Sequence[Pass]) -> None:
        if any(p.name == "neuron-mask" and getattr(p, "mode", "") == "core" for p in earlier):
            raise PassPreconditionError(
                "quantize cannot follow neuron-mask mode='core': it slices float MLP weights per prompt at "
                "run time; use mode='static', whose sliced weights quantize"
            )

    def requires(self, program: Program) -> None:
        if program.plan.policy.core_neurons:
            raise PassPreconditionError(
                "quantize cannot follow neuron-mask mode='core': it slices float MLP weights per prompt at "
                "run time; use mode='static', whose sliced weights quantize"
            )
        if program.info.dtype != "float32":
            raise PassPreconditionError(f"quantize takes a float32 Program, not {program.info.dtype}")
        bad = [i for i in self.layers if i >= program.info.num_layers]
        if bad:
            raise PassPreconditionError(
                f"quantize: layers {bad} out of range (the model has {program.info.num_layers} layers)"
            )

    # -- choosing -------------------------------------------------------------------------------------
    def _wanted(self, stage: Stage, role: str) -> bool:
        if role in _HEADS:
            return self.head
        if role == "exit.adapter":
            return self.exits
        if stage.kind in ("layer", "token_score", "token_drop"):
            return not self.layers or stage.layer in self.layers
        return True

    def _rtn(self, w: torch.Tensor) -> QWeight:
        return quantize_rtn(
            w, self.bits, self.group, symmetric=self.symmetric, scale_dtype=SCALES[self.scale]
        )

    # -- applying -------------------------------------------------------------------------------------
    def apply(self, program: Program) -> PassResult:
        report = self.new_report()
        index = None
        if self.source == "gguf":
            try:
                path = gguf_file(self.file or program.info.source)
            except Exception as e:  # ModelLoadError: no file known for this model
                raise PassConfigError(f"quantize source=gguf: {e}") from e
            index = _GGUFIndex(path)
            report.notes.append(f"GGUF file: {path}")
            if index.others:
                kinds = ", ".join(f"{k} x{c}" for k, c in sorted(index.others.items()))
                report.notes.append(
                    f"GGUF types not imported exactly (their weights are re-quantized): {kinds}"
                )
        # shared float weights quantize once, stay shared
        done: dict[tuple[int, tuple[int, ...], tuple[int, ...]], tuple[QWeight, str]] = {}

        def quantized(w: torch.Tensor) -> tuple[QWeight, str]:
            key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()))
            if key not in done:
                if index is not None:
                    qw, how = index.find(w)
                    if qw is None:
                        qw = self._rtn(w)
                        how = f"re-quantized {qw.origin}: {how}"
                else:
                    qw = self._rtn(w)
                    how = qw.origin
                done[key] = (qw, how)
            return done[key]

        stages: dict[str, Stage] = {}
        summary: dict[tuple[str, str], list[str]] = {}
        for stage in program.stages:
            gm, changes = self._rewrite(stage, quantized)
            if gm is not None:
                stages[stage.name] = stage.with_graph(gm)
            for what in changes:
                summary.setdefault(what, []).append(stage.name)
        for (role, how), names in summary.items():
            site = (
                names[0] if len(set(names)) == 1 else f"{names[0]} .. {names[-1]} ({len(set(names))} stages)"
            )
            if how.startswith("re-quantized") and index is not None:
                report.skip(f"{site} {role}", how)
            else:
                report.change(f"{site} {role}", how)
        out = program.replace(stages) if stages else program
        if stages and out.plan.activations != self.activations:
            plan = dataclasses.replace(out.plan, activations=self.activations)
            out = type(out)(
                list(out.stages), plan, generation_config=out.generation_config, reports=out.reports
            )
            report.notes.append(f"quantized products multiply {self.activations} activations")
        before, after = weight_bytes(program), weight_bytes(out)
        report.notes.append(f"resident weights {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
        return PassResult(out, bool(stages), report)

    def _rewrite(
        self, stage: Stage, quantized: Callable[[torch.Tensor], tuple[QWeight, str]]
    ) -> tuple[torch.fx.GraphModule | None, list[tuple[str, str]]]:
        gm = stage.copy_graph()
        g = gm.graph
        changes: list[tuple[str, str]] = []
        count = 0
        # (input, block size) -> its int8 rounding
        rounded: dict[tuple[torch.fx.node.Argument, int | None], torch.fx.Node] = {}

        for node in list(g.nodes):
            role = node.meta.get("effx_role", "?")
            if _is(node, _LINEAR) and not node.kwargs and self._wanted(stage, role):
                x, w_node, *rest = node.args
                bias = rest[0] if rest else None
                w = _attr(gm, w_node)
                gather = None
                if w is None and _is(w_node, aten.index_select.default) and w_node.args[1] == 0:
                    w, gather = _attr(gm, w_node.args[0]), w_node.args[2]
                if w is None or w.dim() != 2 or w.dtype != torch.float32:
                    continue
                qw, how = quantized(w)
                count += 1
                base = f"quant_{count}"
                with g.inserting_before(node):
                    parts = _store(gm, qw, base, node)
                    if self.activations == "int8":  # one rounding per input and block size
                        key = (x, qw.group)
                        if key not in rounded:
                            rounded[key] = g.call_function(_ROUND_INT8, (x, qw.group))
                            rounded[key].meta.update(
                                {k: v for k, v in node.meta.items() if k.startswith("effx_")},
                                effx_role="act.int8",
                                effx_pass=self.name,
                            )
                        x = rounded[key]
                    if gather is not None:
                        parts = [
                            None if p is None else g.call_function(aten.index_select.default, (p, 0, gather))
                            for p in parts
                        ]
                    new = g.call_function(_QLINEAR, (x, *parts, bias))
                for n in [new, *(p for p in parts if p is not None and p.op == "call_function")]:
                    n.meta.update({k: v for k, v in node.meta.items() if k.startswith("effx_")})
                    n.meta["effx_pass"] = self.name
                node.replace_all_uses_with(new)
                g.erase_node(node)
                changes.append((role, how))
            elif _is(node, aten.embedding.default) and (self.embed if stage.kind == "embed" else self.head):
                # the embedding lookup, or a pruned exit's per-token rows of the LM head
                w = _attr(gm, node.args[0])
                if w is None or w.dim() != 2 or w.dtype != torch.float32:
                    continue
                role = "embed" if stage.kind == "embed" else node.meta.get("effx_role", "lm_head")
                qw, how = quantized(w)
                count += 1
                with g.inserting_before(node):
                    parts = _store(gm, qw, f"quant_{count}", node)
                    new = g.call_function(_QEMBEDDING, (node.args[1], *parts, qw.k))
                new.meta.update({k: v for k, v in node.meta.items() if k.startswith("effx_")})
                new.meta["effx_pass"] = self.name
                node.replace_all_uses_with(new)
                g.erase_node(node)
                changes.append((role, how))
        if not changes:
            return None, []
        g.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
        g.lint()
        # a new GraphModule keeps only the attributes its graph reads: the float weights are gone
        return torch.fx.GraphModule(gm, g), changes

    def ensures(self, program: Program) -> None:
        for stage in program.stages:
            for node in stage.graph.graph.nodes:
                role = node.meta.get("effx_role", "?")
                if _is(node, _LINEAR) and self._wanted(stage, role):
                    w = node.args[1]
                    if _is(w, aten.index_select.default):
                        w = w.args[0]
                    if _attr(stage.graph, w) is not None:
                        raise PassError(f"{stage.name}: the {role} product still reads a float weight")
                if _is(node, aten.embedding.default) and (self.embed if stage.kind == "embed" else self.head):
                    if _attr(stage.graph, node.args[0]) is not None:
                        raise PassError(f"{stage.name}: the {role} lookup still reads a float weight")


def quantize_stage(stage: Stage, bits: int, group: int = 32) -> Stage:
    """``stage`` with the stored float weights of its products quantized round-to-nearest as
    ``quantize{bits=.. group=..}`` does (``bits`` 4 or 8, or 16: bfloat16); ``stage`` itself where it has
    none. For a pass that adds a stage whose weights it may store smaller (a draft branch)."""
    q = Quantize(bits=bits, group=group)
    gm, _ = q._rewrite(stage, lambda w: (q._rtn(w), ""))
    return stage if gm is None else stage.with_graph(gm)
