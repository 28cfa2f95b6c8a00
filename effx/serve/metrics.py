"""What ``GET /metrics`` reports, in the Prometheus text format (``prometheus_client``, in a registry of the
server's own, so that two servers in one process never share a count)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

# seconds: a token of a small model on a CPU takes milliseconds, a first token behind a long prompt seconds
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


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

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
