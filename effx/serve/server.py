"""Open a source and serve it: the engine that fits its plan, the app over it, and uvicorn.

server = start(frontend.resolve("smollm2-135m"), Options(max_batch=8))  # loaded, and decoding
server.run()   # until interrupted; server.app is the ASGI app (for uvicorn, or any ASGI server)

:func:`start` loads the model on the engine's own thread, which then decodes: the thread that decodes must
be the one that loaded (:meth:`effx.serve.engine.Engine.run` says why).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

import uvicorn
from fastapi import FastAPI

from ..frontend import Source, UsageError, load
from .app import Limits, create_app
from .engine import ContinuousEngine, Engine, SerialEngine, batchable
from .metrics import Metrics

__all__ = ["Options", "Server", "build", "start"]


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
        """Serve HTTP on this thread until interrupted; the engine stops with the server."""
        try:
            uvicorn.run(self.app, host=self.options.host, port=self.options.port, log_level="warning")
        finally:
            self.engine.close()


def start(source: Source, options: Options) -> Server:
    """:func:`build` the server on a new thread, which then runs its engine; returns once the model is
    loaded (raising what loading raised)."""
    built: list[Server] = []
    failed: list[BaseException] = []
    ready = threading.Event()

    def boot() -> None:
        try:
            built.append(build(source, options))
        except BaseException as e:  # noqa: BLE001 (handed to the caller, who raises it)
            failed.append(e)
            return
        finally:
            ready.set()
        built[0].engine.run()

    threading.Thread(target=boot, name="effx-engine", daemon=True).start()
    ready.wait()
    if failed:
        raise failed[0]
    return built[0]


def build(source: Source, options: Options) -> Server:
    """Load ``source`` through the front end (:func:`effx.frontend.load`) and build the server: continuous
    batching where the plan allows it (``engine="auto"``), else one request at a time. Its engine is not
    started: run it on this thread (``server.engine.run()``), or use :func:`start`."""
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
