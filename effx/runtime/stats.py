"""What the decode loop decided, as one typed record: :class:`DecodeStats`.

Every writer in the runtime (the loop, early exits, speculation, a reduced head, TokenDrop, core neurons,
the cascade, seq2seq, the recurrent runtime) records into a ``DecodeStats``; a field left ``None`` was not
reported by this run (its technique did not run), so :meth:`DecodeStats.as_dict` gives exactly the keys the
run's techniques report. An unknown statistic is an error where it is written (``set``/``count`` check the
names; the class has ``__slots__``), never a silent new key.

``generate(..., stats={})`` keeps working: :func:`collecting` records into a ``DecodeStats`` bound to the
caller's dict, which it refreshes with :meth:`DecodeStats.as_dict` after every write (so an ``on_token``
callback such as :class:`effx.show.Tracer` reads it live) and once more when the run ends or raises.

:meth:`DecodeStats.summary` is the one human line about these decisions (chat's ``/stats``, the harness's
report and ``effx generate`` print it); :meth:`DecodeStats.paths` is the share of tokens per path that
bench reports.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["DecodeStats", "SourceCounts", "StatsArg", "collecting", "drafts_part", "fallbacks_part"]


@dataclass(slots=True)
class SourceCounts:
    """One draft source's share of a speculative run (:class:`effx.runtime.speculative.Speculation`)."""

    rounds: int = 0  # verification rounds this source drafted for
    drafted: int = 0  # draft tokens it proposed, summed over active rows
    accepted: int = 0  # of those, the ones the verifier accepted
    # per draft position j (0-based), over rows and rounds: drafts proposed at j, and accepted at j (every
    # draft before it accepted too); accepted_at[j] / proposed_at[j] is the acceptance at position j + 1
    proposed_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)

    def position(self, counts: list[int], kept: list[int]) -> None:
        """Count a round's rows: ``counts[b]`` drafts proposed, ``kept[b]`` of them accepted."""
        for c, k in zip(counts, kept, strict=True):
            for at, n in ((self.proposed_at, c), (self.accepted_at, k)):
                at.extend([0] * (n - len(at)))
                for j in range(n):
                    at[j] += 1


@dataclass(slots=True)
class DecodeStats:
    """What one decode decided; ``None`` = not reported by this run (see the module's doc)."""

    # lossy early exits (effx.runtime.loop): per decode step, per row, the layers the token went through
    # (the first token comes from the prefill, which runs every layer, and is not in the list)
    exit_layers: list[list[int]] | None = None
    # speculation (prompt lookup, self-speculative exits, a draft model; effx.runtime.speculative), and the
    # recurrent runtime's self-speculative exits (drafted/accepted/rounds)
    drafted: int | None = None  # draft tokens proposed, summed over active rows
    accepted: int | None = None  # of those, accepted by the verifier
    rounds: int | None = None  # verification steps that had drafts
    steps: int | None = None  # all verification steps (seq2seq: decoder steps after the first token)
    verified_positions: int | None = None  # positions the verifier ran over, summed over steps
    emitted: int | None = None  # tokens the rounds emitted, over rows (the prefill's first token not counted)
    draft_lengths: list[int] | None = None  # per round with drafts, the longest row's draft
    sources: dict[str, SourceCounts] | None = None  # per draft source name
    compactions: int | None = None  # times a batch's cache was compacted (rows accepted different counts)
    # a vocabulary-reduced head (effx.runtime.vocab): positions it scored, and those that fell back to the
    # full head
    head_positions: int | None = None
    head_fallbacks: int | None = None
    # TokenDrop (effx.runtime.token_drop, seq2seq's encoder): per drop layer, prompt tokens kept per row
    kept_tokens: dict[int, list[int]] | None = None
    kept_ids: Any = None  # seq2seq: input positions that reached the encoder's last layer [batch, kept]
    kept_valid: Any = None  # seq2seq: which of kept_ids are real tokens [batch, kept]
    cross_keys: list[int] | None = None  # seq2seq: encoder tokens every decoder step attends to, per row
    # NeuronMask core mode (effx.runtime.neurons): per layer, the neuron ids each row decodes with
    core_neurons: dict[str, Any] | None = None
    # cascade (effx.runtime.cascade): tokens each model decided (over unfinished rows) and their shares,
    # forward passes after the prefill and the token positions they ran over
    small_tokens: int | None = None
    large_tokens: int | None = None
    small_share: float | None = None
    large_share: float | None = None
    small_passes: int | None = None
    large_passes: int | None = None
    small_positions: int | None = None
    large_positions: int | None = None
    large_steps: int | None = None  # gated: steps where some row fired the large model
    catch_up_tokens: int | None = None  # gated: tokens the large model caught up on when fired
    overridden: int | None = None  # gated: fired tokens where the large model chose differently
    small: DecodeStats | None = None  # what the small model's own runtime reported
    large: DecodeStats | None = None  # what the large model's own runtime reported
    # the recurrent runtime (effx.runtime.recurrent, effx.recurrent): tokens per exit layer (num_layers - 1
    # for the last), each row's tokens run, and the final states
    exits: dict[int, int] | None = None
    run_tokens: list[list[int]] | None = None
    states: list[Any] | None = None
    # the caller's dict that every write refreshes (see collecting); not a statistic
    _sink: MutableMapping[str, Any] | None = field(default=None, repr=False, compare=False)

    # -- writers ---------------------------------------------------------------------------------------

    def set(self, **values: Any) -> None:
        """Set statistics by name; an unknown name raises ``AttributeError``."""
        for name, value in values.items():
            _check(name)
            setattr(self, name, value)
        self.publish()

    def count(self, **deltas: float) -> None:
        """Add to counters by name (a counter not yet reported starts at 0); an unknown name raises."""
        for name, delta in deltas.items():
            _check(name)
            setattr(self, name, (getattr(self, name) or 0) + delta)
        self.publish()

    def start_head(self) -> None:
        """A reduced head is in the plan: its counters start at 0 for this run."""
        self.set(head_positions=0, head_fallbacks=0)

    def count_head(self, positions: int, fallbacks: int) -> None:
        """A reduced head scored ``positions``, of which ``fallbacks`` fell back to the full head."""
        self.count(head_positions=positions, head_fallbacks=fallbacks)

    def start_exits(self) -> None:
        self.set(exit_layers=[])

    def count_exit(self, depths: list[int]) -> None:
        """One lossy step: per row, the layers the token went through."""
        if self.exit_layers is None:
            self.exit_layers = []
        self.exit_layers.append(depths)
        self.publish()

    def start_speculation(self, sources: list[str]) -> None:
        self.set(
            drafted=0,
            accepted=0,
            rounds=0,
            steps=0,
            verified_positions=0,
            emitted=0,
            draft_lengths=[],
            compactions=0,
            sources={name: SourceCounts() for name in sources},
        )

    def count_round(
        self,
        source: str | None,
        drafted: int,
        accepted: int,
        width: int,
        longest: int,
        rows: tuple[list[int], list[int]] | None = None,
    ) -> None:
        """One verification step over ``width`` positions; with a ``source``, a round that had drafts
        (``rows``: per active row, drafts proposed and accepted, for the per-position counts)."""
        self.count(steps=1, verified_positions=width, drafted=drafted, accepted=accepted)
        if source is not None:
            self.count(rounds=1)
            if self.draft_lengths is None:
                self.draft_lengths = []
            self.draft_lengths.append(longest)
            if self.sources is None:
                self.sources = {}
            s = self.sources.setdefault(source, SourceCounts())
            s.rounds += 1
            s.drafted += drafted
            s.accepted += accepted
            if rows is not None:
                s.position(*rows)
            self.publish()

    def count_exit_layer(self, layer: int) -> None:
        """The recurrent runtime: one token left after ``layer``."""
        if self.exits is None:
            self.exits = {}
        self.exits[layer] = self.exits.get(layer, 0) + 1
        self.publish()

    # -- readers ---------------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        """The statistics this run reported, by name, as ``generate(stats={})`` has always filled them
        (lists and arrays shared, ``sources``/``small``/``large`` as dicts)."""
        out: dict[str, Any] = {}
        for name in _NAMES:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, DecodeStats):
                value = value.as_dict()
            elif name == "sources":  # shallow, as the other lists are shared: this runs after every write
                value = {k: {f.name: getattr(v, f.name) for f in _SOURCE_FIELDS} for k, v in value.items()}
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DecodeStats:
        """The inverse of :meth:`as_dict`; an unknown key raises ``AttributeError``."""
        stats = cls()
        for name, value in values.items():
            _check(name)
            if name == "sources":
                value = {k: SourceCounts(**v) for k, v in value.items()}
            elif name in ("small", "large") and isinstance(value, Mapping):
                value = cls.from_dict(value)
            setattr(stats, name, value)
        return stats

    def mean_exit_depth(self) -> float | None:
        depths = [d for step in self.exit_layers or [] for d in step]
        return sum(depths) / len(depths) if depths else None

    def summary(self) -> str:
        """One line about what this run decided (empty when it decided nothing): mean exit depth, accepted
        drafts, reduced-head fallbacks, prompt tokens kept per drop layer (first row)."""
        parts = []
        depth = self.mean_exit_depth()
        if depth is not None:
            parts.append(f"mean exit depth {depth:.1f} layers")
        if self.drafted:
            parts.append(drafts_part(self.accepted or 0, self.drafted))
        if self.head_positions:
            parts.append(fallbacks_part(self.head_fallbacks or 0, self.head_positions))
        if self.kept_tokens:
            kept = ", ".join(
                f"layer {layer}: {counts[0]}" for layer, counts in sorted(self.kept_tokens.items())
            )
            parts.append(f"prompt tokens kept ({kept})")
        return "; ".join(parts)

    def paths(self, new_tokens: int, num_layers: int, reduced_head: bool = False) -> dict[str, float]:
        """Share of one generation's tokens each path produced: accepted drafts against the tokens the full
        model gave; lossy exits' tokens by the layer they left after (0-based; the first token, from the
        prefill, goes through all of them); a reduced head's positions against those that fell back to the
        full head (``reduced_head`` without a fallback: all of them). Each group sums to 1; a run without any
        of these has one path, ``all N layers``."""
        paths: dict[str, float] = {}
        if self.drafted is not None:
            accepted = min(self.accepted or 0, new_tokens) / new_tokens
            paths.update({"accepted draft": accepted, "full model": 1 - accepted})
        elif self.exit_layers:
            depths = [row[0] for row in self.exit_layers]
            depths += [num_layers] * max(0, new_tokens - len(depths))
            for d in sorted(set(depths)):
                key = f"all {num_layers} layers" if d == num_layers else f"exit at layer {d - 1}"
                paths[key] = depths.count(d) / len(depths)
        else:
            paths[f"all {num_layers} layers"] = 1.0
        if self.head_positions:
            fallback = (self.head_fallbacks or 0) / self.head_positions
            paths.update({"reduced head": 1 - fallback, "full head (fallback)": fallback})
        elif reduced_head:
            paths["reduced head"] = 1.0
        return paths

    # -- the caller's dict -----------------------------------------------------------------------------

    def bind(self, sink: MutableMapping[str, Any]) -> None:
        """Refresh ``sink`` with :meth:`as_dict` after every write from now on."""
        self._sink = sink
        self.publish()

    def publish(self) -> None:
        if self._sink is not None:
            self._sink.update(self.as_dict())


def drafts_part(accepted: int, drafted: int) -> str:
    """The words for accepted drafts, in every summary."""
    return f"drafts accepted {accepted}/{drafted} ({accepted / drafted:.0%})"


def fallbacks_part(fallbacks: int, positions: int) -> str:
    """The words for a reduced head's fallbacks, in every summary."""
    return f"reduced head fell back on {fallbacks}/{positions} positions"


_NAMES = tuple(f.name for f in fields(DecodeStats) if not f.name.startswith("_"))
_SOURCE_FIELDS = fields(SourceCounts)
_KNOWN = frozenset(_NAMES)


def _check(name: str) -> None:
    if name not in _KNOWN:
        raise AttributeError(f"DecodeStats has no statistic {name!r}; known: {', '.join(_NAMES)}")


StatsArg = DecodeStats | MutableMapping[str, Any] | None
"""What a public decode function takes as ``stats``: a DecodeStats, a dict to fill, or None."""


@contextmanager
def collecting(stats: StatsArg) -> Iterator[DecodeStats | None]:
    """The ``DecodeStats`` to record into for a caller's ``stats``: itself, a new one bound to the caller's
    dict (refreshed on every write and when the run ends or raises), or None."""
    if stats is None or isinstance(stats, DecodeStats):
        yield stats
        return
    typed = DecodeStats()
    typed.bind(stats)
    try:
        yield typed
    finally:
        typed.publish()
