"""EarlyExit: exit branches after chosen decoder layers.

After each chosen layer ``e`` the pass inserts a stage ``exit.e`` that runs the final norm and the LM head
(the head stage's own weights, shared, not copied) on the layer's hidden state and computes a confidence::

    before:  ... -> layer.e -> layer.e+1 -> ... -> head
    after:   ... -> layer.e -> exit.e -> layer.e+1 -> ... -> head
             exit.e: (hidden, prev_hidden) -> (logits = lm_head(norm(hidden)), confidence)

Confidence measures (higher is more confident; a token exits when ``confidence >= threshold``):

* ``softmax-max``: the top softmax probability (CALM);
* ``top2-gap``: top-1 minus top-2 probability;
* ``entropy``: ``1 - H(p) / log(V)``, so 1 is a one-hot distribution and 0 the uniform one;
* ``saturation``: cosine between this exit's hidden state and the previous exit's (the embedding output
  for the first exit).

Modes: ``lossy`` (a token leaves at the first exit whose confidence passes its threshold; the runtime computes
the skipped layers' keys and values later, batched with the next token that goes deeper, so every cache
entry is the dense one) and ``self-speculative`` (the shallowest exit drafts up to ``draft`` tokens, stopping
early when its confidence falls below the threshold; the full model verifies them in one pass over the
same cache and the output is the dense greedy output).

``kv="copy"`` (lossy only, opt-in) is CALM's state copying instead of deferral: the layers a token skipped get
keys and values projected from its exit hidden state right away. Cheaper, but those entries are approximate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import torch

from ..errors import PassConfigError, PassError, PassPreconditionError, PlanError
from ..formats import load_exit_heads
from ..fx import export_function
from ..plan import EarlyExitPolicy
from ..program import Stage, torch_dtype
from .base import Pass, PassResult, check_read, check_size, register_pass

if TYPE_CHECKING:
    from ..plan import ModelInfo
    from ..program import Program

__all__ = ["MEASURES", "EarlyExit"]


def _softmax_max(logits: torch.Tensor, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(-1).amax(-1)


def _top2_gap(logits: torch.Tensor, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    top = logits.float().softmax(-1).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def _entropy(logits: torch.Tensor, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    logp = logits.float().log_softmax(-1)
    # 0 * log 0 = 0: a reduced head's logits are -inf outside its subset
    h = -torch.where(logp > float("-inf"), logp.exp() * logp, 0.0).sum(-1)
    return 1.0 - h / math.log(logits.shape[-1])


def _saturation(logits: torch.Tensor, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(hidden.float(), prev.float(), dim=-1)


MEASURES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "softmax-max": _softmax_max,
    "top2-gap": _top2_gap,
    "entropy": _entropy,
    "saturation": _saturation,
}


@register_pass
@dataclasses.dataclass(frozen=True)
class EarlyExit(Pass):
    """Exit branches (shared norm + LM head, with a confidence) after chosen layers."""

    name = "early-exit"
    # a recurrent model takes exits too (effx.recurrent: its state stands in for the KV cache)
    families = ("decoder", "recurrent")

    layers: tuple[int, ...] = ()
    every: int | None = None
    measure: str = "softmax-max"
    thresholds: tuple[float, ...] = (0.9,)
    mode: str = "lossy"
    draft: int = 4
    head: str = "shared"
    heads: str = ""
    kv: str = "deferred"

    def __post_init__(self) -> None:
        if bool(self.layers) == (self.every is not None):
            raise PassConfigError("early-exit needs exactly one of layers=[...] or every=k")
        if any(not isinstance(x, int) or isinstance(x, bool) for x in self.layers):
            raise PassConfigError(f"early-exit layers must be integers, got {list(self.layers)}")
        if any(x < 0 for x in self.layers):
            raise PassConfigError(f"early-exit layers must be >= 0, got {list(self.layers)}")
        if len(set(self.layers)) != len(self.layers):
            raise PassConfigError(f"early-exit layers repeat: {list(self.layers)}")
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise PassConfigError(f"early-exit every must be an integer >= 1, got {self.every!r}")
        if self.measure not in MEASURES:
            raise PassConfigError(
                f"unknown early-exit measure {self.measure!r}; measures: {', '.join(MEASURES)}"
            )
        if not self.thresholds or any(
            not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t)
            for t in self.thresholds
        ):
            raise PassConfigError(f"early-exit thresholds must be finite numbers, got {self.thresholds!r}")
        if self.layers and len(self.thresholds) not in (1, len(self.layers)):
            raise PassConfigError(
                f"early-exit has {len(self.layers)} exits but {len(self.thresholds)} thresholds: give one, or one per exit"
            )
        if self.every is not None and len(self.thresholds) > 1:
            raise PassConfigError(
                "early-exit every=k places exits by rule: give one threshold for all of them"
            )
        try:  # mode, draft, kv: the run-time policy's own settings, checked there once
            self.policy()
        except PlanError as e:
            raise PassConfigError(str(e)) from None
        if self.head not in ("shared", "trained"):
            raise PassConfigError(f"early-exit head must be 'shared' or 'trained', got {self.head!r}")
        if self.head == "trained" and not self.heads:
            raise PassConfigError(
                "early-exit head='trained' needs heads=<file> written by effx.train_exit_heads(..., path=...)"
            )
        if self.head == "shared" and self.heads:
            raise PassConfigError("early-exit heads=<file> is only used with head='trained'")

    def policy(self) -> EarlyExitPolicy:
        """The run-time policy this pass sets (its settings for the decode loop)."""
        return EarlyExitPolicy(mode=self.mode, draft=self.draft, measure=self.measure, kv=self.kv)

    def check_model(self, info: ModelInfo) -> None:
        self.exit_layers(info.num_layers)
        if self.mode == "self-speculative":
            check_size("early-exit draft", self.draft, info.max_positions - 1, "max_positions - 1")
        if self.head == "trained":
            check_read("early-exit heads", self.heads, lambda path: self._adapters(path, info))

    def _adapters(self, path: str, info: ModelInfo) -> dict[int, dict[str, torch.Tensor]]:
        """The trained heads of ``path`` (checked by :func:`effx.formats.load_exit_heads`), one for every
        exit layer."""
        adapters = load_exit_heads(path, info)
        missing = [x for x in self.exit_layers(info.num_layers) if x not in adapters]
        if missing:
            raise PassError(
                f"{path} has no trained head for exit layers {missing} (it has {sorted(adapters)})"
            )
        return adapters

    def check_after(self, earlier: Sequence[Pass]) -> None:
        if any(p.name == self.name for p in earlier):
            raise PassPreconditionError("an earlier early-exit already placed exits")
        if any(p.name == "vocab-reduce" and getattr(p, "where", "") == "head" for p in earlier):
            raise PassPreconditionError(
                "an earlier vocab-reduce where='head' reduces the head, and every exit would copy it without "
                "its fallback: run early-exit before vocab-reduce"
            )

    def exit_layers(self, num_layers: int) -> list[int]:
        layers = (
            sorted(self.layers)
            if self.layers
            # __post_init__: every is set when layers is empty
            else list(range(cast(int, self.every) - 1, num_layers - 1, cast(int, self.every)))
        )
        bad = [x for x in layers if x >= num_layers - 1]
        if bad:
            raise PassError(
                f"early-exit layers {bad} are out of range: exits go after layers 0..{num_layers - 2} "
                f"(the model has {num_layers} layers; after the last one is the head itself)"
            )
        if not layers:
            raise PassError(f"every={self.every} places no exit before the last of {num_layers} layers")
        return layers

    def thresholds_by_layer(self, num_layers: int) -> dict[int, float]:
        """Each exit layer's threshold (layers checked by :meth:`exit_layers`)."""
        layers = self.exit_layers(num_layers)
        if len(self.thresholds) == 1:
            return {x: float(self.thresholds[0]) for x in layers}
        # one per listed layer, in the order given (checked in __post_init__)
        return {x: float(t) for x, t in zip(self.layers, self.thresholds, strict=True)}

    def requires(self, program: Program) -> None:
        """A Program without exits (one EarlyExit per Program), with the layers the exits follow, and a
        full-vocabulary head (exits copy the head)."""
        if program.exits:
            raise PassError(f"the program already has exits after layers {sorted(program.exits)}")
        if program.head.attrs.get("vocab"):
            raise PassError(
                "the head scores a reduced vocabulary (an earlier vocab-reduce where='head'), and every exit "
                "would copy it without its fallback: run early-exit before vocab-reduce"
            )
        self.exit_layers(program.info.num_layers)

    def apply(self, program: Program) -> PassResult:
        self.requires(program)
        info = program.info
        by_layer = self.thresholds_by_layer(info.num_layers)
        measure = _measure_graph(self.measure, info)
        adapters: dict[int, dict[str, torch.Tensor]] = {}
        if self.head == "trained":
            adapters = self._adapters(self.heads, info)
        report = self.new_report()
        stages: list[Stage] = []
        for stage in program.stages:
            stages.append(stage)
            if stage.kind == "layer" and stage.layer in by_layer:
                thr = by_layer[stage.layer]
                gm = _exit_graph(program.head.graph, measure, self.name, adapters.get(stage.layer))
                stages.append(
                    Stage(
                        f"exit.{stage.layer}",
                        "exit",
                        gm,
                        layer=stage.layer,
                        attrs={"threshold": thr, "measure": self.measure},
                    )
                )
                report.change(
                    f"exit.{stage.layer}",
                    f"exit after layer {stage.layer}: shared norm + LM head, {self.measure} >= {thr:g}",
                )
        policy = program.plan.policy.updated(
            early_exit=self.policy(),
        )
        report.notes.append(
            "FLOPs/token count every exit evaluated (the worst case); what a token saves depends on where it exits"
        )
        return PassResult(program.with_stages(stages, policy=policy), bool(report.changed), report)

    def ensures(self, program: Program) -> None:
        expected = self.exit_layers(program.info.num_layers)
        if sorted(program.exits) != expected:
            raise PassError(f"exits after layers {sorted(program.exits)}, expected {expected}")
        for stage in program.exits.values():
            if not any(n.meta.get("effx_pass") == self.name for n in stage.graph.graph.nodes):
                raise PassError(f"{stage.name} has no nodes tagged by {self.name}")


def _measure_graph(measure: str, info: ModelInfo) -> torch.fx.GraphModule:
    dt = torch_dtype(info)
    logits = torch.randn(2, 3, info.vocab_size, dtype=dt)
    hidden = torch.randn(2, 3, info.hidden_size, dtype=dt)
    fn = MEASURES[measure]
    axes = {0: "batch", 1: "seq"}
    return export_function(
        lambda lg, h, p: (fn(lg, h, p),), (logits, hidden, hidden.clone()), (axes, axes, axes)
    )


def _exit_graph(
    head: torch.fx.GraphModule,
    measure: torch.fx.GraphModule,
    pass_name: str,
    adapter: dict[str, torch.Tensor] | None = None,
) -> torch.fx.GraphModule:
    """The head's graph (sharing its weights) with a ``prev_hidden`` input and the measure spliced in; with a
    trained ``adapter``, ``hidden -> hidden + up(down(hidden))`` goes before the norm::

        hidden -> norm -> lm_head -> logits                              (head)
        hidden -> [adapter] -> norm -> lm_head -> logits -> confidence   (exit)
    """
    import copy

    graph = copy.deepcopy(head.graph)
    gm = torch.fx.GraphModule(head, graph)
    g = gm.graph
    hidden = next(n for n in g.nodes if n.op == "placeholder")
    with g.inserting_after(hidden):
        prev = g.placeholder("prev_hidden")
    prev.meta.update(effx_role="io", effx_layer=None, effx_module="")
    before = set(g.nodes)
    if adapter is not None:
        gm.register_buffer("adapter_down", adapter["down"])
        gm.register_buffer("adapter_up", adapter["up"])
        with g.inserting_before(prev.next):
            down = g.get_attr("adapter_down")
            up = g.get_attr("adapter_up")
            low = g.call_function(torch.ops.aten.linear.default, (hidden, down))
            delta = g.call_function(torch.ops.aten.linear.default, (low, up))
            adapted = g.call_function(torch.ops.aten.add.Tensor, (hidden, delta))
        ours = {down, up, low, delta, adapted}
        hidden.replace_all_uses_with(adapted, delete_user_cb=lambda n: n not in ours)
        for n in ours:
            n.meta.update(effx_role="exit.adapter", effx_layer=None, effx_module="", effx_pass=pass_name)
    output = next(n for n in g.nodes if n.op == "output")
    logits = cast("tuple[torch.fx.Node, ...]", output.args[0])[0]  # the head returns (logits,)
    inputs = [n for n in measure.graph.nodes if n.op == "placeholder"]
    with g.inserting_before(output):
        # the measure graph returns (confidence,)
        conf = cast(
            "tuple[torch.fx.Node, ...]",
            g.graph_copy(measure.graph, dict(zip(inputs, [logits, hidden, prev], strict=True))),
        )
    for node in g.nodes:
        if node not in before and "effx_role" not in node.meta:  # the spliced measure
            node.meta.update(effx_role="exit.confidence", effx_layer=None, effx_module="")
        if node.op != "output" and (node not in before or node.meta.get("effx_role") in ("lm_head", "norm")):
            node.meta["effx_pass"] = pass_name
    output.args = ((logits, conf[0]),)
    g.eliminate_dead_code()
    gm.recompile()
    return gm
