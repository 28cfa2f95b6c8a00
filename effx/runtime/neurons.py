"""Per-prompt core neurons (CoreInfer) at run time: choose them in the prefill, decode with sliced weights.

The prefill runs the full MLP of every layer that ``NeuronMask(mode="core")`` marked (``core_neurons`` in
its attributes) and records the intermediate activations ``act(gate) * up``. For each sample, a neuron's
score is how many of the sample's prompt tokens have it among their top ``top_share`` neurons by magnitude
(ties broken by mean magnitude); the top ``core_neurons`` are kept. Decoding then runs a Program whose
marked layers use weights sliced to those neurons: ``k x d`` matrices for one sample, ``[batch, k, d]``
batched matmuls when the samples differ.
"""

from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING, cast

import torch

from ..fx import fetch, mlp_nodes, mlp_probe, slice_mlp
from .forward import KVCache, MaskCache, run_layers
from .stats import DecodeStats
from .vocab import head_logits

if TYPE_CHECKING:
    from ..plan import NeuronMaskPolicy
    from ..program import Program

__all__ = ["batched_mlp", "choose_core", "core_prefill"]


def choose_core(inter: torch.Tensor, valid: torch.Tensor, k: int, top_share: float) -> torch.Tensor:
    """Core neuron ids ``[batch, k]`` (sorted) from prompt activations ``inter [batch, seq, F]``; ``valid
    [batch, seq]`` marks real (not padding) tokens."""
    a = inter.abs().float()
    width = a.shape[-1]
    top = max(1, round(top_share * width))
    hits = torch.zeros_like(a).scatter_(2, a.topk(top, dim=-1).indices, 1.0)
    w = valid.to(a.dtype)[..., None]
    counts = (hits * w).sum(1)  # [batch, F]
    mean = (a * w).sum(1) / w.sum(1).clamp(min=1)
    score = counts + 0.5 * mean / mean.amax(-1, keepdim=True).clamp(min=1e-12)  # < 1: breaks ties only
    return torch.sort(score.topk(k, dim=-1).indices, dim=-1).values


def core_prefill(
    program: Program,
    cache: KVCache,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    key_valid: torch.Tensor,
    stats: DecodeStats | None = None,
) -> tuple[torch.Tensor, Program]:
    """The prefill of a core-neuron Program: returns the last position's logits and the Program to decode
    with (the marked layers sliced to each prompt's core neurons)."""
    # a core-neuron Program has a neuron_mask policy (the loop calls this for policy.core_neurons only)
    top_share = cast("NeuronMaskPolicy", program.plan.policy.neuron_mask).top_share
    hidden, cos, sin = program.embed.graph(input_ids, positions)
    masks = MaskCache(program, key_valid, hidden.dtype)
    chosen: dict[str, torch.Tensor] = {}
    for stage in program.layers:
        k = stage.attrs.get("core_neurons")
        if not k:
            hidden = run_layers(program, cache, (stage,), hidden, cos, sin, masks)
            continue
        i = cast(int, stage.layer)  # a layer stage's layer
        mask = masks.get(cache.lengths[i], hidden.shape[1], stage.attrs.get("sliding_window"))
        hidden, kk, vv, inter, _ = _probe(stage.graph)(hidden, cos, sin, mask, *cache.past(i))
        cache.write(i, kk, vv)
        chosen[stage.name] = choose_core(inter, key_valid[:, -inter.shape[1] :], k, top_share)
    logits = head_logits(program, hidden[:, -1:], stats)[:, -1]
    replace = {}
    for stage in program.layers:
        if stage.name in chosen:
            idx = chosen[stage.name]
            replace[stage.name] = stage.with_graph(sliced_mlp(stage.graph, idx))
    if stats is not None:
        stats.set(core_neurons={name: idx.tolist() for name, idx in chosen.items()})
    return logits, program.replace(replace)


# per layer graph: its probe, and graphs sliced to placeholder neurons whose weights are swapped per prompt
_PROBES: weakref.WeakKeyDictionary[torch.fx.GraphModule, torch.fx.GraphModule] = weakref.WeakKeyDictionary()
_TEMPLATES: weakref.WeakKeyDictionary[torch.fx.GraphModule, dict[tuple[bool, int], torch.fx.GraphModule]] = (
    weakref.WeakKeyDictionary()
)


def _probe(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    if gm not in _PROBES:
        _PROBES[gm] = mlp_probe(gm)
    return _PROBES[gm]


def sliced_mlp(graph: torch.fx.GraphModule, idx: torch.Tensor) -> torch.fx.GraphModule:
    """``graph`` restricted to neurons ``idx [batch, k]``: sliced weights (``k x d``) when every sample keeps
    the same neurons, batched ``[batch, k, d]`` matmuls otherwise. The sliced graph is built once per layer
    graph and shape; each call only gathers the weights."""
    same = bool((idx == idx[:1]).all())
    nodes = mlp_nodes(graph.graph)
    if any(len(n.args) > 2 and n.args[2] is not None for n in nodes):  # biases: slice them too, no template
        return slice_mlp(graph, idx[0], "neuron-mask") if same else batched_mlp(graph, idx)
    key = (same, idx.shape[-1])
    templates = _TEMPLATES.setdefault(graph, {})
    if key not in templates:
        placeholder = torch.arange(idx.shape[-1])
        templates[key] = (
            slice_mlp(graph, placeholder, "neuron-mask") if same else batched_mlp(graph, placeholder[None])
        )
    template = templates[key]
    gate, up, down = (fetch(graph, n.args[1]).detach() for n in nodes)
    if same:
        i = idx[0]
        new = {"mlp_gate_kept": gate[i], "mlp_up_kept": up[i], "mlp_down_kept": down[:, i].contiguous()}
    else:
        new = {
            "mlp_gate_core": gate[idx].transpose(1, 2).contiguous(),
            "mlp_up_core": up[idx].transpose(1, 2).contiguous(),
            "mlp_down_core": down.t()[idx].contiguous(),
        }
    root = {}
    for node in template.graph.nodes:
        if node.op == "get_attr":
            root[node.target] = new[node.target] if node.target in new else fetch(template, node)
    return torch.fx.GraphModule(root, copy.deepcopy(template.graph))


def batched_mlp(graph: torch.fx.GraphModule, idx: torch.Tensor) -> torch.fx.GraphModule:
    """``graph`` with its MLP restricted to per-sample neurons ``idx [batch, k]``: batched matmuls against
    ``[batch, d, k]`` / ``[batch, k, d]`` weight slices."""
    gm = torch.fx.GraphModule(graph, copy.deepcopy(graph.graph))
    g = gm.graph
    aten = torch.ops.aten
    for name, node in zip(("gate", "up", "down"), mlp_nodes(g), strict=True):
        w = fetch(gm, node.args[1]).detach()
        bias = node.args[2] if len(node.args) > 2 else None
        if name == "down":
            kept = w.t()[idx].contiguous()  # [b, k, d]: a [b, s, k] @ kept
        else:
            kept = w[idx].transpose(1, 2).contiguous()  # [b, d, k]: x [b, s, d] @ kept
        gm.register_buffer(f"mlp_{name}_core", kept)
        with g.inserting_before(node):
            attr = g.get_attr(f"mlp_{name}_core")
            new = g.call_function(aten.matmul.default, (node.args[0], attr))
            made = [attr, new]
            if bias is not None:
                b = fetch(gm, bias).detach()
                gm.register_buffer(
                    f"mlp_{name}_core_bias", (b if name == "down" else b[idx][:, None, :]).contiguous()
                )
                battr = g.get_attr(f"mlp_{name}_core_bias")
                new = g.call_function(aten.add.Tensor, (new, battr))
                made += [battr, new]
        for n in made:
            n.meta.update(
                {k: v for k, v in node.meta.items() if k.startswith("effx_")}, effx_pass="neuron-mask"
            )
        node.replace_all_uses_with(new)
        g.erase_node(node)
    g.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    out = torch.fx.GraphModule(gm, g)
    out.recompile()
    return out
