"""What ``GET /metrics`` reports, in the Prometheus text format (``prometheus_client``, in a registry of the
server's own, so that two servers in one process never share a count): the requests, tokens and latencies
of the server, and what effx's runtime decided for them (:meth:`Metrics.record`, from the decode's
:class:`effx.runtime.stats.DecodeStats`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..runtime.stats import DecodeStats

__all__ = ["Metrics"]

# seconds: a token of a small model on a CPU takes milliseconds, a first token behind a long prompt seconds
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)
_LAYERS = (1, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32, 40, 48, 64, 80)


class Metrics:
    """The server's counters, gauges and histograms; :meth:`exposition` is the text ``/metrics`` returns."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "effx_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "effx_requests_rejected", "requests refused because the queue was full (HTTP 429)", registry=r
        )
        self.cancelled = Counter(
            "effx_requests_cancelled", "requests stopped before their end (the client went away)", registry=r
        )
        self.prompt_tokens = Counter("effx_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter("effx_completion_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "effx_time_to_first_token_seconds", "from a request's arrival to its first token", registry=r,
            buckets=_LATENCY,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "effx_inter_token_latency_seconds", "between two tokens of one request", registry=r,
            buckets=_LATENCY,
        )  # fmt: skip
        self.queue_length = Gauge("effx_queue_length", "requests waiting to join the batch", registry=r)
        self.batch_size = Gauge("effx_batch_size", "requests being decoded now", registry=r)
        self.step_batch_size = Histogram(
            "effx_step_batch_size", "rows decoded together, per decode step", registry=r, buckets=_BATCH
        )

        self.drafted = Counter(
            "effx_draft_tokens_proposed",
            "draft tokens proposed (prompt lookup, draft branch, exits)",
            registry=r,
        )
        self.accepted = Counter("effx_draft_tokens_accepted", "draft tokens the model accepted", registry=r)
        self.rounds = Counter("effx_verify_rounds", "verification steps that checked drafts", registry=r)
        self.exit_layers = Histogram(
            "effx_exit_layers", "layers a token ran through before it exited (lossy early exits)", registry=r,
            buckets=_LAYERS,
        )  # fmt: skip
        self.head_positions = Counter(
            "effx_reduced_head_positions", "positions a vocabulary-reduced head scored", registry=r
        )
        self.head_fallbacks = Counter(
            "effx_reduced_head_fallbacks", "of those, positions that fell back to the full head", registry=r
        )
        self.cascade_tokens = Counter(
            "effx_cascade_tokens", "tokens a cascade's small or large model decided", ["model"], registry=r
        )

    def record(self, stats: DecodeStats) -> None:
        """Add what one decode (a request, or a batch's step) reported; fields it did not report add
        nothing."""
        for counter, value in (
            (self.drafted, stats.drafted),
            (self.accepted, stats.accepted),
            (self.rounds, stats.rounds),
            (self.head_positions, stats.head_positions),
            (self.head_fallbacks, stats.head_fallbacks),
            (self.cascade_tokens.labels("small"), stats.small_tokens),
            (self.cascade_tokens.labels("large"), stats.large_tokens),
        ):
            if value:
                counter.inc(value)
        for step in stats.exit_layers or ():
            for layers in step:
                self.exit_layers.observe(layers)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
