"""Replicas of ``effx serve`` on Ray Serve: N copies of the same server (a model with its passes, or an
artifact), each in a Ray actor of its own with its own engine, behind Ray's HTTP proxy, router and
autoscaler. effx writes no scheduler: Ray routes each request to a replica, and each replica batches the
requests it gets as ``effx serve`` does.

    effx serve --artifact out/smollm2 --replicas 2              # Ray Serve on this machine, 2 replicas
    serve run effx.serve.ray:app artifact=out/smollm2 replicas=2    # Ray's own command, the same app

    from ray import serve
    from effx import frontend
    from effx.serve.ray import application
    serve.run(application(frontend.resolve(artifact="out/smollm2"), replicas=2))

Each replica gets ``num_cpus`` of Ray's CPUs and as many decoding threads (Ray sets ``OMP_NUM_THREADS``
from them). ``replicas=0`` asks for Ray's autoscaling between 1 and ``max_replicas`` replicas, aiming at
``max_batch`` requests in flight per replica. A replica whose engine stops fails Ray's health check and is
replaced. Each replica keeps its own ``/metrics``; Ray's proxy routes a scrape to one of them, and Ray's
own metrics cover the deployment as a whole.

It needs the ``ray`` extra (``pip install "effx[ray]"``).
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve
from ray.serve import Application

from ..frontend import Source, UsageError, resolve
from .server import Options, Server, start

__all__ = ["DEPLOYMENT", "app", "application", "serve_here"]

DEPLOYMENT = "effx"


@serve.ingress()
class Replica:
    """One replica: the source loaded and decoding on its engine's thread (:func:`effx.serve.server.start`),
    its ASGI app handed to Ray."""

    def __init__(self, source: Source, options: Options) -> None:
        self.server: Server = start(source, options)

    def __serve_build_asgi_app__(self) -> Any:
        return self.server.app

    def check_health(self) -> None:
        """Ray's health check: a replica whose engine has stopped is replaced."""
        if not self.server.engine.alive:
            raise RuntimeError("the engine has stopped")


def application(
    source: Source,
    options: Options | None = None,
    *,
    replicas: int = 1,
    max_replicas: int | None = None,
    num_cpus: float = 1.0,
) -> Application:
    """The Ray Serve application of ``replicas`` servers over ``source`` (0: autoscaled between 1 and
    ``max_replicas``, default the CPUs Ray has over ``num_cpus``), each with ``num_cpus`` CPUs."""
    options = options or Options()
    if replicas < 0 or num_cpus <= 0:
        raise UsageError(f"replicas must be >= 0 and num_cpus > 0, not {replicas} and {num_cpus}")
    if replicas == 0:
        top = max_replicas or max(1, int((os.cpu_count() or 1) // num_cpus))
        scale: dict[str, Any] = {
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": top,
                "target_ongoing_requests": options.max_batch,
            }
        }
    else:
        scale = {"num_replicas": replicas}
    deployment = serve.deployment(Replica).options(  # type: ignore[attr-defined]  # Ray's decorator is untyped
        name=DEPLOYMENT,
        max_ongoing_requests=options.max_batch + options.max_queue,
        ray_actor_options={"num_cpus": num_cpus},
        **scale,
    )
    return deployment.bind(source, options)  # type: ignore[no-any-return]


_SOURCE_KEYS = ("model", "passes", "artifact", "kernels")
_OPTION_KEYS = ("max_batch", "max_queue", "default_max_tokens", "max_body", "model_name", "engine")
_SCALE_KEYS = ("replicas", "max_replicas", "num_cpus")


def app(args: dict[str, str]) -> Application:
    """The builder ``serve run effx.serve.ray:app key=value ...`` calls: ``model``, ``passes``,
    ``artifact``, ``kernels`` (as ``effx serve`` takes them), the server's options (``max_batch``,
    ``max_queue``, ``default_max_tokens``, ``max_body``, ``model_name``, ``engine``) and ``replicas``,
    ``max_replicas``, ``num_cpus``. An unknown key is refused before anything loads."""
    unknown = sorted(set(args) - {*_SOURCE_KEYS, *_OPTION_KEYS, *_SCALE_KEYS})
    if unknown:
        known = ", ".join((*_SOURCE_KEYS, *_OPTION_KEYS, *_SCALE_KEYS))
        raise UsageError(f"unknown argument(s) {', '.join(unknown)}; effx.serve.ray:app takes {known}")
    source = resolve(
        args.get("model"), args.get("passes", ""), artifact=args.get("artifact"), kernels=args.get("kernels")
    )
    fields: dict[str, Any] = {}
    for key in _OPTION_KEYS:
        if key in args:
            fields[key] = args[key] if key in ("model_name", "engine") else _number(key, args[key], int)
    max_replicas = args.get("max_replicas")
    return application(
        source,
        Options(**fields),
        replicas=_number("replicas", args.get("replicas", "1"), int),
        max_replicas=None if max_replicas is None else _number("max_replicas", max_replicas, int),
        num_cpus=_number("num_cpus", args.get("num_cpus", "1"), float),
    )


def _number(key: str, value: str, kind: type[int] | type[float]) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise UsageError(f"{key}={value!r} is not a number") from None


def serve_here(
    source: Source,
    options: Options,
    *,
    replicas: int = 1,
    max_replicas: int | None = None,
    num_cpus: float = 1.0,
) -> None:
    """Start a Ray cluster of this machine alone and serve :func:`application` at ``options.host`` and
    ``options.port`` until interrupted (``effx serve --replicas``); Ray stops with it."""
    import logging

    import ray

    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        built = application(source, options, replicas=replicas, max_replicas=max_replicas, num_cpus=num_cpus)
        serve.run(built, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
