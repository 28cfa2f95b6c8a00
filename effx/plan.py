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
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from .errors import PlanError

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

STAGE_SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "embed": (("input_ids", "position_ids"), ("hidden", "cos", "sin")),
    "layer": (("hidden", "cos", "sin", "mask", "past_k", "past_v"), ("hidden", "k", "v")),
    "head": (("hidden",), ("logits",)),
    "exit": (("hidden", "prev_hidden"), ("logits", "confidence")),
    # the full-vocabulary head that a vocabulary-reduced head falls back to (VocabReduce where="head")
    "full_head": (("hidden",), ("logits",)),
    # TokenDrop before layer j: importance of each prompt token (cut from layer j), then the gather
    "token_score": (("hidden", "cos", "sin", "mask", "past_k", "past_v"), ("scores",)),
    "token_drop": (("hidden", "cos", "sin", "keep_ids"), ("hidden", "cos", "sin")),
}
# an exit that scores only the token ids it is given (VocabReduce where="exits"; attrs vocab="pruned")
PRUNED_EXIT_SIGNATURE = (("hidden", "prev_hidden", "vocab_ids"), ("logits", "confidence"))


def stage_signature(kind: str, attrs: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The inputs and outputs of a stage of ``kind`` with ``attrs``."""
    if kind == "exit" and attrs.get("vocab") == "pruned":
        return PRUNED_EXIT_SIGNATURE
    return STAGE_SIGNATURES[kind]


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


@dataclass(frozen=True)
class EarlyExitPolicy:
    """EarlyExit: ``mode`` "lossy" (exits with deferred KV, or ``kv="copy"``) or "self-speculative"
    (the shallowest exit drafts up to ``draft`` tokens that the full model verifies)."""

    mode: str
    draft: int = 4
    measure: str = "softmax-max"
    kv: str = "deferred"

    def __post_init__(self) -> None:
        if self.mode not in ("lossy", "self-speculative"):
            raise PlanError(f"early-exit policy has unknown mode {self.mode!r}")
        if self.kv not in ("deferred", "copy"):
            raise PlanError(f"early-exit policy has unknown kv {self.kv!r}")
        if not isinstance(self.draft, int) or self.draft < 1:
            raise PlanError(f"early-exit policy draft must be an integer >= 1, got {self.draft!r}")


@dataclass(frozen=True)
class TokenDropPolicy:
    """TokenDrop: the last ``protect_last`` prompt tokens and the ``special`` token ids are always kept."""

    protect_last: int
    special: tuple[int, ...] = ()


@dataclass(frozen=True)
class NeuronMaskPolicy:
    """NeuronMask ``mode="core"``: the prefill chooses each prompt's core neurons (the ``top_share`` of
    neurons by magnitude per token, counted over the prompt); decoding runs the MLPs sliced to them."""

    mode: str
    top_share: float = 0.2

    def __post_init__(self) -> None:
        if self.mode != "core":
            raise PlanError(f"neuron-mask policy has unknown mode {self.mode!r} (only 'core' needs one)")


@dataclass(frozen=True)
class PromptLookupPolicy:
    """PromptLookup: draft up to ``draft`` tokens that followed the latest earlier occurrence of the last
    ``ngram`` tokens (else of shorter n-grams, down to ``min_ngram``) in the prompt and the output so far."""

    ngram: int = 3
    min_ngram: int = 2
    draft: int = 4

    def __post_init__(self) -> None:
        for name in ("ngram", "min_ngram", "draft"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"prompt-lookup policy {name} must be an integer >= 1, got {value!r}")
        if self.min_ngram > self.ngram:
            raise PlanError(f"prompt-lookup policy min_ngram {self.min_ngram} exceeds ngram {self.ngram}")


_POLICIES = {
    "early_exit": EarlyExitPolicy,
    "token_drop": TokenDropPolicy,
    "neuron_mask": NeuronMaskPolicy,
    "prompt_lookup": PromptLookupPolicy,
}


@dataclass(frozen=True)
class Policy:
    """The run-time policies of a Program, one per pass that needs the decode loop's help (None: absent)."""

    early_exit: EarlyExitPolicy | None = None
    token_drop: TokenDropPolicy | None = None
    neuron_mask: NeuronMaskPolicy | None = None
    prompt_lookup: PromptLookupPolicy | None = None

    @property
    def core_neurons(self) -> bool:
        return self.neuron_mask is not None and self.neuron_mask.mode == "core"

    def to_dict(self) -> dict[str, Any]:
        return {k: dataclasses.asdict(v) for k in _POLICIES if (v := getattr(self, k)) is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Policy:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise PlanError(f"a plan's policy is a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_POLICIES))
        if unknown:
            raise PlanError(f"the plan has policies {unknown} that this effx does not know")
        out = {}
        for key, value in data.items():
            klass = _POLICIES[key]
            if not isinstance(value, dict):
                raise PlanError(f"policy {key!r} is a JSON object, got {value!r}")
            try:
                if key == "token_drop":
                    value = {**value, "special": tuple(int(t) for t in value.get("special", ()))}
                out[key] = klass(**value)
            except TypeError as e:
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

    @property
    def speculative(self) -> bool:
        """Whether the loop drafts and verifies (prompt lookup, self-speculative exits): greedy only, and
        token-identical to the plan's dense greedy decoding."""
        return self.policy.prompt_lookup is not None or self.decode_mode == "self-speculative"

    def validate(self) -> None:
        """Check that the stages form a runnable model: embed, each layer once and in order (each optionally
        followed by an exit stage), head; and that the policies fit the stages."""
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
        for prev, s in zip(self.stages[:-1], self.stages[1:], strict=True):
            if s.kind == "exit" and not (prev.kind == "layer" and prev.layer == s.layer):
                raise PlanError(f"exit stage {s.name!r} must directly follow layer {s.layer}")
            if prev.kind == "full_head" and s.kind != "head":
                raise PlanError(f"full_head stage {prev.name!r} must directly precede the head")
            if prev.kind == "token_score" and not (s.kind == "token_drop" and s.layer == prev.layer):
                raise PlanError(f"token_score stage {prev.name!r} must be followed by its token_drop stage")
            if prev.kind == "token_drop" and not (s.kind == "layer" and s.layer == prev.layer):
                raise PlanError(f"token_drop stage {prev.name!r} must directly precede layer {prev.layer}")
        if "full_head" in kinds and not self.stages[-1].attrs.get("fallback"):
            raise PlanError("a full_head stage is only there for a head with a fallback threshold")
        for s in self.stages:
            if s.kind not in STAGE_SIGNATURES:
                raise PlanError(f"stage {s.name!r} has unknown kind {s.kind!r}")
            if (s.inputs, s.outputs) != stage_signature(s.kind, s.attrs):
                raise PlanError(
                    f"stage {s.name!r} signature {s.inputs} -> {s.outputs} is not that of a {s.kind}"
                )
            if s.kind == "exit" and not isinstance(s.attrs.get("threshold"), (int, float)):
                raise PlanError(f"exit stage {s.name!r} has no numeric threshold")
        if self.kernels not in KERNELS:
            raise PlanError(f"plan kernels {self.kernels!r} is not one of {', '.join(KERNELS)}")
        if self.activations not in ACTIVATIONS:
            raise PlanError(f"plan activations {self.activations!r} is not one of {', '.join(ACTIVATIONS)}")
        if not isinstance(self.policy, Policy):
            raise PlanError(f"a plan's policy is a Policy, got {type(self.policy).__name__}")
        if "token_score" in kinds and self.policy.token_drop is None:
            raise PlanError("the plan drops tokens but has no token_drop policy")
        if "exit" in kinds and self.policy.early_exit is None:
            raise PlanError("the plan has exit stages but no early_exit policy")
        if self.policy.prompt_lookup is not None and self.decode_mode == "lossy":
            raise PlanError("prompt lookup verifies its drafts; it cannot run with lossy early exits")
        if self.policy.core_neurons and "token_score" in kinds:
            raise PlanError(
                "token-drop and neuron-mask mode='core' both choose what the prefill computes; a plan holds one"
            )
