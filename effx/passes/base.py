"""Pass infrastructure: Pass configs, results and reports, and a manager (the registry and the pipeline
strings are :mod:`effx.passes.pipeline`'s, re-exported here).

A pass is a frozen dataclass: its fields are its configuration, validated in ``__post_init__``
(:class:`PassConfigError`, a ValueError). ``apply(program)`` returns a :class:`PassResult` with a *new*
Program (never an edited one), ``modified`` computed from what changed, and a :class:`PassReport` of the
sites changed and the sites skipped with their reasons. ``requires(program)`` checks what the pass needs of the Program it gets (:class:`PassPreconditionError`: an
incompatible combination of passes is refused before anything runs, naming the passes);
``ensures(program)`` checks the promise the pass's docstring states and raises :class:`PassError` when it
does not hold.

Pipelines parse from strings: ``"early-exit{layers=8,16,24 measure=top2-gap thresholds=0.4}"``; several passes are
separated by commas at the top level (``"a{...}, b{...}"``).
Inside braces, arguments are ``key=value`` separated by spaces or ``;``; a value with commas is a list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, cast

from ..errors import ArtifactError, PassConfigError, PassError, PassPreconditionError
from ..flops import decode_flops
from ..plan import FAMILIES
from .pipeline import (
    construct,
    format_value,
    get_pass,
    parse_pipeline,
    pipeline_string,
    register_pass,
    registered_passes,
)

if TYPE_CHECKING:
    from ..plan import ModelInfo
    from ..program import Program

__all__ = [
    "PHASES",
    "Pass",
    "PassManager",
    "as_passes",
    "format_value",
    "family_apply",
    "register_family_apply",
    "PassPreconditionError",
    "PassReport",
    "PassResult",
    "get_pass",
    "parse_pipeline",
    "pipeline_string",
    "register_pass",
    "registered_passes",
]

# The phases of a pipeline, in the order they run (``Pass.phase``): the manager runs every pass of a phase
# before any pass of a later one, keeping the order given within a phase.
PHASES: tuple[str, ...] = (
    "rewrite",  # graph rewrites (early-exit, vocab-reduce, neuron-mask, token-drop, prompt-lookup, ...)
    "weights",  # storing the final weights (quantize), once every rewrite has sliced, shared or added them
    "lower",  # kernel choice for the final graphs and weights (lower)
)


@dataclass
class PassReport:
    """What a pass did: sites changed, sites skipped (with why), FLOPs per token before and after."""

    name: str
    config: dict[str, Any]
    changed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    flops_before: int | None = None
    flops_after: int | None = None
    notes: list[str] = field(default_factory=list)
    modified: bool | None = None  # what the pass returned as PassResult.modified (set by the manager)

    def change(self, site: str, what: str) -> None:
        self.changed.append((site, what))

    def skip(self, site: str, why: str) -> None:
        self.skipped.append((site, why))

    def format(self) -> str:
        lines = [f"pass {self.name} {self.config}"]
        lines += [f"  changed {site}: {what}" for site, what in self.changed]
        lines += [f"  skipped {site}: {why}" for site, why in self.skipped]
        if not self.changed:
            lines.append("  (changed nothing)")
        if self.flops_before is not None and self.flops_after is not None:
            ratio = self.flops_after / self.flops_before if self.flops_before else float("nan")
            lines.append(f"  FLOPs/token {self.flops_before:,} -> {self.flops_after:,} ({ratio:.3f}x)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class PassResult:
    program: Program
    modified: bool
    report: PassReport


@dataclass(frozen=True)
class Pass:
    """Base class of passes. Subclasses are frozen dataclasses registered with :func:`register_pass`.

    Class attributes: ``name`` (registry and pipeline name), ``phase`` (one of :data:`PHASES`, "rewrite"
    by default: the manager runs every pass of an earlier phase first), ``after`` (names of passes of the
    same phase that, when present in a pipeline, must run before this one), ``before`` (names that must run
    after it), ``order_reason`` (why, for the note the pass manager writes when it has to move a pass) and
    ``families`` (the model families it applies to, of :data:`effx.plan.FAMILIES`: ``apply`` rewrites a
    decoder's Program; each other family's program is rewritten by the function that family's module
    registers with :func:`register_family_apply`).
    """

    name: ClassVar[str] = ""
    phase: ClassVar[str] = "rewrite"
    families: ClassVar[tuple[str, ...]] = ("decoder",)
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    order_reason: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.phase not in PHASES:
            raise TypeError(
                f"{cls.__name__} declares phase {cls.phase!r}; the phases are, in order: {', '.join(PHASES)}"
            )

    def apply(self, program: Program) -> PassResult:
        raise NotImplementedError(f"{type(self).__name__} does not implement apply()")

    def requires(self, program: Program) -> None:
        """Check the pass's precondition on its input; raise :class:`PassPreconditionError` (saying which
        earlier pass or state conflicts) if this pass cannot apply to ``program``."""

    def ensures(self, program: Program) -> None:
        """Check the pass's postcondition on its output; raise PassError if it does not hold."""

    def check_model(self, info: ModelInfo) -> None:
        """Check the settings against the model's own shapes (a :class:`~effx.plan.ModelInfo`, which
        :func:`effx.capture.info_from_config` reads from the config without the weights), before capture
        and before anything is allocated: layer ranges, the files the pass reads, and every size a setting
        derives (``draft``, ``group``, ``queries``) against ``max_positions``, the hidden sizes and the
        vocabulary. Raises :class:`PassConfigError` naming the setting and the limit."""

    def check_after(self, earlier: Sequence[Pass]) -> None:
        """Refuse, with :class:`PassPreconditionError`, a combination with passes that run before this one
        (``earlier``, in pipeline order) that :meth:`requires` would refuse on the Program; checked before
        capture."""

    def config(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Pass:
        if not isinstance(data, dict) or "name" not in data:
            raise PassConfigError(f"a pass is a JSON object with 'name' and 'config', got {data!r}")
        klass = get_pass(data["name"])
        return construct(klass, dict(data.get("config", {})))

    def new_report(self) -> PassReport:
        return PassReport(self.name, self.config())


def check_file(setting: str, path: str) -> None:
    """A file a pass reads (``setting=<path>``) exists, or a :class:`PassConfigError` naming it."""
    from pathlib import Path

    if path and not Path(path).expanduser().is_file():
        raise PassConfigError(f"{setting}={path}: no such file")


def check_read(setting: str, path: str, read: Callable[[str], object]) -> None:
    """A file a pass reads (``setting=<path>``) exists and ``read(path)`` accepts it (its shapes, dtypes and
    values against the model), or a :class:`PassConfigError` naming the setting and saying what is wrong:
    a bad file fails before capture, not after it."""

    check_file(setting, path)
    if path:
        try:
            read(path)
        except ArtifactError as e:
            raise PassConfigError(f"{setting}: {e}") from e


def check_size(setting: str, value: int, limit: int, what: str) -> None:
    """A size a setting asks for is at most the model's ``limit`` (``what`` names the limit)."""
    if value > limit:
        raise PassConfigError(f"{setting}={value} exceeds the model's {what} ({limit})")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


# -- other families' programs ---------------------------------------------------------------------------

# (pass name, family) -> the function that applies the pass to that family's program
_FAMILY_APPLY: dict[tuple[str, str], FamilyApply] = {}

# what a refusal says of each family, after its name; ``{takes}``: the passes the family takes
_FAMILY_REFUSAL = {
    "decoder": "a decoder-only LM: the passes for decoders are {takes}",
    "encoder": "an encoder: the other passes rewrite decoder LMs; encoders take {takes} only",
    "encoder-decoder": (
        "an encoder-decoder model: encoder-decoder programs take {takes}, on the encoder, only"
    ),
    "recurrent": (
        "a recurrent state-space model: the other passes rewrite attention or FFN layers; recurrent programs "
        "take {takes} only"
    ),
}


class FamilyApply(Protocol):
    """Applies a pass to a program of a family other than decoders: returns the new program (the input
    one when nothing changed) and the pass's report. It checks what the pass needs of the program and
    raises :class:`PassError` when the program cannot take it."""

    def __call__(self, p: Any, program: Any, /) -> tuple[Any, PassReport]: ...


_ApplyT = TypeVar("_ApplyT", bound=FamilyApply)


def register_family_apply(pass_cls: type[Pass], family: str) -> Callable[[_ApplyT], _ApplyT]:
    """Decorator: the function that applies ``pass_cls`` to a ``family`` program (``family`` must be one
    of the pass's ``families``)."""
    if family not in pass_cls.families or family == "decoder":
        raise TypeError(
            f"{pass_cls.__name__} declares families {pass_cls.families}: no {family!r} function to register"
        )

    def register(fn: _ApplyT) -> _ApplyT:
        _FAMILY_APPLY[(pass_cls.name, family)] = fn
        return fn

    return register


def family_apply(p: Pass, family: str) -> FamilyApply:
    """The function registered to apply ``p`` to a ``family`` program."""
    try:
        return _FAMILY_APPLY[(p.name, family)]
    except KeyError:
        raise PassError(f"pass {p.name!r} declares family {family!r} but no function applies it") from None


def refusal(p: Pass, family: str, architecture: str) -> str | None:
    """Why ``p`` does not apply to a ``family`` model (``architecture``: its class name), or None if it
    does."""
    if family not in FAMILIES:
        return f"unknown model family {family!r} of {architecture}; families: {', '.join(FAMILIES)}"
    if family in p.families:
        return None
    takes = ", ".join(sorted(n for n, k in registered_passes().items() if family in k.families)) or "no pass"
    return f"pass {p.name!r} does not apply to {architecture} ({_FAMILY_REFUSAL[family].format(takes=takes)})"


class _Info(Protocol):
    @property
    def architecture(self) -> str: ...
    @property
    def family(self) -> str: ...


class _AnyProgram(Protocol):
    """What the manager reads of a program of any family."""

    @property
    def info(self) -> _Info: ...
    def with_pass(self, record: dict[str, Any], report: PassReport) -> Any: ...


_ProgramT = TypeVar("_ProgramT", bound=_AnyProgram)


# -- the manager ----------------------------------------------------------------------------------------


def as_passes(passes: str | Pass | Iterable[Pass | str] | None) -> list[Pass]:
    """A pipeline given as a string, a Pass, or a list of both, as a list of Passes."""
    if passes is None:
        return []
    if isinstance(passes, str):
        return parse_pipeline(passes)
    if isinstance(passes, Pass):
        return [passes]
    out: list[Pass] = []
    for p in passes:
        if isinstance(p, str):
            out.extend(parse_pipeline(p))
        elif isinstance(p, Pass):
            out.append(p)
        else:
            raise PassConfigError(f"expected a Pass or a pipeline string, got {type(p).__name__}: {p!r}")
    return out


class PassManager:
    """Runs passes in an order that meets their phases and ordering constraints.

    Passes run by phase (:data:`PHASES`: every rewrite, then the weights, then lowering); within a phase
    they keep the order given, except where a pass's ``after``/``before`` names another of the pipeline.
    A pipeline listed in another order is reordered (stably: passes keep the order given wherever they
    may), and the moved pass's report says why; constraints that contradict each other (or the phases)
    are an error. Any error names the failing pass and the passes that ran before it.
    """

    def __init__(self, passes: str | Pass | Sequence[Pass | str] | None) -> None:
        self.passes = as_passes(passes)
        self.moves: dict[int, str] = {}  # index in self.passes -> why it was moved
        self.check_order()

    def _context(self, index: int) -> str:
        before = [p.name for p in self.passes[:index]]
        return f"pass {self.passes[index].name!r} (#{index + 1}; after: {', '.join(before) or 'none'})"

    @staticmethod
    def _phase(p: Pass) -> int:
        try:
            return PHASES.index(p.phase)
        except ValueError:
            raise PassError(
                f"pass {p.name!r} declares phase {p.phase!r}; the phases are, in order: {', '.join(PHASES)}"
            ) from None

    @staticmethod
    def _named(a: Pass, b: Pass) -> bool:
        """``a`` must run before ``b`` because one of them names the other."""
        return a.name in b.after or b.name in a.before

    @classmethod
    def _must_precede(cls, a: Pass, b: Pass) -> bool:
        return cls._phase(a) < cls._phase(b) or cls._named(a, b)

    @staticmethod
    def _phase_reason(p: Pass) -> str:
        earlier = PHASES[: PHASES.index(p.phase)]
        why = f"{p.name} runs in the {p.phase} phase, after every {' and '.join(earlier)}"
        if len(earlier) > 1:
            why += " pass"
        return f"{why}: {p.order_reason}" if p.order_reason else why

    def check_order(self) -> None:
        """Reorder ``self.passes`` by phase and to meet every ``after``/``before`` constraint, noting each
        move."""
        given = list(self.passes)
        for p in given:
            self._phase(p)
        placed: list[int] = []
        left = list(range(len(given)))
        while left:
            ready = [
                i for i in left if not any(self._must_precede(given[j], given[i]) for j in left if j != i)
            ]
            if not ready:
                names = ", ".join(repr(given[i].name) for i in left)
                raise PassError(f"passes {names} have ordering constraints that contradict each other")
            placed.append(ready[0])
            left.remove(ready[0])
        self.passes = [given[i] for i in placed]
        moves = {}
        for new, i in enumerate(placed):
            p = given[i]
            jumped = [given[j] for j in placed[:new] if j > i and self._must_precede(given[j], given[i])]
            if jumped:
                by_phase = any(self._phase(q) < self._phase(p) for q in jumped)
                why = self._phase_reason(p) if by_phase else p.order_reason or f"{p.name} declares it"
                moves[new] = (
                    f"listed before {', '.join(repr(q.name) for q in jumped)} but run after "
                    f"{'it' if len(jumped) == 1 else 'them'}: {why}"
                )
        self.moves = moves

    def check_model(self, info: ModelInfo) -> None:
        """Every refusal that needs no weights, before capture: each pass's settings against ``info`` (the
        model's shapes, from its config) and each pass against those that run before it. The errors name the
        pass and those before it."""
        for i, p in enumerate(self.passes):
            try:
                p.check_after(self.passes[:i])
            except PassError as e:
                raise PassPreconditionError(f"{self._context(i)} cannot apply: {e}") from e
            try:
                p.check_model(info)
            except PassError as e:
                raise type(e)(f"{self._context(i)}: {e}") from e

    def check_family(self, family: str, architecture: str) -> None:
        """Refuse, before capture, a pass that does not apply to the ``family`` of the model
        (``architecture``: its class name): :class:`PassError` naming the pass and the architecture."""
        for p in self.passes:
            why = refusal(p, family, architecture)
            if why is not None:
                raise PassError(why)

    def run(self, program: _ProgramT) -> _ProgramT:
        """Apply the passes to ``program``, a decoder's :class:`~effx.program.Program` or another family's
        program (``program.info.family``); each pass's report is kept on the program it returns."""
        family = program.info.family
        self.check_family(family, program.info.architecture)
        if family == "decoder":
            return cast("_ProgramT", self._run_decoder(cast("Program", program)))
        for i, p in enumerate(self.passes):
            program = self._run_family(i, p, program, family)
        return program

    def _run_family(self, i: int, p: Pass, program: _ProgramT, family: str) -> _ProgramT:
        apply = family_apply(p, family)
        try:
            new, report = apply(p, program)
        except PassError as e:
            raise type(e)(f"{self._context(i)}: {e}") from e
        except Exception as e:
            raise PassError(f"{self._context(i)} failed: {type(e).__name__}: {e}") from e
        modified = new is not program
        if modified != bool(report.changed):
            raise PassError(
                f"{self._context(i)} reported {len(report.changed)} changes but "
                f"{'returned a new' if modified else 'returned its input'} program"
            )
        report.modified = modified
        if i in self.moves:
            report.notes.append(self.moves[i])
        report.notes.append(f"FLOPs/token not counted: effx.flops counts decoder programs, not {family} ones")
        return cast("_ProgramT", new.with_pass(p.to_json(), report))

    def _run_decoder(self, program: Program) -> Program:
        for i, p in enumerate(self.passes):
            try:
                p.check_model(program.info)
                p.requires(program)
            except PassConfigError as e:
                raise PassConfigError(f"{self._context(i)}: {e}") from e
            except PassError as e:
                raise PassPreconditionError(f"{self._context(i)} cannot apply: {e}") from e
            before = decode_flops(program)
            try:
                result = p.apply(program)
            except PassError as e:
                raise type(e)(f"{self._context(i)}: {e}") from e
            except Exception as e:
                raise PassError(f"{self._context(i)} failed: {type(e).__name__}: {e}") from e
            if not isinstance(result, PassResult):
                raise PassError(f"{self._context(i)} returned {type(result).__name__}, not PassResult")
            try:
                p.ensures(result.program)
            except PassError as e:
                raise PassError(f"{self._context(i)} broke its promise: {e}") from e
            if result.modified != (result.program is not program):
                raise PassError(
                    f"{self._context(i)} reported modified={result.modified} but "
                    f"{'returned a new' if result.program is not program else 'returned its input'} Program"
                )
            report = result.report
            report.modified = result.modified
            if i in self.moves:
                report.notes.append(self.moves[i])
            report.flops_before = before
            report.flops_after = decode_flops(result.program)
            program = result.program.with_pass(p.to_json(), report)
        return program
