"""The Backend: what the decode loop (:mod:`effx.runtime.loop`) asks of the machinery that runs stages.

The loop makes every run-time decision once, on arrays of the backend's namespace ``xp`` (the Python array
API); a backend only runs stages and owns what differs between engines:

* ``run(stage, *inputs)``: one stage of the plan (a torch GraphModule, an ONNX Runtime session);
* ``run_layers(cache, layers, hidden, cos, sin, masks)``: a run of consecutive layers, which a backend may
  execute as one fused segment;
* ``new_cache(batch, capacity, rollback=...)``: the KV cache (an ONNX backend may keep it on its device when
  no slot is ever rolled back);
* ``compute()``: the context the loop runs in (``torch.inference_mode``);
* capabilities: what only some backends can do (run-time graph surgery: ``CORE_NEURONS``, ``KV_COPY``).
  The loop calls :meth:`Backend.require` before it needs one, which raises a typed error naming the backend.

Torch-free: backends import their engines; this module and the loop import none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import BackendCapabilityError
from ..plan import Plan, StageLike, StageSpec
from .stats import DecodeStats

if TYPE_CHECKING:
    from ..arrays import Array
    from .forward import KVCache, MaskCache

__all__ = ["CORE_NEURONS", "KV_COPY", "Backend", "core_neurons_prefill", "describe", "needed_capabilities"]

# per-prompt core neurons (NeuronMask mode="core"): the prefill slices MLP weights per prompt
CORE_NEURONS = "core-neurons"
# CALM state copying (EarlyExit kv="copy"): KV projections of the layers a token skipped
KV_COPY = "kv-copy"

_WHAT = {
    CORE_NEURONS: "neuron-mask mode='core' (per-prompt neuron choice slices weights at run time; use mode='static')",
    KV_COPY: "early exit with kv='copy' (its KV projection graphs are not exported; use kv='deferred', which is exact)",
}


def needed_capabilities(plan: Plan) -> list[str]:
    """The capabilities a backend needs to run ``plan`` beyond running its stages (each technique's
    ``capabilities``, see ``effx.techniques``)."""
    needed: list[str] = []
    for t, policy in plan.used_techniques:
        if t.capabilities is not None and policy is not None:
            needed += [c for c in t.capabilities(policy) if c not in needed]
    return needed


def core_neurons_prefill(
    backend: Backend,
    cache: KVCache,
    input_ids: Array,
    positions: Array,
    key_valid: Array,
    stats: DecodeStats | None,
) -> tuple[Array, Backend] | None:
    """NeuronMask's prefill hook: per-prompt core neurons (mode "core") on a backend that can slice its MLPs;
    None for a plan without them."""
    if not backend.plan.policy.core_neurons:
        return None
    backend.require(CORE_NEURONS)
    return backend.core_prefill(cache, input_ids, positions, key_valid, stats)


def describe(capability: str) -> str:
    """What a capability is, for error messages."""
    return _WHAT.get(capability, capability)


class Backend:
    """Runs a Plan's stages. Subclasses set ``name``, ``xp``, ``plan``, ``dtype`` and ``capabilities``."""

    name: str = "backend"
    xp: Any = None
    plan: Plan
    dtype: Any = None  # the dtype of hidden states, masks and the cache
    capabilities: frozenset[str] = frozenset()

    # -- what every backend implements ----------------------------------------------------------------
    def run(self, stage: StageLike, *inputs: Array) -> Sequence[Array]:
        """Run ``stage`` on ``inputs`` (its plan signature); returns its outputs in signature order."""
        raise NotImplementedError(f"{type(self).__name__} does not implement run()")

    def new_cache(self, batch: int, capacity: int, *, rollback: bool = True) -> KVCache:
        """An empty KV cache for ``batch`` rows of ``capacity`` slots; ``rollback=False`` promises that no
        slot is ever truncated or dropped."""
        from .forward import KVCache

        info = self.plan.model
        return KVCache(
            info.num_layers, batch, info.num_kv_heads, capacity, info.head_dim, self.dtype, xp=self.xp
        )

    def run_layers(
        self,
        cache: KVCache,
        layers: Sequence[StageLike],
        hidden: Array,
        cos: Array,
        sin: Array,
        masks: MaskCache,
    ) -> Array:
        """Run ``layers`` (specs, consecutive) on new tokens that start at each layer's filled length."""
        from .forward import run_layer_stages

        return run_layer_stages(self, cache, layers, hidden, cos, sin, masks)

    def compute(self) -> contextlib.AbstractContextManager[object]:
        """The context a generation runs in."""
        return contextlib.nullcontext()

    # -- capabilities ---------------------------------------------------------------------------------
    def require(self, capability: str) -> None:
        """Raise :class:`BackendCapabilityError` unless this backend has ``capability``."""
        if capability not in self.capabilities:
            raise BackendCapabilityError(f"the {self.name} backend cannot run {describe(capability)}")

    def core_prefill(
        self,
        cache: KVCache,
        input_ids: Array,
        positions: Array,
        key_valid: Array,
        stats: DecodeStats | None,
    ) -> tuple[Array, Backend]:
        """``CORE_NEURONS``: the prefill that chooses core neurons; returns ``(logits, backend)``, the backend
        to decode with (its MLPs sliced to the chosen neurons)."""
        self.require(CORE_NEURONS)
        raise NotImplementedError

    def project_kv(self, layer: StageSpec, hidden: Array, cos: Array, sin: Array) -> tuple[Array, Array]:
        """``KV_COPY``: the keys and values ``layer`` would compute from ``hidden``."""
        self.require(KV_COPY)
        raise NotImplementedError
