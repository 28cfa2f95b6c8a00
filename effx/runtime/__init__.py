"""The effx runtimes: the PyTorch decode loop over a Program's stages, and (``effx.runtime.onnx``) an
ONNX Runtime backend that needs only numpy and onnxruntime."""

import importlib

# ``generate`` lives in ``effx.runtime.generate`` (a module of that name: import the function from there)
_LAZY = {"KVCache": "forward", "forward_logits": "forward", "Sampler": "sampling"}

__all__ = ["KVCache", "Sampler", "forward_logits"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'effx.runtime' has no attribute {name!r}")
