"""Graph utilities below capture, passes and the runtime: exporting small functions to ATen, rebinding and
simplifying exported graphs, reading a graph's weights, and the MLP patterns several layers use.

The one module that calls ``torch.export`` (ruff's banned-api rule holds it): capture exports models
through ``export_module``, passes splice patterns made with ``export_function``.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch.export import Dim, export

__all__ = [
    "Dim",
    "export_function",
    "export_module",
    "fetch",
    "mlp_nodes",
    "mlp_probe",
    "rebind",
    "simplify",
    "slice_mlp",
    "tag_nodes",
]


def export_module(module: torch.nn.Module, args: tuple, dynamic: tuple) -> torch.fx.GraphModule:
    """``torch.export`` (non-strict) of ``module`` on ``args`` with ``dynamic`` shapes, as a plain GraphModule:
    positional inputs, a tuple out, no per-call input guards."""
    with torch.no_grad():
        ep = export(module, args, dynamic_shapes=dynamic, strict=False)
    gm = ep.module()
    # A plain GraphModule over the same graph: positional inputs, a tuple out, and no per-call input guards
    # (the runtime checks shapes once per generate call, not once per stage call).
    gm.graph._codegen = torch.fx.graph.CodeGen()
    graph = copy.deepcopy(gm.graph)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    return rebind(gm, graph, gm)


class _Function(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def export_function(fn, args: tuple, dynamic_axes: tuple[dict[int, str], ...]) -> torch.fx.GraphModule:
    """Export a small eager function (no parameters) to an ATen GraphModule, for passes that splice a
    pattern into stage graphs. ``dynamic_axes`` names the dynamic dimensions of each input, e.g.
    ``({0: "batch", 1: "seq"},)``; the same name is the same dimension. Inputs are positional placeholders;
    the output is a tuple."""
    dims: dict[str, Dim] = {}
    spec = tuple(
        {axis: dims.setdefault(name, Dim(name, min=1)) for axis, name in axes.items()}
        for axes in dynamic_axes
    )
    gm = export_module(_Function(fn), args, (spec,))
    simplify(gm)
    return gm


def rebind(template: torch.nn.Module, graph: torch.fx.Graph, owner: torch.nn.Module) -> torch.fx.GraphModule:
    """A GraphModule running ``graph`` with the attributes (weights) of ``owner``; attributes that only the
    template has (constants lifted by export) come from the template."""
    root = {}
    for node in graph.nodes:
        if node.op == "get_attr" and node.target not in root:
            try:
                root[node.target] = operator.attrgetter(node.target)(owner)
            except AttributeError:
                root[node.target] = operator.attrgetter(node.target)(template)
    return torch.fx.GraphModule(root, graph)


_NOOP_TARGETS = (torch.ops.aten._assert_tensor_metadata.default,)


def simplify(gm: torch.fx.GraphModule) -> None:
    """Drop export's metadata asserts and dtype conversions to the dtype a tensor already has."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _NOOP_TARGETS and not node.users:
            gm.graph.erase_node(node)
        elif node.target == torch.ops.aten.to.dtype:
            src = node.args[0]
            val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
            if val is not None and val.dtype == node.args[1] and len(node.args) == 2 and not node.kwargs:
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def fetch(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    """The tensor that the ``get_attr`` node ``node`` reads from ``gm``."""
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def tag_nodes(nodes, pass_name: str, role: str) -> None:
    """Mark ``nodes`` as made by ``pass_name`` in the role ``role`` (the meta that capture writes)."""
    for n in nodes:
        n.meta.update(effx_role=role, effx_pass=pass_name)
        n.meta.setdefault("effx_layer", None)
        n.meta.setdefault("effx_module", "")


def mlp_nodes(graph: torch.fx.Graph):
    """The gate, up and down projections (``aten.linear`` nodes) of a layer graph's MLP."""
    found = {}
    for n in graph.nodes:
        role = n.meta.get("effx_role")
        if (
            n.op == "call_function"
            and n.target == torch.ops.aten.linear.default
            and role
            in (
                "mlp.gate",
                "mlp.up",
                "mlp.down",
            )
        ):
            if role in found:
                raise ValueError(f"two {role} projections in one layer graph")
            found[role] = n
    missing = {"mlp.gate", "mlp.up", "mlp.down"} - set(found)
    if missing:
        raise ValueError(f"the layer graph has no {', '.join(sorted(missing))} projection: not a gated MLP")
    return found["mlp.gate"], found["mlp.up"], found["mlp.down"]


def mlp_probe(layer_graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The layer graph with two more outputs: the MLP intermediate ``act(gate) * up`` and ``act(gate)``."""
    gm = torch.fx.GraphModule(layer_graph, copy.deepcopy(layer_graph.graph))
    gate, _, down = mlp_nodes(gm.graph)
    act = next(iter(gate.users))  # act(gate): the gate's only user
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = (tuple(output.args[0]) + (down.args[0], act),)
    gm.recompile()
    return gm


def slice_mlp(graph: torch.fx.GraphModule, idx: torch.Tensor, pass_name: str) -> torch.fx.GraphModule:
    """``graph`` with its MLP restricted to neurons ``idx``: new sliced weight buffers, the full ones dropped."""
    gm = torch.fx.GraphModule(graph, copy.deepcopy(graph.graph))
    gate, up, down = mlp_nodes(gm.graph)
    for name, node, rows in (("gate", gate, True), ("up", up, True), ("down", down, False)):
        w = fetch(gm, node.args[1]).detach()
        gm.register_buffer(f"mlp_{name}_kept", (w[idx] if rows else w[:, idx]).contiguous())
        args = list(node.args)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(f"mlp_{name}_kept")
            if len(args) > 2 and args[2] is not None and rows:  # a bias on gate/up: slice it too
                gm.register_buffer(f"mlp_{name}_bias_kept", fetch(gm, args[2]).detach()[idx].contiguous())
                args[2] = gm.graph.get_attr(f"mlp_{name}_bias_kept")
                tag_nodes([args[2]], pass_name, node.meta["effx_role"])
        tag_nodes([attr], pass_name, node.meta["effx_role"])
        args[1] = attr
        node.args = tuple(args)
        node.meta["effx_pass"] = pass_name
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    out = torch.fx.GraphModule(gm, gm.graph)  # only what the graph still uses: not the full MLP weights
    out.recompile()
    return out
