"""FLOPs of a Program, counted exactly from its stage graphs.

A stage graph is run on ``meta`` tensors (shapes only, no arithmetic) and every matrix product is counted:
``linear``, ``mm``/``addmm``/``bmm``/``matmul`` and ``scaled_dot_product_attention`` (its two products).
One multiply-add is 2 FLOPs. Element-wise ops, norms and softmax are not counted; fvcore does the same
for element-wise ops and counts a multiply-add as 1, so ``effx FLOPs == 2 * fvcore`` on the ops both
count (tests/test_flops.py checks this).
"""

from __future__ import annotations

import math
from typing import cast

import torch

from . import techniques
from .program import torch_dtype

__all__ = [
    "count_graph_flops",
    "decode_flops",
    "decode_weight_bytes",
    "format_report",
    "prefill_flops",
    "program_flops",
    "stage_inputs",
    "weight_bytes",
]

from . import quant as _quant  # noqa: F401  (registers effx.qlinear)

aten = torch.ops.aten
_QLINEAR = torch.ops.effx.qlinear.default
_META = torch.device("meta")


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def _matmul_flops(a, b, out) -> int:
    return 2 * _numel(out.shape) * int(a.shape[-1])


def _op_flops(target, args, kwargs, out) -> int:
    if target in (aten.linear.default, _QLINEAR):
        x, w = args[0], args[1]
        return 2 * (_numel(x.shape) // int(x.shape[-1])) * int(w.shape[0]) * int(x.shape[-1])
    if target in (aten.mm.default, aten.bmm.default, aten.matmul.default):
        return _matmul_flops(args[0], args[1], out)
    if target == aten.addmm.default:
        return _matmul_flops(args[1], args[2], out)
    if target == aten.scaled_dot_product_attention.default:
        q, k, v = args[0], args[1], args[2]
        rows = _numel(q.shape[:-1])  # batch * heads * queries
        keys = int(k.shape[-2])
        return 2 * rows * keys * int(q.shape[-1]) + 2 * rows * keys * int(v.shape[-1])
    return 0


class _MetaCounter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.by_role: dict[str, int] = {}

    def fetch_attr(self, target: str):
        value = super().fetch_attr(target)
        if isinstance(value, torch.Tensor):
            return torch.empty_like(value, device="meta")
        return value

    def call_function(self, target, args, kwargs):
        # ops that name a device (``to.device``, factories) must stay on meta
        args = tuple(_META if isinstance(a, torch.device) else a for a in args)
        if isinstance(kwargs.get("device"), torch.device):
            kwargs = {**kwargs, "device": _META}
        out = super().call_function(target, args, kwargs)
        flops = _op_flops(target, args, kwargs, out)
        if flops:
            role = self.current_node.meta.get("effx_role", "other")
            self.by_role[role] = self.by_role.get(role, 0) + flops
        return out

    def run_node(self, n):
        self.current_node = n
        return super().run_node(n)


def count_graph_flops(gm: torch.fx.GraphModule, inputs: tuple) -> dict[str, int]:
    """FLOPs of one run of ``gm`` on inputs of the given shapes, by node role (``effx_role``)."""
    meta_inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
    counter = _MetaCounter(gm)
    with torch.no_grad():
        counter.run(*meta_inputs)
    return counter.by_role


def stage_inputs(program, stage, *, batch: int, seq: int, past: int) -> tuple:
    """Example inputs (meta tensors) for ``stage`` (a Stage, or a kind name) at the given batch, new tokens and
    cached tokens, shaped as its signature's tensors are in ``effx.techniques.TENSORS``."""
    kind = techniques.stage_kind(stage if isinstance(stage, str) else stage.kind)
    attrs = {} if isinstance(stage, str) else stage.attrs
    info = program.info
    sizes = {
        "batch": batch,
        "seq": seq,
        "past": past,
        "total": past + seq,
        "kept": seq,
        "vocab_k": attrs.get("vocab_k", 1),
        "hidden": info.hidden_size,
        "rope": info.rope_width,
        "kv_heads": info.num_kv_heads,
        "head_dim": info.head_dim,
        "vocab": info.vocab_size,
    }
    out = []
    for name in kind.signature(attrs)[0]:
        shape, dtype = techniques.TENSORS[name]
        dims = [d if isinstance(d, int) else sizes[d] for d in shape]
        out.append(
            torch.zeros(*dims, dtype=torch.long if dtype == "int64" else torch_dtype(info), device="meta")
        )
    return tuple(out)


def program_flops(
    program, *, context: int = 512, prompt: int | None = None, batch: int = 1
) -> dict[str, int]:
    """FLOPs per stage: one decode token at ``context`` cached tokens, or (``prompt=N``) a prefill of N tokens,
    as each stage's kind says it runs (``effx.techniques.StageKind``): a head runs on the last position only;
    a prefill-only stage (TokenDrop's) costs nothing per decode step, and after a TokenDrop stage later
    layers run on the kept share of the prompt."""
    seq, past = (1, context) if prompt is None else (prompt, 0)
    out: dict[str, int] = {}
    for stage in program:
        kind = techniques.stage_kind(stage.kind)
        if kind.runs == "prefill" and prompt is None:
            out[stage.name] = 0
            continue
        s = 1 if kind.last_position else seq
        counted = kind.counted_as or stage
        if kind.prefill_tokens is not None:
            out[stage.name] = (
                0 if kind.counted_as is None else _flops_of(program, stage, counted, s, past, batch)
            )
            seq = kind.prefill_tokens(stage.attrs, cast(int, prompt))
            continue
        out[stage.name] = _flops_of(program, stage, counted, s, past, batch)
    return out


def _flops_of(program, stage, like, seq: int, past: int, batch: int) -> int:
    inputs = stage_inputs(program, like, batch=batch, seq=seq, past=past)
    return sum(count_graph_flops(stage.graph, inputs).values())


def decode_flops(program, *, context: int = 512) -> int:
    """Total FLOPs to decode one token at ``context`` cached tokens (batch 1), every exit evaluated; a
    reduced head's full-vocabulary fallback (``full_head``) runs only for some tokens and is not counted."""
    return _always_run(program, program_flops(program, context=context))


def prefill_flops(program, prompt: int) -> int:
    return _always_run(program, program_flops(program, prompt=prompt))


def _always_run(program, per_stage: dict[str, int]) -> int:
    """The stages every step runs (a fallback head runs only for some tokens: ``StageKind.always``)."""
    return sum(per_stage[s.name] for s in program if techniques.stage_kind(s.kind).always)


def param_bytes(gm: torch.fx.GraphModule, seen: set[int] | None = None) -> int:
    """The bytes of ``gm``'s parameters and buffers, each tensor counted once (``seen``: the ids of tensors
    already counted, shared across calls to count weights shared between graphs once)."""
    seen = set() if seen is None else seen
    total = 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def weight_bytes(program) -> int:
    """Bytes of the weights the Program's stages hold (each shared tensor once): what it keeps resident
    once the original model is gone."""
    seen: set[int] = set()
    return sum(param_bytes(stage.graph, seen) for stage in program)


def decode_weight_bytes(program) -> int:
    """Bytes of weights a decode step reads, every stage run once (exits too: the worst case, as the FLOPs):
    each stage's weights (a head shared by exits is read by each of them), except the embedding table, of
    which a token reads one row, and a fallback full head."""
    total = 0
    for stage in program:
        if not techniques.stage_kind(stage.kind).always:
            continue
        if stage.kind == "embed":
            rows = {int(t.shape[0]) for t in stage.graph.buffers() if t.dim() == 2} | {
                int(t.shape[0]) for t in stage.graph.parameters() if t.dim() == 2
            }
            total += param_bytes(stage.graph) // max(rows, default=1)
            continue
        total += param_bytes(stage.graph)
    return total


def format_report(program, *, context: int = 512) -> str:
    info = program.info
    per_stage = program_flops(program, context=context)
    total = _always_run(program, per_stage)
    lines: list[str] = [
        f"effx Program: {info.architecture} ({info.model_type}), {info.num_layers} layers, hidden {info.hidden_size}, "
        f"heads {info.num_heads}/{info.num_kv_heads} kv, vocab {info.vocab_size}, {info.dtype}",
        "",
        f"{'stage':<20} {'nodes':>6} {'MB':>8} {'MFLOPs/token':>13}  roles (ATen nodes per role)",
    ]
    rows: list[list] = []  # consecutive layers that look the same share a row: "layer.0-29 (x30)"
    for stage in program:
        roles = stage.role_counts()
        roles_text = " ".join(f"{r}:{c}" for r, c in sorted(roles.items()) if r != "shape")
        row = (sum(roles.values()), param_bytes(stage.graph) / 1e6, per_stage[stage.name] / 1e6, roles_text)
        if rows and stage.kind == "layer" and rows[-1][0] == "layer" and rows[-1][3] == row:
            rows[-1][2] = stage.layer
            rows[-1][4] += 1
        else:
            rows.append([stage.kind, stage.name, stage.layer, row, 1])
    for _kind, name, last, (n_nodes, mb, mflops, roles_text), count in rows:
        if count > 1:
            name = f"{name}-{last} (x{count})"
        lines.append(f"{name:<20} {n_nodes:>6} {mb:>8.1f} {mflops:>13.2f}  {roles_text}")
    lines.append("")
    lines.append(f"decode FLOPs/token at context {context}: {total:,} ({total / 1e6:.1f} MFLOPs)")
    lines.append(
        f"weights: {weight_bytes(program) / 1e6:.1f} MB resident, {decode_weight_bytes(program) / 1e6:.1f} MB "
        "read per decode token"
    )
    rewrites = [r for r in program.reports if r.name != "lower"]
    lines.append("")
    if rewrites:
        lines.append("passes:")
        lines += ["  " + line for r in rewrites for line in r.format().splitlines()]
    else:
        lines.append("passes: none (dense)")
    lines.append(f"kernels: {program.plan.kernels}")
    lowers = [r for r in program.reports if r.name == "lower"]
    if lowers:
        # what runs on which kernel; lowering changes no FLOPs, so its FLOPs line is left out
        lines += ["  " + line for line in lowers[-1].format().splitlines()[1:] if "FLOPs/token" not in line]
    return "\n".join(lines)
