"""The effx runtime: one decode loop over a Program's stages (PyTorch backend)."""

from .forward import KVCache, forward_logits
from .generate import generate
from .sampling import Sampler

__all__ = ["KVCache", "Sampler", "forward_logits", "generate"]
