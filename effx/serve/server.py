"""Open a source and serve it: the engine that fits its plan, the app over it, and uvicorn.

server = build(frontend.resolve("smollm2-135m"), Options(max_batch=8))
server.run()   # until interrupted; server.app is the ASGI app (for uvicorn, or any ASGI server)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import uvicorn
from fastapi import FastAPI

from ..frontend import Source, UsageError, load
from .app import Limits, create_app
from .engine import ContinuousEngine, Engine, SerialEngine, batchable
from .metrics import Metrics

__all__ = ["Options", "Server", "build"]


@dataclass(frozen=True)
class Options:
    """The server's settings (``effx serve --help`` says each)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_queue: int = 64
    default_max_tokens: int = 256
    max_body: int = 1 << 20
    model_name: str | None = None
    engine: Literal["auto", "continuous", "serial"] = "auto"


@dataclass
class Server:
    app: FastAPI
    engine: Engine
    options: Options

    def run(self) -> None:
        """Serve until interrupted; the engine's thread stops with the server."""
        self.engine.start()
        try:
            uvicorn.run(self.app, host=self.options.host, port=self.options.port, log_level="warning")
        finally:
            self.engine.close()


def build(source: Source, options: Options) -> Server:
    """Load ``source`` through the front end (:func:`effx.frontend.load`) and build the server: continuous
    batching where the plan allows it (``engine="auto"``), else one request at a time."""
    run = load(source)
    metrics = Metrics()
    backend = run.backend()  # type: ignore[no-untyped-call]  # effx.frontend is not typed yet
    engine: Engine
    continuous = options.engine == "continuous" or (options.engine == "auto" and batchable(backend))
    if continuous:
        if not batchable(backend):
            raise UsageError(
                f"--engine continuous cannot run '{run.passes}': its plan drafts, exits early or prefills "
                "in its own way; use --engine auto (one request at a time)"
            )
        engine = ContinuousEngine(
            backend, max_batch=options.max_batch, max_queue=options.max_queue, metrics=metrics
        )
    else:
        engine = SerialEngine(run, max_queue=options.max_queue, metrics=metrics)
    limits = Limits(
        max_positions=run.plan.model.max_positions,
        default_max_tokens=options.default_max_tokens,
        max_body=options.max_body,
    )
    name = options.model_name or source.path
    return Server(create_app(engine, run.tokenizer, name, limits, metrics), engine, options)
