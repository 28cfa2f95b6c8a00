"""NeuronMask's declaration: FFNs sliced to the neurons that matter. Static slices change only weights; mode
``core`` needs the decode loop: the prefill chooses each prompt's core neurons and decoding runs the MLPs
sliced to them (a backend that can slice weights at run time: the torch one). The pass:
``effx.passes.neuron_mask``; the prefill: ``effx.runtime.backend.core_neurons_prefill`` (which calls the torch backend's ``effx.runtime.neurons``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import PlanError
from . import Technique, register

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["NeuronMaskPolicy"]


@dataclass(frozen=True)
class NeuronMaskPolicy:
    """NeuronMask ``mode="core"``: the prefill chooses each prompt's core neurons (the ``top_share`` of
    neurons by magnitude per token, counted over the prompt); decoding runs the MLPs sliced to them."""

    mode: str
    top_share: float = 0.2

    def __post_init__(self) -> None:
        if self.mode != "core":
            raise PlanError(f"neuron-mask policy has unknown mode {self.mode!r} (only 'core' needs one)")


def _validate(plan: Plan) -> str | None:
    if plan.policy.get("neuron_mask") is not None and plan.drops:
        return (
            "token-drop and neuron-mask mode='core' both choose what the prefill computes; a plan holds one"
        )
    return None


register(
    Technique(
        name="neuron-mask",
        key="neuron_mask",
        policy=NeuronMaskPolicy,
        rollback=lambda policy, plan: True,
        capabilities=lambda policy: ("core-neurons",),
        validate=_validate,
        prefill="effx.runtime.backend:core_neurons_prefill",
        doc="FFNs sliced to profiled or per-prompt core neurons",
    )
)
