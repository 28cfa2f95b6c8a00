"""Program: ordered stages (torch.fx GraphModules) plus a frozen, JSON-serializable Plan (:mod:`effx.plan`).

The Plan is all the runtime reads to decide what to run: stage order and signatures, the model's shapes,
the passes applied, the run-time policies and generation defaults. Stage graphs hold the computation; the
plan holds the decisions around them.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import torch

from .errors import PlanError
from .plan import (
    PLAN_SCHEMA_VERSION,
    STAGE_SIGNATURES,
    ModelInfo,
    Plan,
    Policy,
    StageSpec,
    stage_signature,
)

if TYPE_CHECKING:
    from .passes.base import PassReport

__all__ = [
    "PLAN_SCHEMA_VERSION",
    "STAGE_SIGNATURES",
    "ModelInfo",
    "Plan",
    "Policy",
    "Program",
    "Stage",
    "StageSpec",
    "torch_dtype",
]


def torch_dtype(info: ModelInfo) -> torch.dtype:
    """The torch dtype of the model's weights (``info.dtype`` names it)."""
    return getattr(torch, info.dtype)


@dataclass
class Stage:
    """One captured graph and what the plan says about it."""

    name: str
    kind: str
    graph: torch.fx.GraphModule
    layer: int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> StageSpec:
        inputs, outputs = stage_signature(self.kind, self.attrs)
        return StageSpec(self.name, self.kind, self.layer, inputs, outputs, dict(self.attrs))

    def with_graph(self, graph: torch.fx.GraphModule) -> Stage:
        return dataclasses.replace(self, graph=graph, attrs=dict(self.attrs))

    def with_attrs(self, **attrs: Any) -> Stage:
        """The same stage (same graph) with some attributes changed, e.g. an exit's threshold."""
        return dataclasses.replace(self, attrs={**self.attrs, **attrs})

    def copy_graph(self) -> torch.fx.GraphModule:
        """A new GraphModule over a copy of this stage's graph that shares its weights: edit it freely."""
        gm = self.graph
        return torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))

    def role_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.graph.graph.nodes:
            if node.op == "call_function":
                role = node.meta.get("effx_role", "?")
                counts[role] = counts.get(role, 0) + 1
        return counts


class Program:
    """Ordered stages + Plan. Passes return new Programs; the runtime runs them.

    ``Program`` objects are treated as immutable: a pass builds a new one (sharing unchanged stages and
    weights) rather than editing one in place.
    """

    def __init__(
        self,
        stages: list[Stage],
        plan: Plan,
        *,
        generation_config=None,
        reports: tuple[PassReport, ...] = (),
    ):
        self._stages = list(stages)
        self.plan = plan
        self.generation_config = generation_config
        self.reports = tuple(reports)
        specs = tuple(s.spec for s in self._stages)
        if specs != plan.stages:
            raise PlanError("the plan's stages do not match the program's stages")
        plan.validate()
        self.embed = self._stages[0]
        self.layers = [s for s in self._stages if s.kind == "layer"]
        self.head = self._stages[-1]
        # exit stages by the layer they follow
        self.exits: dict[int, Stage] = {s.layer: s for s in self._stages if s.kind == "exit"}
        # TokenDrop: layer -> (score stage, drop stage) of the drop before that layer
        self.drops: dict[int, tuple[Stage, Stage]] = {
            s.layer: (s, n)
            for s, n in zip(self._stages[:-1], self._stages[1:], strict=True)
            if s.kind == "token_score"
        }
        # the full head a vocabulary-reduced head falls back to, if any
        self.full_head: Stage | None = next((s for s in self._stages if s.kind == "full_head"), None)
        self.windows: frozenset[int | None] = frozenset(s.attrs.get("sliding_window") for s in self.layers)

    @classmethod
    def from_stages(cls, stages: list[Stage], info: ModelInfo, *, generation_config=None) -> Program:
        gen = copy.deepcopy(generation_config) if generation_config is not None else None
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        pad = getattr(gen, "pad_token_id", None) if gen is not None else None
        plan = Plan(
            model=info,
            stages=tuple(s.spec for s in stages),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            pad_token_id=None if pad is None else int(pad),
        )
        return cls(stages, plan, generation_config=gen)

    # -- structure -------------------------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        return self.plan.model

    @property
    def stages(self) -> tuple[Stage, ...]:
        return tuple(self._stages)

    def __iter__(self) -> Iterator[Stage]:
        return iter(self._stages)

    def stage(self, name: str) -> Stage:
        for s in self._stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r}; stages: {[s.name for s in self._stages]}")

    def replace(self, stages: dict[str, Stage]) -> Program:
        """A new Program with some stages replaced (by name); the rest are shared."""
        unknown = set(stages) - {s.name for s in self._stages}
        if unknown:
            raise PlanError(f"cannot replace unknown stages {sorted(unknown)}")
        new_stages = [stages.get(s.name, s) for s in self._stages]
        plan = dataclasses.replace(self.plan, stages=tuple(s.spec for s in new_stages))
        return Program(new_stages, plan, generation_config=self.generation_config, reports=self.reports)

    def with_stages(self, stages: Sequence[Stage], *, policy: Policy | None = None) -> Program:
        """A new Program with this stage list (stages may be added, e.g. exits) and, if given, a new policy."""
        plan = dataclasses.replace(
            self.plan,
            stages=tuple(s.spec for s in stages),
            policy=self.plan.policy if policy is None else policy,
        )
        return Program(list(stages), plan, generation_config=self.generation_config, reports=self.reports)

    def with_pass(self, record: dict[str, Any], report: PassReport) -> Program:
        """The same Program with a pass recorded in its plan and its report kept (the PassManager's job)."""
        plan = dataclasses.replace(self.plan, passes=self.plan.passes + (record,))
        return Program(
            self._stages, plan, generation_config=self.generation_config, reports=self.reports + (report,)
        )

    # -- running ---------------------------------------------------------------------------------------
    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """Generate like ``model.generate``: same inputs and output (prompt + new tokens, [batch, length]).

        See :func:`effx.runtime.generate` for the keyword arguments.
        """
        from .runtime.generate import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def __call__(self, input_ids, attention_mask=None):
        """Logits for every position of ``input_ids`` (a full forward, no cache)."""
        from .runtime.forward import forward_logits

        return forward_logits(self, input_ids, attention_mask)

    def calibrate(self, texts, tokenizer, *, target: float = 0.95, **kwargs):
        """Exit thresholds for ``target`` agreement with the full model on ``texts`` (teacher-forced).

        Returns ``(program, report)``: a new Program with the thresholds set, and a
        :class:`effx.calibrate.CalibrationReport` (agreement, exit rates, mean layers, estimated speed-up).
        """
        from .calibrate import calibrate

        return calibrate(self, texts, tokenizer, target=target, **kwargs)

    # -- measurement -----------------------------------------------------------------------------------
    def flops(self, *, context: int = 512, prompt: int | None = None) -> dict[str, int]:
        """FLOPs per stage for one decode token at ``context`` cached tokens (or a prefill of ``prompt``)."""
        from .flops import program_flops

        return program_flops(self, context=context, prompt=prompt)

    def report(self, file: TextIO | None = sys.stdout, *, context: int = 512) -> str:
        """Write (to ``file``, unless None) and return a summary: stages, roles, passes, FLOPs per token."""
        from .flops import format_report

        text = format_report(self, context=context)
        if file is not None:
            file.write(text + "\n")
        return text

    def __repr__(self) -> str:
        names = [p.get("name") for p in self.plan.passes]
        return (
            f"Program({self.info.architecture}, {len(self.layers)} layers, "
            f"passes={names or '[]'}, stages={len(self._stages)})"
        )
