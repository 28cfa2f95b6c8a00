"""VocabReduce: LM heads that score k of the V vocabulary rows.

On SmolLM2 the head is 49152 x 576, as costly as about 7 of its 30 layers, so an exit that scores the full
vocabulary to decide whether to exit gives back much of what exiting saves. Three places to reduce it:

``where="exits"`` (Vincenti et al. 2024, dynamic vocabulary pruning in early-exit LLMs). The first exit
scores the full vocabulary; the runtime keeps its top-k token ids, and every later exit of the same token
scores only those rows (a gathered ``k x hidden`` slice of the head weight); the final head stays full.
Schedules: ``fixed`` (every later exit scores the first exit's top k), ``decaying`` (each later exit keeps
the top ``decay`` share of the previous exit's subset, never below ``min_k``), ``adaptive`` (the first exit
keeps the fewest top tokens whose probability reaches ``mass``, between ``min_k`` and ``k``; per batch the
largest such count, so the batch keeps one shape)::

    exit.e:  (hidden, prev_hidden, vocab_ids) -> (logits, confidence)
             logits = scatter(-inf everywhere, vocab_ids, norm(hidden) @ W[vocab_ids].T)

``where="draft"`` (FR-Spec, VocabTrim): the drafting exit of ``EarlyExit(mode="self-speculative")`` scores
a static, frequency-ranked subset (``vocab=`` a file from ``effx.calibrate_vocab``); its weights are sliced
to ``k x hidden``. The full model verifies every draft, so the output stays the dense greedy output.

``where="head"``: the model's own head scores the static subset, and falls back to the full head for a
position whenever the subset is not confident: when the top token's probability within the subset is below
``fallback``. Why that rule: the subset softmax is ``p_i / (1 - p_out)``, where ``p_out`` is the full
model's probability mass outside the subset; a token outside the subset can only beat the subset's best if
``p_out > p_top``, and the subset's best passing the rule means ``p_top >= fallback * (1 - p_out)``, so an
outside token wins only when ``p_out > fallback / (1 + fallback)`` (0.47 at the default 0.9). ``fallback=0``
never falls back (tokens outside the subset are then impossible: lossy, and said so in the report).

Reduced heads return logits over the full vocabulary, ``-inf`` outside the subset, so sampling, measures
and token ids are unchanged downstream. ``k = V`` leaves the program as it is. End-of-sequence ids are
always in a static subset. Runs after ``early-exit`` in any pipeline (the pass manager moves it there): it
reduces exits that ``early-exit`` creates, and ``early-exit`` must copy the full head, not a reduced one.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import torch

from ..errors import PassConfigError, PassError, PassPreconditionError
from ..fx import export_function, fetch
from ..program import Stage, torch_dtype
from ..vocab import load_vocab, subset_ids
from .base import Pass, PassReport, PassResult, check_read, check_size, register_pass

if TYPE_CHECKING:
    from ..plan import ModelInfo
    from ..program import Program

__all__ = ["VocabReduce"]

WHERE = ("exits", "draft", "head")
SCHEDULES = ("fixed", "decaying", "adaptive")


@register_pass
@dataclasses.dataclass(frozen=True)
class VocabReduce(Pass):
    """Vocabulary-reduced LM heads at exits (dynamic top-k), for drafting, or for decoding with fallback."""

    name = "vocab-reduce"
    after = ("early-exit",)
    order_reason = "it reduces the exit heads that early-exit creates, and early-exit must copy the full head"

    k: int = 2048
    where: str = "exits"
    schedule: str = "fixed"
    decay: float = 0.5
    min_k: int = 64
    mass: float = 0.99
    vocab: str = ""
    fallback: float = 0.9

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise PassConfigError(f"vocab-reduce k must be an integer >= 1, got {self.k!r}")
        if self.where not in WHERE:
            raise PassConfigError(f"vocab-reduce where must be one of {', '.join(WHERE)}; got {self.where!r}")
        if self.schedule not in SCHEDULES:
            raise PassConfigError(
                f"unknown vocab-reduce schedule {self.schedule!r}; schedules: {', '.join(SCHEDULES)}"
            )
        if self.where != "exits" and self.schedule != "fixed":
            raise PassConfigError(f"vocab-reduce schedule={self.schedule!r} only applies to where='exits'")
        if not 0 < self.decay < 1:
            raise PassConfigError(f"vocab-reduce decay must be in (0, 1), got {self.decay!r}")
        if not isinstance(self.min_k, int) or self.min_k < 1:
            raise PassConfigError(f"vocab-reduce min_k must be an integer >= 1, got {self.min_k!r}")
        if not 0 < self.mass <= 1:
            raise PassConfigError(f"vocab-reduce mass must be in (0, 1], got {self.mass!r}")
        if self.where == "exits" and self.vocab:
            raise PassConfigError(
                "vocab-reduce where='exits' chooses its subset per token; vocab=<file> is for 'draft' and 'head'"
            )
        if self.where != "exits" and not self.vocab:
            raise PassConfigError(
                f"vocab-reduce where={self.where!r} needs vocab=<file> (write one with effx.calibrate_vocab)"
            )
        if not 0 <= self.fallback <= 1:
            raise PassConfigError(f"vocab-reduce fallback must be in [0, 1], got {self.fallback!r}")

    def check_model(self, info: ModelInfo) -> None:
        check_size("vocab-reduce k", self.k, info.vocab_size, "vocab_size")
        if self.where != "exits":
            check_read("vocab-reduce vocab", self.vocab, lambda path: load_vocab(path, info.vocab_size))

    def check_after(self, earlier: Sequence[Pass]) -> None:
        exits = [p for p in earlier if p.name == "early-exit"]
        if self.where == "draft" and not any(getattr(p, "mode", "") == "self-speculative" for p in exits):
            raise PassPreconditionError(
                "where='draft' reduces the drafting exit of an earlier early-exit mode=self-speculative, and "
                "the pipeline has none"
            )
        if self.where == "exits" and not any(getattr(p, "mode", "") == "lossy" for p in exits):
            raise PassPreconditionError(
                "where='exits' prunes the exits of an earlier lossy early-exit, and the pipeline has none"
            )

    def requires(self, program: Program) -> None:
        """``k`` within the vocabulary; ``where="exits"``: lossy EarlyExit with two exits or more;
        ``where="draft"``: self-speculative EarlyExit; the stage to reduce not reduced yet."""
        vocab_size = program.info.vocab_size
        if self.k > vocab_size:
            raise PassError(f"k={self.k} exceeds the vocabulary size {vocab_size}")
        exits = sorted(program.exits)
        if self.where == "exits":
            if len(exits) < 2:
                raise PassError(
                    f"where='exits' prunes at the first exit for the later ones; the program has exits {exits} "
                    "(add early-exit with at least two exits)"
                )
            if program.plan.decode_mode != "lossy":
                raise PassError(
                    "where='exits' applies to lossy early exit; a self-speculative program drafts with its "
                    "first exit only: reduce that one with where='draft'"
                )
            targets = [program.exits[e] for e in exits[1:]]
        elif self.where == "draft":
            if program.plan.decode_mode != "self-speculative":
                raise PassError(
                    "where='draft' reduces the drafting exit of EarlyExit(mode='self-speculative'); "
                    "add that pass first (for lossy exits use where='exits')"
                )
            targets = [program.exits[exits[0]]]
        else:
            targets = [program.head]
        reduced = [s.name for s in targets if s.attrs.get("vocab")]
        if reduced:
            raise PassError(
                f"{', '.join(reduced)} already has a reduced vocabulary (from an earlier vocab-reduce)"
            )

    def apply(self, program: Program) -> PassResult:
        self.requires(program)
        vocab_size = program.info.vocab_size
        report = self.new_report()
        if self.k == vocab_size:
            report.skip(self.where, f"k = V = {vocab_size}: nothing to reduce, the program is unchanged")
            return PassResult(program, False, report)
        if self.where == "exits":
            return self._exits(program, report)

        ranked = load_vocab(self.vocab, vocab_size)
        try:
            ids = subset_ids(ranked, self.k, program.plan.eos_token_ids)
        except ValueError as e:
            raise PassError(f"{self.vocab}: {e}") from e
        if self.where == "draft":
            return self._draft(program, ids, report)
        return self._head(program, ids, report)

    # -- where="exits" -----------------------------------------------------------------------------------
    def exit_ks(self, n_exits: int) -> list[int]:
        """The subset size each exit after the first scores."""
        if self.schedule != "decaying":
            return [self.k] * (n_exits - 1)
        floor = min(self.min_k, self.k)
        return [max(floor, round(self.k * self.decay**j)) for j in range(n_exits - 1)]

    def _exits(self, program: Program, report: PassReport) -> PassResult:
        exits = sorted(program.exits)
        ks: dict[int | None, int] = dict(zip(exits[1:], self.exit_ks(len(exits)), strict=True))
        pattern = _pruned_pattern(program.info)
        stages: list[Stage] = []
        for stage in program.stages:
            if stage.kind == "exit" and stage.layer in ks:
                attrs = {"vocab": "pruned", "vocab_k": ks[stage.layer]}
                if self.schedule == "adaptive" and stage.layer == exits[1]:
                    attrs.update(vocab_mass=self.mass, vocab_min_k=min(self.min_k, self.k))
                gm = _replace_lm_head(stage.graph, pattern, self.name, ids_input=True)
                stage = Stage(stage.name, "exit", gm, layer=stage.layer, attrs={**stage.attrs, **attrs})
                report.change(
                    stage.name,
                    f"scores {ks[stage.layer]} ids, the top of the previous exit's ({self.schedule} schedule)",
                )
            stages.append(stage)
        d, vocab_size = program.info.hidden_size, program.info.vocab_size
        full = d * vocab_size * len(exits)
        reduced = d * (vocab_size + sum(ks.values()))
        report.notes.append(
            f"exit head cost model d*(V*j + sum k): {reduced:,} vs {full:,} multiply-adds per token over "
            f"{len(exits)} exits ({full / reduced:.2f}x less)"
        )
        report.notes.append(_timing_note(program, stages, ks))
        return PassResult(program.with_stages(stages), bool(report.changed), report)

    # -- where="draft" / "head" --------------------------------------------------------------------------
    def _draft(self, program: Program, ids: torch.Tensor, report: PassReport) -> PassResult:
        first = min(program.exits)
        stages: list[Stage] = []
        for stage in program.stages:
            if stage.kind == "exit" and stage.layer == first:
                gm = static_subset_graph(stage.graph, ids, program.info, self.name)
                stage = Stage(
                    stage.name,
                    "exit",
                    gm,
                    layer=first,
                    attrs={**stage.attrs, "vocab": "subset", "vocab_k": self.k},
                )
                report.change(
                    stage.name, f"drafts from {self.k} of {program.info.vocab_size} ids ({self.vocab})"
                )
            stages.append(stage)
        report.notes.append("the full model verifies every draft: the output is unchanged")
        report.notes.append(_timing_note(program, stages, {first: self.k}))
        return PassResult(program.with_stages(stages), bool(report.changed), report)

    def _head(self, program: Program, ids: torch.Tensor, report: PassReport) -> PassResult:
        gm = static_subset_graph(program.head.graph, ids, program.info, self.name)
        head = Stage(
            "head",
            "head",
            gm,
            attrs={**program.head.attrs, "vocab": "subset", "vocab_k": self.k, "fallback": self.fallback},
        )
        stages = list(program.stages[:-1])
        if self.fallback > 0:
            stages.append(Stage("head.full", "full_head", program.head.graph, attrs={}))
            report.change(
                "head",
                f"scores {self.k} of {program.info.vocab_size} ids; falls back to head.full when the subset's top probability < {self.fallback:g}",
            )
        else:
            report.change("head", f"scores {self.k} of {program.info.vocab_size} ids, never falls back")
            report.notes.append("fallback=0: tokens outside the subset can never be generated (lossy)")
        stages.append(head)
        report.notes.append(_timing_note(program, stages, {None: self.k}))
        return PassResult(program.with_stages(stages), bool(report.changed), report)

    def ensures(self, program: Program) -> None:
        reduced = [s for s in program.stages if s.attrs.get("vocab")]
        if self.k < program.info.vocab_size and not reduced:
            raise PassError("no stage has a reduced vocabulary")
        for s in reduced:
            if s.attrs["vocab_k"] > program.info.vocab_size:
                raise PassError(f"{s.name} keeps {s.attrs['vocab_k']} ids of {program.info.vocab_size}")


# -- graphs ------------------------------------------------------------------------------------------------


def _pruned_pattern(info: ModelInfo) -> torch.fx.GraphModule:
    """``(x, weight, ids) -> logits``: ``x [b, s, d]`` scored against the ``ids [b, k]`` rows of ``weight``,
    scattered into a ``[b, s, V]`` tensor of ``-inf``."""
    vocab_size = info.vocab_size

    def pruned(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor]:
        rows = torch.nn.functional.embedding(ids, weight)  # [b, k, d]
        scores = torch.matmul(x, rows.transpose(1, 2))  # [b, s, k]
        out = scores.new_full((x.shape[0], x.shape[1], vocab_size), float("-inf"))
        return (out.scatter(2, ids[:, None, :].expand(-1, x.shape[1], -1), scores),)

    dt = torch_dtype(info)
    x = torch.randn(2, 3, info.hidden_size, dtype=dt)
    weight = torch.randn(vocab_size, info.hidden_size, dtype=dt)
    ids = torch.randperm(vocab_size)[: min(5, vocab_size)].repeat(2, 1)
    return export_function(pruned, (x, weight, ids), ({0: "batch", 1: "seq"}, {}, {0: "batch", 1: "k"}))


def _subset_pattern(info: ModelInfo, k: int) -> torch.fx.GraphModule:
    """``(x, weight_k, ids) -> logits``: ``x`` scored against ``weight_k [k, d]``, the rows of ``ids [k]``."""
    vocab_size = info.vocab_size

    def subset(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor]:
        scores = torch.nn.functional.linear(x, weight)  # [b, s, k]
        out = scores.new_full((x.shape[0], x.shape[1], vocab_size), float("-inf"))
        return (out.scatter(2, ids[None, None, :].expand(x.shape[0], x.shape[1], -1), scores),)

    dt = torch_dtype(info)
    x = torch.randn(2, 3, info.hidden_size, dtype=dt)
    weight = torch.randn(k, info.hidden_size, dtype=dt)
    ids = torch.randperm(vocab_size)[:k]
    return export_function(subset, (x, weight, ids), ({0: "batch", 1: "seq"}, {}, {}))


def _lm_head_node(graph: torch.fx.Graph) -> torch.fx.Node:
    nodes: list[torch.fx.Node] = [
        n
        for n in graph.nodes
        if n.op == "call_function"
        and n.meta.get("effx_role") == "lm_head"
        and n.target == torch.ops.aten.linear.default
    ]
    if len(nodes) != 1:
        raise PassError(f"expected one LM head matmul in the stage graph, found {len(nodes)}")
    return nodes[0]


def _splice(
    gm: torch.fx.GraphModule,
    pattern: torch.fx.GraphModule,
    inputs: Sequence[torch.fx.node.Argument],
    pass_name: str,
) -> None:
    """Replace the LM head matmul of ``gm`` by ``pattern`` applied to ``inputs`` (nodes of ``gm``)."""
    g = gm.graph
    linear = _lm_head_node(g)
    before = set(g.nodes)
    placeholders = [n for n in pattern.graph.nodes if n.op == "placeholder"]
    with g.inserting_before(linear):
        # ``inputs`` are nodes of gm (the head's input and weight, and the ids)
        val_map = dict(zip(placeholders, cast("Sequence[torch.fx.Node]", inputs), strict=True))
        out = g.graph_copy(pattern.graph, val_map)
    # the patterns return (logits,)
    new = cast(torch.fx.Node, out[0] if isinstance(out, (tuple, list)) else out)
    for node in g.nodes:
        if node not in before:
            node.meta.update(effx_role="lm_head", effx_layer=None, effx_module="", effx_pass=pass_name)
    linear.replace_all_uses_with(new)
    g.erase_node(linear)
    g.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))


def _replace_lm_head(
    graph: torch.fx.GraphModule, pattern: torch.fx.GraphModule, pass_name: str, *, ids_input: bool
) -> torch.fx.GraphModule:
    import copy

    gm = torch.fx.GraphModule(graph, copy.deepcopy(graph.graph))
    g = gm.graph
    linear = _lm_head_node(g)
    x, weight = linear.args[0], linear.args[1]
    last = [n for n in g.nodes if n.op == "placeholder"][-1]
    with g.inserting_after(last):
        ids = g.placeholder("vocab_ids")
    ids.meta.update(effx_role="io", effx_layer=None, effx_module="")
    _splice(gm, pattern, (x, weight, ids), pass_name)
    gm.recompile()
    return gm


def static_subset_graph(
    graph: torch.fx.GraphModule, ids: torch.Tensor, info: ModelInfo, pass_name: str
) -> torch.fx.GraphModule:
    """``graph`` with its LM head sliced to the rows ``ids``: a new ``k x d`` weight, the full one dropped."""
    import copy

    gm = torch.fx.GraphModule(graph, copy.deepcopy(graph.graph))
    g = gm.graph
    linear = _lm_head_node(g)
    full = fetch(gm, cast(torch.fx.Node, linear.args[1]))  # the head's weight, a get_attr node
    gm.register_buffer("vocab_weight", full.detach()[ids].clone())
    gm.register_buffer("vocab_ids", ids.clone())
    with g.inserting_before(linear):
        w = g.get_attr("vocab_weight")
        i = g.get_attr("vocab_ids")
    for n in (w, i):
        n.meta.update(effx_role="lm_head", effx_layer=None, effx_module="", effx_pass=pass_name)
    _splice(gm, _subset_pattern(info, int(ids.numel())), (linear.args[0], w, i), pass_name)
    # rebuild so that only attributes the graph still uses (not the full head weight) stay on the module
    out = torch.fx.GraphModule(gm, gm.graph)
    out.recompile()
    return out


def _timing_note(program: Program, stages: Sequence[Stage], ks: dict[int | None, int]) -> str:
    """The head time per token, full vs reduced, measured now (batch 1, median of a few runs)."""
    info = program.info
    hidden = torch.randn(1, 1, info.hidden_size, dtype=torch_dtype(info))

    def median_ms(graph: Callable[..., object], *args: torch.Tensor) -> float:
        times: list[float] = []
        with torch.inference_mode():
            graph(*args)
            for _ in range(5):
                t = time.perf_counter()
                graph(*args)
                times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    full = median_ms(program.head.graph, hidden)
    parts = []
    by_name = {s.name: s for s in stages}
    for layer, k in ks.items():
        stage = by_name["head"] if layer is None else by_name[f"exit.{layer}"]
        args = [hidden] + ([hidden] if stage.kind == "exit" else [])
        if stage.attrs.get("vocab") == "pruned":
            args.append(torch.arange(k)[None])
        parts.append(f"{stage.name} (k={k}) {median_ms(stage.graph, *args):.2f} ms")
    return f"measured head time per token (batch 1): full head {full:.2f} ms; " + ", ".join(parts)
