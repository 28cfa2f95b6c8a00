"""The technique registry: what each technique brings to a Program, declared once. Torch-free.

A technique (early exits, prompt lookup, token drop, ...) is one :class:`Technique`, registered with
:func:`register` in its own module of this package (or in a user's module: nothing here names one):

* its **settings**: the run-time policy its pass records in the plan (a frozen dataclass validated in its
  ``__post_init__``, serialized in ``plan.json`` under ``Technique.key``; the pass builds it from its own
  fields, so the settings are checked in one place);
* its **stage kinds** (:class:`StageKind`): each with its signature (the names of its inputs and outputs,
  whose shapes :data:`TENSORS` gives once for every backend and exporter), where it may stand in a plan,
  and its FLOP rule (runs every step or in the prefill only, on the last position only, always or only
  sometimes);
* its **flags**: whether its drafts are verified (``speculative``: token-identical greedy output, sampling's distribution kept), whether
  its decisions choose the tokens (``decides``: lossy exits; a scorer then scores what it decodes) and
  whether the KV cache must be able to roll back;
* its **run-time hooks**, as ``"module:attribute"`` references resolved when first used (the decode loop
  lives in a layer above this one): ``draft`` (a draft source for the verifier), ``prefill`` (a prefill of
  its own), ``decoder`` (a per-step decoder: lossy exits).

``effx.plan`` (signatures, validation, policies), ``effx.artifact`` (the stage kinds an artifact may hold),
the ONNX exporter (example inputs), ``effx.flops``, the decode loop, the scorer and the ONNX backend read
this registry instead of naming techniques. ``docs/architecture.md`` walks through one technique.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import PlanError

if TYPE_CHECKING:
    from ..plan import Plan, StageSpec

__all__ = [
    "BASE_KINDS",
    "TENSORS",
    "Signature",
    "StageKind",
    "Technique",
    "hook",
    "policy_types",
    "register",
    "stage_kind",
    "stage_kinds",
    "technique",
    "techniques",
    "unregister",
]

Signature = tuple[tuple[str, ...], tuple[str, ...]]

# Every tensor a stage signature names, with its shape in symbols and its element type ("float": the model's
# float type). Symbols: ``batch``, ``seq`` (new tokens), ``past`` (cached tokens), ``total`` (past + seq),
# ``kept`` (tokens a TokenDrop keeps), ``vocab_k`` (token ids a pruned exit scores) vary from call to call;
# ``hidden``, ``rope`` (the rotary width), ``kv_heads``, ``head_dim`` and ``vocab`` are the model's; an int is
# itself. The exporter builds example inputs and dynamic axes from these, effx.flops its meta inputs, and the
# ONNX backend checks an artifact's graphs against the model's sizes.
TENSORS: dict[str, tuple[tuple[str | int, ...], str]] = {
    "input_ids": (("batch", "seq"), "int64"),
    "position_ids": (("batch", "seq"), "int64"),
    "hidden": (("batch", "seq", "hidden"), "float"),
    "prev_hidden": (("batch", "seq", "hidden"), "float"),
    "cos": (("batch", "seq", "rope"), "float"),
    "sin": (("batch", "seq", "rope"), "float"),
    "mask": (("batch", 1, "seq", "total"), "float"),
    "past_k": (("batch", "kv_heads", "past", "head_dim"), "float"),
    "past_v": (("batch", "kv_heads", "past", "head_dim"), "float"),
    "k": (("batch", "kv_heads", "seq", "head_dim"), "float"),
    "v": (("batch", "kv_heads", "seq", "head_dim"), "float"),
    "logits": (("batch", "seq", "vocab"), "float"),
    "confidence": (("batch", "seq"), "float"),
    "scores": (("batch", "seq"), "float"),
    "keep_ids": (("batch", "kept"), "int64"),
    "vocab_ids": (("batch", "vocab_k"), "int64"),
}
# the symbols whose size varies between calls (an exported graph's dynamic axes)
DYNAMIC = ("batch", "seq", "past", "total", "kept", "vocab_k")


@dataclass(frozen=True)
class StageKind:
    """A kind of stage: its signature and how it runs.

    ``variant(attrs)`` may give another signature for some attributes (an exit over a pruned vocabulary
    takes the token ids it scores); ``shapes`` overrides :data:`TENSORS` for this kind's tensors (such an
    exit's ``logits`` are ``vocab_k`` wide). FLOP rule: ``runs`` is ``"step"`` (every step, prefill
    included) or ``"prefill"`` (the prompt's only); ``last_position``: the prefill runs it on the last
    position only (heads); ``always``: every step runs it (a fallback head runs only for some tokens and is
    not counted in the totals); ``counted_as``: the kind whose inputs it takes for counting (a token score
    cut from a layer); ``prefill_tokens(attrs, n)``: the tokens later stages see after it (TokenDrop's kept
    share). ``check(prev, stage, next)`` returns what is wrong with where ``stage`` stands in a plan."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    variant: Callable[[Mapping[str, Any]], Signature | None] | None = None
    shapes: Mapping[str, tuple[str | int, ...]] = field(default_factory=dict)
    runs: str = "step"
    last_position: bool = False
    always: bool = True
    counted_as: str | None = None
    prefill_tokens: Callable[[Mapping[str, Any], int], int] | None = None
    check: Callable[[StageSpec, StageSpec, StageSpec | None], str | None] | None = None

    def __post_init__(self) -> None:
        unknown = [t for t in self.inputs + self.outputs if t not in TENSORS]
        if unknown:
            raise ValueError(
                f"stage kind {self.name!r} names tensors {unknown} that effx.techniques.TENSORS lacks"
            )
        if self.runs not in ("step", "prefill"):
            raise ValueError(f"stage kind {self.name!r}: runs is 'step' or 'prefill', got {self.runs!r}")

    def signature(self, attrs: Mapping[str, Any]) -> Signature:
        """The inputs and outputs of a stage of this kind with ``attrs``."""
        other = self.variant(attrs) if self.variant is not None else None
        return other if other is not None else (self.inputs, self.outputs)

    def shape(self, tensor: str) -> tuple[str | int, ...]:
        """The symbolic shape of ``tensor`` in a stage of this kind."""
        return self.shapes.get(tensor, TENSORS[tensor][0])


@dataclass(frozen=True)
class Technique:
    """What one technique declares: see the module's docstring. ``name`` is its pass's name
    (``"prompt-lookup"``), ``key`` its policy's key in a plan (``"prompt_lookup"``), ``policy`` the type of
    its settings (None: it needs nothing of the decode loop). ``speculative(policy, plan)``: whether this
    plan's decoding drafts and verifies because of it; ``decides(policy, plan)``: whether its per-step
    decisions choose the tokens (lossy: the output is not the dense one's); ``rollback(policy, plan)``: whether its cache must
    roll back; ``capabilities(policy)``: what a backend needs beyond running stages; ``validate(plan)``: what
    is wrong with a plan's use of it (policy against stages). Hooks are ``"module:attribute"`` strings:
    ``draft`` -> ``factory(policy, plan) -> DraftSource | None``; ``prefill`` -> ``fn(backend, cache, ids,
    positions, key_valid, stats) -> (logits, backend) | None`` (None: not this plan's prefill); ``decoder``
    -> ``factory(backend, cache, policy, stats) -> decoder | None`` with ``decode(token, position, masks) ->
    logits``. A hook may also be the callable itself (a technique declared outside effx)."""

    name: str
    key: str
    policy: type | None = None
    stage_kinds: tuple[StageKind, ...] = ()
    speculative: Callable[[Any, Plan], bool] | None = None
    decides: Callable[[Any, Plan], bool] | None = None
    rollback: Callable[[Any, Plan], bool] | None = None
    capabilities: Callable[[Any], tuple[str, ...]] | None = None
    validate: Callable[[Plan], str | None] | None = None
    draft: str | Callable[..., Any] | None = None
    prefill: str | Callable[..., Any] | None = None
    decoder: str | Callable[..., Any] | None = None
    doc: str = ""


# -- the registry ------------------------------------------------------------------------------------------

_IDENTITY = ("input_ids", "position_ids")
BASE_KINDS: tuple[StageKind, ...] = (
    StageKind("embed", _IDENTITY, ("hidden", "cos", "sin")),
    StageKind("layer", ("hidden", "cos", "sin", "mask", "past_k", "past_v"), ("hidden", "k", "v")),
    StageKind("head", ("hidden",), ("logits",), last_position=True),
)
_TECHNIQUES: dict[str, Technique] = {}
_KINDS: dict[str, StageKind] = {k.name: k for k in BASE_KINDS}
_HOOKS: dict[str, Any] = {}


def register(t: Technique) -> Technique:
    """Add ``t`` to the registry (its name, key and stage kinds must be new); returns it."""
    if not isinstance(t, Technique):
        raise TypeError(f"register() takes a Technique, got {type(t).__name__}")
    clash = [
        what
        for what, taken in (
            (f"name {t.name!r}", t.name in _TECHNIQUES),
            (f"key {t.key!r}", any(o.key == t.key for o in _TECHNIQUES.values())),
            *((f"stage kind {k.name!r}", k.name in _KINDS) for k in t.stage_kinds),
        )
        if taken
    ]
    if clash:
        raise ValueError(f"technique {t.name!r}: {', '.join(clash)} already registered")
    _TECHNIQUES[t.name] = t
    _KINDS.update((k.name, k) for k in t.stage_kinds)
    _cached_types.clear()
    return t


def unregister(name: str) -> None:
    """Remove the technique ``name`` and its stage kinds (tests that register a toy one clean up)."""
    t = _TECHNIQUES.pop(name)
    for k in t.stage_kinds:
        _KINDS.pop(k.name, None)
    _cached_types.clear()


def techniques() -> tuple[Technique, ...]:
    """Every registered technique, in registration order (the order draft sources are tried in)."""
    return tuple(_TECHNIQUES.values())


def technique(name: str) -> Technique:
    """The technique named ``name`` (its pass's name)."""
    try:
        return _TECHNIQUES[name]
    except KeyError:
        raise KeyError(f"no technique {name!r}; registered: {', '.join(_TECHNIQUES)}") from None


def stage_kinds() -> dict[str, StageKind]:
    """Every stage kind, the base ones (embed, layer, head) and those of the registered techniques."""
    return dict(_KINDS)


def stage_kind(name: str) -> StageKind:
    """The stage kind ``name``; a :class:`PlanError` when no technique declares it."""
    try:
        return _KINDS[name]
    except KeyError:
        raise PlanError(f"unknown stage kind {name!r} (known: {', '.join(_KINDS)})") from None


_cached_types: dict[str, type] = {}


def policy_types() -> dict[str, type]:
    """Policy key -> settings type, for every technique that records a policy."""
    if not _cached_types:
        _cached_types.update((t.key, t.policy) for t in _TECHNIQUES.values() if t.policy is not None)
    return dict(_cached_types)


def hook(ref: str | Callable[..., Any]) -> Any:
    """The object a ``"module:attribute"`` hook names, imported on first use (a callable is itself)."""
    if callable(ref):
        return ref
    if ref not in _HOOKS:
        module, _, attr = ref.partition(":")
        _HOOKS[ref] = getattr(importlib.import_module(module), attr)
    return _HOOKS[ref]


# the techniques effx ships, each declared in its own module; registration order is the order draft sources
# are tried in (lookup first: it costs nothing where the text repeats; a trained branch, else the exit, drafts
# elsewhere)
# isort: off
from . import prompt_lookup  # noqa: E402,F401
from . import draft_branch  # noqa: E402,F401
from . import early_exit  # noqa: E402,F401
from . import neuron_mask, token_drop, vocab_reduce  # noqa: E402,F401
# isort: on
