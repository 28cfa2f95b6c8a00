"""Facts about this installation that every layer may ask: effx's version, and whether torch is importable
(an ONNX-only deployment runs without it)."""

from __future__ import annotations

import importlib.util

__all__ = ["__version__", "torch_available"]

__version__ = "0.1.0"


def torch_available() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except ImportError:  # an import hook that forbids torch
        return False
