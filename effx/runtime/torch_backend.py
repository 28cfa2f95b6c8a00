"""The torch backend: a Program's stages are torch.fx GraphModules, called in ``torch.inference_mode``.

It can do what needs run-time graph surgery: per-prompt core neurons (:mod:`effx.runtime.neurons`) and
CALM's KV state copying (the KV projection of a layer graph). A plan with ``kernels="fast"`` runs lowered
copies of the stage graphs (:func:`effx.kernels.lower.lower_graph`: effx's CPU kernels), made once per
graph and shared by every Program holding that graph; ``kernels="reference"`` runs the graphs as captured.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import array_api_compat.torch as XP
import torch

from ..program import torch_dtype
from . import forward
from .backend import CORE_NEURONS, KV_COPY, Backend
from .neurons import core_prefill
from .stats import DecodeStats

if TYPE_CHECKING:
    from ..arrays import Array
    from ..kernels.layer import FusedStack
    from ..plan import Plan, StageLike, StageSpec
    from ..program import Program
    from .forward import KVCache, MaskCache

__all__ = ["XP", "TorchBackend", "kv_projection", "running_kernels", "torch_backend"]


def running_kernels(plan: Plan) -> str:
    """The kernels the torch backend runs ``plan`` with here: "fast" only where effx's kernels load."""
    from .. import kernels

    return "fast" if plan.kernels == "fast" and kernels.available() else "reference"


class TorchBackend(Backend):
    """Runs ``program``'s stage graphs on torch tensors (lowered onto effx's kernels for ``kernels="fast"``)."""

    name = "torch"
    xp = XP
    capabilities = frozenset({CORE_NEURONS, KV_COPY})

    def __init__(self, program: Program) -> None:
        self.program = program
        self.plan = program.plan
        self.dtype = torch_dtype(program.info)
        self.kernels = running_kernels(program.plan)
        from ..kernels.lower import lowered

        lower = lowered if self.kernels == "fast" else (lambda g: g)
        self._graphs = {s.name: lower(s.graph) for s in program.stages}
        if self.kernels == "fast":  # a decoder layer of the common form: one kernel call (effx.kernels.layer)
            from ..kernels.layer import fuse_layer

            for s in program.stages:
                if s.kind in ("layer", "branch"):  # a draft branch's layer has a layer's form
                    self._graphs[s.name] = fuse_layer(self._graphs[s.name]) or self._graphs[s.name]
        self._kv_only: dict[str, torch.fx.GraphModule] = {}
        self._stacks: dict[tuple[str, ...], FusedStack | None] = {}

    def run(self, stage: StageLike, *inputs: torch.Tensor) -> Sequence[torch.Tensor]:
        # stage graphs return tuples of tensors
        return cast("tuple[torch.Tensor, ...]", self._graphs[stage.name](*inputs))

    def run_layers(
        self,
        cache: KVCache,
        layers: Sequence[StageLike],
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        masks: MaskCache,
    ) -> Array:
        """Each run of consecutive fused layers that attend alike (one fill length, one window, the same
        dropped slots: one mask) runs as one kernel call (:class:`effx.kernels.layer.FusedStack`); anything
        else one stage at a time."""
        from ..kernels.layer import FusedLayer

        def attends(stage: StageLike) -> tuple[object, ...]:
            i = cast(int, stage.layer)  # layer stages: each has its layer
            fused = stage.kind == "layer" and isinstance(self._graphs[stage.name], FusedLayer)
            if not fused:
                return (stage.name,)  # a run of its own
            window = stage.attrs.get("sliding_window")
            return (cache.lengths[i], window, id(cache.dropped.get(i)))

        layers = list(layers)
        start = 0
        while start < len(layers):
            key, end = attends(layers[start]), start + 1
            while end < len(layers) and attends(layers[end]) == key:
                end += 1
            run = layers[start:end]
            stack = self._stack(run) if len(run) > 1 else None
            out = None
            if stack is not None:
                index = [cast(int, s.layer) for s in run]
                past, seq = cache.lengths[index[0]], hidden.shape[1]
                out = stack(
                    hidden, cos, sin, forward.layer_mask(masks, cache, run[0], seq),
                    [cache.k[i] for i in index], [cache.v[i] for i in index], past,
                )  # fmt: skip
                if out is not None:
                    for i in index:
                        cache.lengths[i] = past + seq
            hidden = (
                out
                if out is not None
                else forward.run_layer_stages(self, cache, run, hidden, cos, sin, masks)
            )
            start = end
        return hidden

    def _stack(self, layers: Sequence[StageLike]) -> FusedStack | None:
        key = tuple(s.name for s in layers)
        if key not in self._stacks:
            from ..kernels.layer import fuse_stack

            graphs = [self._graphs[s.name] for s in layers]
            self._stacks[key] = fuse_stack(graphs) if all(s.kind == "layer" for s in layers) else None
        return self._stacks[key]

    def compute(self) -> torch.inference_mode:
        return torch.inference_mode()

    def core_prefill(
        self,
        cache: KVCache,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor,
        stats: DecodeStats | None,
    ) -> tuple[torch.Tensor, Backend]:
        logits, program = core_prefill(self.program, cache, input_ids, positions, key_valid, stats)
        return logits, torch_backend(program)

    def project_kv(
        self, layer: StageSpec, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gm = self._kv_only.get(layer.name)
        if gm is None:
            graph = self._graphs[layer.name]
            gm = self._kv_only[layer.name] = kv_projection(getattr(graph, "graph_module", graph))
        return cast("tuple[torch.Tensor, torch.Tensor]", gm(hidden, cos, sin, None, None, None))  # (k, v)


_BACKENDS: weakref.WeakKeyDictionary[Program, TorchBackend] = weakref.WeakKeyDictionary()


def torch_backend(program: Program) -> TorchBackend:
    """The torch backend of ``program`` (made once per Program; Programs are immutable)."""
    backend = _BACKENDS.get(program)
    if backend is None:
        backend = _BACKENDS[program] = TorchBackend(program)
    return backend


def kv_projection(layer_graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The part of a layer graph that computes the new tokens' keys and values (norm, k/v projections, rope):
    the same graph with only ``(k, v)`` as output and everything else removed as dead code."""
    graph = copy.deepcopy(layer_graph.graph)
    output = next(n for n in graph.nodes if n.op == "output")
    _, k, v = output.args[0]
    output.args = ((k, v),)
    # stage graphs hold no side effects; SDPA counts as impure (dropout) for fx, so say so explicitly
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    return torch.fx.GraphModule(layer_graph, graph)
