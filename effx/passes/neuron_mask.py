"""NeuronMask: compute a subset of each chosen layer's MLP neurons.

A gated MLP is ``down(act(gate(x)) * up(x))`` with ``F`` intermediate neurons (1536 on SmolLM2, about two
thirds of a layer's FLOPs and weights). Three modes:

``mode="static"`` (PartInfer: partial loading and partial computation). From a neuron profile
(``effx.profile_neurons``) keep the ``keep * F`` most important neurons of each layer in ``layers`` and
slice the weights to them: ``gate`` and ``up`` to ``k x d`` rows, ``down`` to ``d x k`` columns. The
matmuls are smaller, and the dropped weights are not held by the stage graph (nor in an exported
artifact)::

    before:  down[d, F] @ (act(gate[F, d] @ x) * (up[F, d] @ x))
    after:   down[d, k] @ (act(gate[k, d] @ x) * (up[k, d] @ x))       k = keep * F

Importance (``score``): ``contribution`` (mean ``|act(gate) * up|`` times the norm of the neuron's
``down`` column: how much it adds to the output, the default), ``mean`` (mean magnitude), ``freq`` (how
often it is among a token's top neurons) or ``random`` (a random mask of the same size, as a baseline).
With ``base=<model-wide profile>`` a ``base_share`` of the kept neurons come from it and the rest from the
task ``profile`` (PartInfer's model and dataset neuron files).

``mode="core"`` (CoreInfer: sentence-level core neurons). The prefill runs the full MLP; for each prompt
the runtime keeps the ``keep * F`` neurons most often among its tokens' top ``top_share`` neurons, and
decodes with weights sliced to them, per sample in a batch.

``mode="threshold"`` (CATS/TEAL-style magnitude sparsity). Per layer, ``|act(gate)|`` below a threshold
read from the profile for the target ``sparsity`` is zeroed, per token. The matmuls stay dense: on CPU this
saves no time (a gather of the active rows costs more than it saves at these sizes), it shows the quality
effect, and the report says so.

``keep=1.0`` and ``sparsity=0`` leave the program unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch

from ..errors import PassConfigError, PassError, PassPreconditionError
from ..flops import param_bytes
from ..formats import load_neuron_profile
from ..fx import fetch, mlp_nodes, slice_mlp, tag_nodes
from ..plan import NeuronMaskPolicy
from .base import Pass, PassResult, check_read, register_pass

if TYPE_CHECKING:
    from ..formats import NeuronProfile
    from ..plan import ModelInfo
    from ..program import Program, Stage

__all__ = ["NeuronMask"]

MODES = ("static", "core", "threshold")
SCORES = ("contribution", "mean", "freq", "random")


@register_pass
@dataclasses.dataclass(frozen=True)
class NeuronMask(Pass):
    """Neuron-masked FFNs: static (sliced weights), per-prompt core neurons, or per-token thresholds."""

    name = "neuron-mask"

    keep: float = 0.5
    profile: str = ""
    layers: tuple[int, ...] = ()
    mode: str = "static"
    score: str = "contribution"
    base: str = ""
    base_share: float = 0.5
    seed: int = 0
    top_share: float = 0.2
    sparsity: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PassConfigError(f"unknown neuron-mask mode {self.mode!r}; modes: {', '.join(MODES)}")
        if not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise PassConfigError(f"neuron-mask keep must be a fraction in (0, 1], got {self.keep!r}")
        if not 0 <= self.sparsity < 1:
            raise PassConfigError(f"neuron-mask sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.score not in SCORES:
            raise PassConfigError(f"unknown neuron-mask score {self.score!r}; scores: {', '.join(SCORES)}")
        if len(self.layers) not in (0, 2) or any(not isinstance(x, int) for x in self.layers):
            raise PassConfigError(
                f"neuron-mask layers is (start, end), both included, e.g. layers=3,27; got {list(self.layers)}"
            )
        if self.layers and not 0 <= self.layers[0] <= self.layers[1]:
            raise PassConfigError(
                f"neuron-mask layers=({self.layers[0]}, {self.layers[1]}) is not 0 <= start <= end"
            )
        needs_profile = self.mode == "threshold" or (self.mode == "static" and self.score != "random")
        if needs_profile and not self.profile:
            raise PassConfigError(
                f"neuron-mask mode={self.mode!r} needs profile=<file> (write one with effx.profile_neurons)"
            )
        if self.base and self.mode != "static":
            raise PassConfigError("neuron-mask base=<profile> combines profiles for mode='static' only")
        if not 0 <= self.base_share <= 1:
            raise PassConfigError(f"neuron-mask base_share must be in [0, 1], got {self.base_share!r}")
        if not 0 < self.top_share <= 1:
            raise PassConfigError(f"neuron-mask top_share must be in (0, 1], got {self.top_share!r}")

    def layer_range(self, num_layers: int) -> list[int]:
        if not self.layers:
            return list(range(num_layers))
        start, end = self.layers
        if end >= num_layers:
            raise PassError(
                f"neuron-mask layers=({start}, {end}) is out of range: the model has layers 0..{num_layers - 1}"
            )
        return list(range(start, end + 1))

    def check_model(self, info: ModelInfo) -> None:
        self.layer_range(info.num_layers)

        check_read("neuron-mask profile", self.profile, lambda path: load_neuron_profile(path, info))
        check_read("neuron-mask base", self.base, lambda path: load_neuron_profile(path, info))

    def check_after(self, earlier: Sequence[Pass]) -> None:
        if self.mode == "core" and any(p.name == "token-drop" for p in earlier):
            raise PassPreconditionError(
                "neuron-mask mode='core' and an earlier token-drop both own the prefill; use one of them"
            )

    def requires(self, program: Program) -> None:
        """Layers in range that carry no neuron mask yet; for ``mode="core"``, a Program that drops no
        tokens (TokenDrop and core neurons both choose what the prefill computes)."""
        chosen = self.layer_range(program.info.num_layers)
        masked = [
            s.layer
            for s in program.layers
            if s.layer in chosen and (s.attrs.get("neurons") or s.attrs.get("core_neurons"))
        ]
        if masked:
            raise PassError(f"layers {masked} already have neuron masks (from an earlier neuron-mask)")
        if self.mode == "core" and program.drops:
            raise PassError(
                "neuron-mask mode='core' and token-drop both own the prefill (an earlier token-drop drops "
                f"tokens before layers {sorted(program.drops)}); use one of them"
            )

    def apply(self, program: Program) -> PassResult:
        self.requires(program)

        info = program.info
        chosen = self.layer_range(info.num_layers)
        report = self.new_report()
        identity = self.sparsity == 0 if self.mode == "threshold" else self.keep >= 1
        if identity:
            what = "sparsity=0" if self.mode == "threshold" else "keep=1.0"
            report.skip("all", f"{what}: every neuron is kept, the program is unchanged")
            return PassResult(program, False, report)
        profile = base = None
        if self.profile:
            profile = load_neuron_profile(self.profile, info)
        if self.base:
            base = load_neuron_profile(self.base, info)
        width = info.intermediate_size
        k = max(1, round(self.keep * width))
        replace = {}
        bytes_before = bytes_after = 0
        for stage in program.layers:
            if stage.layer not in chosen:
                continue
            i = stage.layer
            if self.mode == "static":
                idx = self._choose(stage, profile, base, k)
                gm = slice_mlp(stage.graph, idx, self.name)
                replace[stage.name] = stage.with_graph(gm).with_attrs(neurons=k)
                report.change(stage.name, f"MLP sliced to {k} of {width} neurons ({self.score})")
            elif self.mode == "threshold":
                # __post_init__: mode="threshold" needs a profile
                t = cast("NeuronProfile", profile).gate_threshold(i, self.sparsity)
                gm = threshold_mlp(stage.graph, t, self.name)
                replace[stage.name] = stage.with_graph(gm).with_attrs(neurons="threshold", gate_threshold=t)
                report.change(stage.name, f"|act(gate)| < {t:.4g} zeroed (target sparsity {self.sparsity:g})")
            else:
                replace[stage.name] = stage.with_attrs(core_neurons=k)
                report.change(stage.name, f"decodes with each prompt's {k} core neurons of {width}")
            bytes_before += param_bytes(stage.graph)
            bytes_after += param_bytes(replace[stage.name].graph)
        stages = [replace.get(s.name, s) for s in program.stages]
        policy = program.plan.policy
        if self.mode == "core":
            policy = policy.updated(neuron_mask=NeuronMaskPolicy(mode="core", top_share=self.top_share))
            report.notes.append(
                "core: FLOPs/token here count the full MLP, which the prefill runs; decoding "
                f"runs {k}/{width} of the MLP in layers {chosen[0]}..{chosen[-1]}"
            )
        if self.mode == "threshold":
            report.notes.append(
                "threshold: the matmuls stay dense, so on CPU this saves no time or FLOPs; it shows the "
                "quality effect of the sparsity (a gather-based kernel would be needed for speed)"
            )
        if self.mode == "static":
            report.notes.append(
                f"weights of layers {chosen[0]}..{chosen[-1]}: {bytes_before / 1e6:.2f} MB -> {bytes_after / 1e6:.2f} MB"
            )
        return PassResult(program.with_stages(stages, policy=policy), bool(report.changed), report)

    def _choose(
        self, stage: Stage, profile: NeuronProfile | None, base: NeuronProfile | None, k: int
    ) -> torch.Tensor:
        """The kept neuron ids of one layer, sorted."""
        i = cast(int, stage.layer)  # a layer stage's layer
        if self.score == "random":
            g = torch.Generator().manual_seed(self.seed * 100_003 + i)
            return torch.sort(torch.randperm(_mlp_width(stage.graph), generator=g)[:k]).values
        # __post_init__: every score but "random" needs a profile
        order = _ranking(cast("NeuronProfile", profile), i, self.score, stage.graph)
        if base is None:
            return torch.sort(order[:k]).values
        from_base = round(self.base_share * k)
        first = _ranking(base, i, self.score, stage.graph)[:from_base]
        rest = order[~torch.isin(order, first)][: k - from_base]
        return torch.sort(torch.cat([first, rest])).values

    def ensures(self, program: Program) -> None:
        chosen = self.layer_range(program.info.num_layers)
        key = "core_neurons" if self.mode == "core" else "neurons"
        changed = [s for s in program.layers if s.layer in chosen and s.attrs.get(key)]
        identity = self.sparsity == 0 if self.mode == "threshold" else self.keep >= 1
        if not identity and len(changed) != len(chosen):
            raise PassError(f"layers {chosen} should all carry neuron masks; {len(changed)} do")


def _mlp_width(gm: torch.fx.GraphModule) -> int:
    gate, _, _ = mlp_nodes(gm.graph)
    return int(fetch(gm, gate.args[1]).shape[0])


def _ranking(profile: NeuronProfile, layer: int, score: str, gm: torch.fx.GraphModule) -> torch.Tensor:
    """Neuron ids of ``layer``, most important first."""
    mean = profile.mean_abs[layer].double()
    if score == "freq":  # ties (common: counts) broken by magnitude
        by_mean = torch.argsort(mean, descending=True, stable=True)
        return by_mean[torch.argsort(profile.freq[layer][by_mean], descending=True, stable=True)]
    if score == "contribution":
        _, _, down = mlp_nodes(gm.graph)
        mean = mean * fetch(gm, down.args[1]).double().norm(dim=0)
    return torch.argsort(mean, descending=True, stable=True)


def threshold_mlp(graph: torch.fx.GraphModule, threshold: float, pass_name: str) -> torch.fx.GraphModule:
    """``graph`` with ``act(gate)`` zeroed where its magnitude is below ``threshold``."""
    gm = torch.fx.GraphModule(graph, copy.deepcopy(graph.graph))
    g = gm.graph
    gate, _, _ = mlp_nodes(g)
    act = next(iter(gate.users))
    aten = torch.ops.aten
    with g.inserting_before(act.next):
        mag = g.call_function(aten.abs.default, (act,))
        keep = g.call_function(aten.ge.Scalar, (mag, threshold))
        zero = g.call_function(aten.zeros_like.default, (act,))
        masked = g.call_function(aten.where.self, (keep, act, zero))
    act.replace_all_uses_with(masked, delete_user_cb=lambda n: n not in (mag, zero, masked))
    tag_nodes([mag, keep, zero, masked], pass_name, "mlp.act")
    gm.recompile()
    return gm
