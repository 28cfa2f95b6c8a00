"""The ``effx`` command line: generate text and inspect Programs.

effx generate --model smollm2-135m "Explain tides in two sentences."
effx inspect --model smollm2-135m

The declarations live in :mod:`effx.cli.parser`, the commands in :mod:`effx.cli.commands` (over
:mod:`effx.frontend`); :func:`main` runs one and turns its errors into one line on stderr and an exit status:
2 for a usage error (argparse's own, an unknown model, a bad pipeline string, options that do not go
together), 1 when the work fails, 130 when interrupted (Ctrl-C or a TERM signal).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading

from ..errors import EffxError, PassConfigError
from ..frontend import UsageError, chat_prompt, chat_template
from ..show import ShowError
from .parser import build_parser

__all__ = ["USAGE_ERRORS", "chat_prompt", "chat_template", "main"]

# what the arguments got wrong (bench's BenchConfigError is a PassConfigError): exit 2, as argparse's own
USAGE_ERRORS = (UsageError, PassConfigError, ShowError)

# top-level modules of the torch extra (pyproject.toml): missing, they mean an artifact-only install
_TORCH_EXTRA = frozenset(
    {"torch", "transformers", "gguf", "accelerate", "safetensors", "onnx", "onnxscript", "onnx_ir", "datasets",
     "evaluate", "rouge_score", "sacrebleu", "fvcore", "matplotlib", "tqdm"}
)  # fmt: skip

# top-level modules of the serve extra (`effx serve`)
_SERVE_EXTRA = frozenset({"fastapi", "starlette", "uvicorn", "prometheus_client"})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        with _term_as_interrupt():
            return args.func(args)
    except USAGE_ERRORS as e:
        return _error(e, 2)
    except EffxError as e:
        return _error(e, 1)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top in _SERVE_EXTRA:
            return _error(
                f'`effx serve` needs {e.name}, which this install lacks: pip install "effx[serve]"', 1
            )
        if top not in _TORCH_EXTRA:
            raise
        # an install without the torch extra runs artifacts only (`effx run`, `effx chat --artifact`)
        return _error(
            f"`effx {args.command}` needs {e.name}, which this install lacks: "
            'pip install "effx[torch]" (an install without it runs exported artifacts only: effx run)',
            1,
        )
    except KeyboardInterrupt:
        print("effx: interrupted", file=sys.stderr)
        return 130


def _error(message, status: int) -> int:
    print(f"effx: error: {message}", file=sys.stderr)
    return status


@contextlib.contextmanager
def _term_as_interrupt():
    """A TERM signal unwinds like Ctrl-C (exports remove their half-written folder); on the main thread only,
    where Python handles signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
