"""The Plan: what a Program is, as data. Torch-free: an ONNX-only deployment loads it with numpy alone.

A Plan is frozen and JSON-serializable (``Plan.from_json(plan.to_json())`` round-trips): the model's
shapes (:class:`ModelInfo`), the ordered stages with their typed signatures (:class:`StageSpec`), the
passes applied, stop and pad tokens, and the run-time policies the passes set (:class:`Policy`). The
decode loop (``effx.runtime.loop``) reads only this and calls a backend to run the stages.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

from . import techniques
from .errors import PlanError
from .techniques.early_exit import PRUNED_EXIT_SIGNATURE, EarlyExitPolicy
from .techniques.neuron_mask import NeuronMaskPolicy
from .techniques.prompt_lookup import PromptLookupPolicy
from .techniques.token_drop import TokenDropPolicy

__all__ = [
    "KERNELS",
    "FAMILIES",
    "PLAN_SCHEMA_VERSION",
    "PRUNED_EXIT_SIGNATURE",
    "STAGE_SIGNATURES",
    "EarlyExitPolicy",
    "ModelInfo",
    "NeuronMaskPolicy",
    "Plan",
    "PromptLookupPolicy",
    "Policy",
    "StageLike",
    "StageSpec",
    "TokenDropPolicy",
    "stage_signature",
]

# A field added with a default (``kernels``, ``activations``, ``model.family``) keeps the version: a plan
# written before it loads with the default. A change an older plan cannot be read under bumps it.
PLAN_SCHEMA_VERSION = 1

# The model families effx captures, each its own kind of program: decoder-only LMs (a Program with a Plan),
# encoders (BERT), encoder-decoder LMs (BART, T5) and recurrent LMs (Mamba). A pass declares the ones it
# applies to (``Pass.families``); the PassManager refuses it on any other.
FAMILIES = ("decoder", "encoder", "encoder-decoder", "recurrent")

# How the torch backend runs a plan's products (``Plan.kernels``): "reference" runs the captured ATen ops
# (bitwise equal to ``model.generate`` on CPU); "fast" runs effx's CPU kernels (``effx.kernels``) where this
# machine has them, the reference ops elsewhere. ONNX Runtime always uses its own kernels.
KERNELS = ("reference", "fast")
# What quantized products multiply their weights with (``Plan.activations``, set by
# ``quantize{activations=...}``): "float", the float32 input (exact: the float product over the de-quantized
# weights); "int8", the input rounded per block (the weight's group) to ``scale * int8`` (scale = the
# block's largest magnitude / 127), as llama.cpp's Q8_1 activations and ONNX Runtime's MatMulNBits accuracy
# level 4 do: lossy; both backends multiply it in integer arithmetic (the torch backend's kernels: exact
# integer sums per 4 values, then float steps per lane, see effx/kernels/cpu.c).
ACTIVATIONS = ("float", "int8")


def stage_signature(kind: str, attrs: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The inputs and outputs of a stage of ``kind`` with ``attrs`` (as its technique declares them)."""
    return techniques.stage_kind(kind).signature(attrs)


class _Signatures(Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]]):
    """Stage kind -> its plain signature, for every kind the registry holds now (``effx.techniques``)."""

    def __getitem__(self, kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        k = techniques.stage_kinds()[kind]
        return k.inputs, k.outputs

    def __iter__(self) -> Iterator[str]:
        return iter(techniques.stage_kinds())

    def __len__(self) -> int:
        return len(techniques.stage_kinds())


STAGE_SIGNATURES: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = _Signatures()


@dataclass(frozen=True)
class ModelInfo:
    """Shapes and identity of the captured model; ``dtype`` is the name of the weights' float type."""

    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    dtype: str
    tie_word_embeddings: bool
    source: str = ""  # where the weights came from (the model directory transformers loaded), if known
    # rotary tables the embed stage computes (Gemma 3: one for local layers, one for global ones), concatenated
    # along the last axis of its cos/sin; each layer slices its own
    rope_tables: int = 1
    # the model family (one of FAMILIES); a Plan is a decoder's, and plans written before the field say none
    family: str = "decoder"

    @property
    def rope_width(self) -> int:
        """The last axis of the embed stage's ``cos``/``sin``."""
        return self.rope_tables * self.head_dim


@dataclass(frozen=True)
class StageSpec:
    """A stage as the plan records it: its name, kind, layer, signature and attributes.

    ``attrs`` holds what the runtime needs to know about the stage: ``sliding_window`` for a layer;
    ``threshold`` and ``measure`` for an exit (whose ``layer`` is the layer it follows).
    """

    name: str
    kind: str
    layer: int | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


class StageLike(Protocol):
    """What the runtime reads of a stage: a plan's :class:`StageSpec`, or a Program's ``Stage`` (which the
    torch backend runs directly)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def layer(self) -> int | None: ...
    @property
    def attrs(self) -> dict[str, Any]: ...


# -- run-time policies: what a pass asks of the decode loop ---------------------------------------------

P = TypeVar("P")


@dataclass(frozen=True, init=False)
class Policy:
    """The run-time policies of a Program: per technique that needs the decode loop's help, its settings
    (``effx.techniques``: ``Technique.key`` -> ``Technique.policy``), absent when it is not used.

    ``Policy(early_exit=EarlyExitPolicy(...))``; read them with ``policy.of(EarlyExitPolicy)`` (typed) or
    ``policy.get("early_exit")``; ``policy.early_exit`` works for every registered key (None: absent), and
    ``dataclasses.replace(policy, prompt_lookup=...)`` adds or replaces one."""

    entries: tuple[tuple[str, Any], ...] = ()

    def __init__(self, entries: Iterable[tuple[str, Any]] = (), **policies: Any) -> None:
        merged = {**dict(entries), **policies}
        types = techniques.policy_types()
        unknown = sorted(k for k in merged if k not in types)
        if unknown:
            raise PlanError(
                f"policies {unknown} belong to no registered technique (known: {', '.join(types)})"
            )
        for key, value in merged.items():
            if value is not None and not isinstance(value, types[key]):
                raise PlanError(f"policy {key!r} is a {types[key].__name__}, got {type(value).__name__}")
        order = list(types)
        kept = sorted(((k, v) for k, v in merged.items() if v is not None), key=lambda kv: order.index(kv[0]))
        object.__setattr__(self, "entries", tuple(kept))

    def __getattr__(self, name: str) -> Any:
        if name in techniques.policy_types():
            return self.get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def updated(self, **policies: Any) -> Policy:
        """A copy with the settings ``policies`` (``key=settings``) added or replaced (None removes one)."""
        return Policy(self.entries, **policies)

    def get(self, key: str) -> Any:
        """The settings recorded under ``key``, or None."""
        return next((v for k, v in self.entries if k == key), None)

    def of(self, kind: type[P]) -> P | None:
        """The settings of type ``kind``, or None."""
        return next((v for _, v in self.entries if isinstance(v, kind)), None)

    @property
    def core_neurons(self) -> bool:
        mask = self.get("neuron_mask")
        return mask is not None and mask.mode == "core"

    def to_dict(self) -> dict[str, Any]:
        return {k: dataclasses.asdict(v) for k, v in self.entries}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Policy:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise PlanError(f"a plan's policy is a JSON object, got {type(data).__name__}")
        types = techniques.policy_types()
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise PlanError(f"the plan has policies {unknown} that this effx does not know")
        out = {}
        for key, value in data.items():
            if not isinstance(value, dict):
                raise PlanError(f"policy {key!r} is a JSON object, got {value!r}")
            try:
                out[key] = types[key](**value)
            except (TypeError, ValueError) as e:
                raise PlanError(f"malformed policy {key!r}: {e}") from e
        return cls(**out)


@dataclass(frozen=True)
class Plan:
    """Frozen, JSON-serializable description of a Program. ``from_json(to_json())`` round-trips."""

    model: ModelInfo
    stages: tuple[StageSpec, ...]
    passes: tuple[dict[str, Any], ...] = ()
    policy: Policy = field(default_factory=Policy)
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    kernels: str = "reference"
    activations: str = "float"
    schema_version: int = PLAN_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["policy"] = self.policy.to_dict()
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"a plan is a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != PLAN_SCHEMA_VERSION:
            raise PlanError(
                f"plan schema version {version!r} is not supported (this effx reads version {PLAN_SCHEMA_VERSION}); "
                "re-create the plan with this version of effx"
            )
        try:
            model = ModelInfo(**data["model"])
            stages = tuple(
                StageSpec(
                    **{
                        **s,
                        "inputs": tuple(s["inputs"]),
                        "outputs": tuple(s["outputs"]),
                        "attrs": dict(s.get("attrs", {})),
                    }
                )
                for s in data["stages"]
            )
            plan = cls(
                model=model,
                stages=stages,
                passes=tuple(data.get("passes", ())),
                policy=Policy.from_dict(data.get("policy")),
                eos_token_ids=tuple(data.get("eos_token_ids", ())),
                pad_token_id=data.get("pad_token_id"),
                kernels=data.get("kernels", "reference"),  # plans written before kernels existed
                activations=data.get("activations", "float"),
            )
        except (KeyError, TypeError) as e:
            raise PlanError(f"malformed plan: {e}") from e
        plan.validate()
        return plan

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from e
        return cls.from_dict(data)

    # -- views the runtime uses (computed once: a Plan is frozen) ---------------------------------------
    @functools.cached_property
    def layers(self) -> tuple[StageSpec, ...]:
        return tuple(s for s in self.stages if s.kind == "layer")

    @functools.cached_property
    def embed(self) -> StageSpec:
        return self.stages[0]

    @functools.cached_property
    def head(self) -> StageSpec:
        return self.stages[-1]

    @functools.cached_property
    def exits(self) -> dict[int, StageSpec]:
        """Exit stages by the layer they follow."""
        # validate(): an exit follows its layer, and layers are 0..n-1, so an exit's layer is an int
        return {cast(int, s.layer): s for s in self.stages if s.kind == "exit"}

    @functools.cached_property
    def drops(self) -> dict[int, tuple[StageSpec, StageSpec]]:
        """TokenDrop: layer -> (score stage, drop stage) of the drop before that layer."""
        # validate(): a token_score stage precedes its token_drop and layer, so its layer is an int
        return {
            cast(int, s.layer): (s, n)
            for s, n in zip(self.stages[:-1], self.stages[1:], strict=True)
            if s.kind == "token_score"
        }

    @functools.cached_property
    def full_head(self) -> StageSpec | None:
        """The full head a vocabulary-reduced head falls back to, if any."""
        return next((s for s in self.stages if s.kind == "full_head"), None)

    @functools.cached_property
    def windows(self) -> frozenset[int | None]:
        return frozenset(s.attrs.get("sliding_window") for s in self.layers)

    @functools.cached_property
    def decode_mode(self) -> str:
        """``"dense"``, ``"lossy"`` or ``"self-speculative"``: how the loop decodes this plan."""
        ee = self.policy.early_exit
        return ee.mode if ee is not None and self.exits else "dense"

    @functools.cached_property
    def used_techniques(self) -> tuple[tuple[techniques.Technique, Any], ...]:
        """The registered techniques this plan uses, each with its policy (None for one without a policy
        whose stage kinds the plan holds), in registration order."""
        kinds = {s.kind for s in self.stages}
        used = []
        for t in techniques.techniques():
            policy = self.policy.get(t.key) if t.policy is not None else None
            if policy is not None or any(k.name in kinds for k in t.stage_kinds):
                used.append((t, policy))
        return tuple(used)

    @property
    def speculative(self) -> bool:
        """Whether the loop drafts and verifies (prompt lookup, self-speculative exits, any technique whose
        ``speculative`` flag says so): token-identical to the plan's dense greedy decoding, and sampled runs
        distributed as its dense sampling."""
        return any(
            t.speculative is not None and t.speculative(p, self)
            for t, p in self.used_techniques
            if p is not None
        )

    @property
    def decides(self) -> bool:
        """Whether a technique's per-step decisions choose the tokens (lossy exits): the output is not the
        dense one's, and a teacher-forced scorer must score what the loop decodes."""
        return any(
            t.decides is not None and t.decides(p, self) for t, p in self.used_techniques if p is not None
        )

    @property
    def rollback(self) -> bool:
        """Whether the KV cache must be able to roll back (a technique writes entries it may take back)."""
        return any(
            t.rollback is not None and t.rollback(p, self) for t, p in self.used_techniques if p is not None
        )

    def validate(self) -> None:
        """Check that the stages form a runnable model: embed, each layer once and in order, head, with each
        technique's stages where it declares they stand (``StageKind.check``); and that the policies fit the
        stages (``Technique.validate``)."""
        if self.model.family != "decoder":
            raise PlanError(
                f"a plan describes a decoder-only LM; model.family is {self.model.family!r} "
                f"(families: {', '.join(FAMILIES)})"
            )
        kinds = [s.kind for s in self.stages]
        if not kinds or kinds[0] != "embed" or kinds[-1] != "head":
            raise PlanError(f"a plan starts with an embed stage and ends with a head stage; got {kinds}")
        layers = [s.layer for s in self.stages if s.kind == "layer"]
        if layers != list(range(self.model.num_layers)):
            raise PlanError(f"plan layers {layers} are not 0..{self.model.num_layers - 1} in order")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise PlanError(f"stage names repeat: {names}")
        self._validate_stages()
        if self.kernels not in KERNELS:
            raise PlanError(f"plan kernels {self.kernels!r} is not one of {', '.join(KERNELS)}")
        if self.activations not in ACTIVATIONS:
            raise PlanError(f"plan activations {self.activations!r} is not one of {', '.join(ACTIVATIONS)}")
        if not isinstance(self.policy, Policy):
            raise PlanError(f"a plan's policy is a Policy, got {type(self.policy).__name__}")
        for t in techniques.techniques():
            problem = t.validate(self) if t.validate is not None else None
            if problem:
                raise PlanError(problem)

    def _validate_stages(self) -> None:
        known = techniques.stage_kinds()
        for i, s in enumerate(self.stages):
            kind = known.get(s.kind)
            if kind is None:
                raise PlanError(f"stage {s.name!r} has unknown kind {s.kind!r}")
            if (s.inputs, s.outputs) != kind.signature(s.attrs):
                raise PlanError(
                    f"stage {s.name!r} signature {s.inputs} -> {s.outputs} is not that of a {s.kind}"
                )
            if kind.check is not None and 0 < i:
                nxt = self.stages[i + 1] if i + 1 < len(self.stages) else None
                problem = kind.check(self.stages[i - 1], s, nxt)
                if problem:
                    raise PlanError(problem)
