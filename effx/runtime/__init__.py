"""The effx runtime: one decode loop (:mod:`effx.runtime.loop`) over a Backend that runs a plan's stages:
the torch backend (:mod:`effx.runtime.torch_backend`) or ONNX Runtime (:mod:`effx.runtime.onnx`, which needs
only numpy and onnxruntime)."""

from .._about import torch_available

if torch_available():  # without torch, effx.runtime.onnx and the loop are usable
    from .forward import KVCache, forward_logits
    from .generate import generate
    from .sampling import Sampler

__all__ = ["KVCache", "Sampler", "forward_logits", "generate"]
