"""The effx runtimes: the PyTorch decode loop over a Program's stages, and (``effx.runtime.onnx``) an
ONNX Runtime backend that needs only numpy and onnxruntime."""

from .. import _torch_available

if _torch_available():  # without torch, only effx.runtime.onnx is usable
    from .forward import KVCache, forward_logits
    from .generate import generate
    from .sampling import Sampler

__all__ = ["KVCache", "Sampler", "forward_logits", "generate"]
