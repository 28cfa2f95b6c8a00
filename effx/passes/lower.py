"""Lower: choose the kernels the torch backend runs a Program's products with (``Plan.kernels``).

``lower{kernels=fast}`` (the default step of :func:`effx.transform`) runs products, norms and rotary
embeddings on effx's CPU kernels (:mod:`effx.kernels`: bandwidth-bound for one token, about as cheap for a
few, batch invariant, float32 with last-bit differences from torch's MKL); ``lower{kernels=reference}`` runs
the captured ATen ops, bitwise equal to ``model.generate`` on CPU. The Program's graphs stay plain ATen: the
torch backend lowers copies of them (:func:`effx.kernels.lower.lower_graph`) when it first runs them, so
every pass, the ONNX export, neuron profiling and reports see the same graphs either way. The choice is
recorded in the plan, so an exported or reloaded Program says which kernels it runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..errors import PassConfigError, PassError
from ..plan import KERNELS
from .base import Pass, PassResult, register_pass

if TYPE_CHECKING:
    from ..program import Program

__all__ = ["Lower"]


@register_pass
@dataclass(frozen=True)
class Lower(Pass):
    """Record ``kernels`` ("fast" or "reference") in the plan; the report lists the kernel calls per stage."""

    name: ClassVar[str] = "lower"
    phase: ClassVar[str] = "lower"
    order_reason: ClassVar[str] = "it chooses kernels for the final graphs and weights"

    kernels: str = "fast"

    def __post_init__(self) -> None:
        if self.kernels not in KERNELS:
            raise PassConfigError(f"lower: kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")

    def apply(self, program: Program) -> PassResult:
        from .. import kernels as cpu

        report = self.new_report()
        if self.kernels == "fast":
            if cpu.available():
                report.notes.append(cpu.describe())
            else:
                report.notes.append(
                    f"effx's CPU kernels are not available here ({cpu.unavailable_reason()}); "
                    "the torch backend runs the reference ATen ops"
                )
            from ..kernels.lower import lowered, lowered_ops

            by_ops: dict[tuple[tuple[str, int], ...], list[str]] = {}
            for stage in program.stages:
                ops = lowered_ops(lowered(stage.graph))
                by_ops.setdefault(tuple(sorted(ops.items())), []).append(stage.name)
            if cpu.available():
                from ..kernels.layer import fuse_layer

                layers = [s for s in program.stages if s.kind == "layer"]
                fused = sum(fuse_layer(lowered(s.graph)) is not None for s in layers)
                if layers:
                    report.notes.append(
                        f"decoder layers run as one kernel call each: {fused} of {len(layers)} "
                        "(consecutive ones that share a mask: one call per step)"
                    )
            for counts, names in by_ops.items():
                site = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} stages)"
                if counts:
                    report.change(site, ", ".join(f"{n} x{c}" for n, c in counts))
                else:
                    report.skip(site, "no product, norm or rotary embedding to lower")
        if program.plan.kernels == self.kernels:
            report.notes.append(f"the plan already runs kernels={self.kernels}")
            return PassResult(program, False, report)
        plan = dataclasses.replace(program.plan, kernels=self.kernels)
        out = type(program)(
            list(program.stages), plan, generation_config=program.generation_config, reports=program.reports
        )
        return PassResult(out, True, report)

    def ensures(self, program: Program) -> None:
        if program.plan.kernels != self.kernels:
            raise PassError(f"the plan runs kernels={program.plan.kernels}, not {self.kernels}")
