"""The files that passes read, and that effx's calibration tools write: trained exit heads
(``effx.train_exit_heads``, read by ``EarlyExit(head="trained")``) and neuron profiles
(``effx.profile_neurons``, read by ``NeuronMask``). Safetensors with JSON metadata that names the kind of
file and the model's shape, so a file of one model is refused by another.

Below the passes and the runtime: reading a file runs no model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ArtifactError

__all__ = [
    "EXIT_HEADS_KIND",
    "NEURONS_KIND",
    "QUANTILE_LEVELS",
    "NeuronProfile",
    "load_exit_heads",
    "load_neuron_profile",
]

EXIT_HEADS_KIND = "effx-exit-heads"
NEURONS_KIND = "effx-neurons"
QUANTILE_LEVELS = tuple(i / 100 for i in range(1, 100))


def _read(path, info, kind: str, what: str, writer: str, keys, mismatch: str) -> tuple[dict, dict]:
    """The metadata and tensors of the ``kind`` file at ``path`` (written by ``writer``), checked against the
    model's ``keys``; every problem is an ``ArtifactError`` that says what to do."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} {path} does not exist; write one with {writer}(..., path=...)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("effx", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, ValueError, OSError) as e:
        raise ArtifactError(f"{path} is not a readable {what}: {e}") from e
    if meta.get("kind") != kind:
        raise ArtifactError(f"{path} was not written by {writer} (no '{kind}' metadata)")
    for key in keys:
        if meta.get(key) != getattr(info, key):
            raise ArtifactError(f"{path} {mismatch} {key}={meta.get(key)}; this one has {getattr(info, key)}")
    return meta, tensors


def load_exit_heads(path: str | os.PathLike, info) -> dict[int, dict[str, torch.Tensor]]:
    """Adapters from a file written by :func:`train_exit_heads`, checked against the model (``ModelInfo``)."""
    meta, tensors = _read(
        path, info, EXIT_HEADS_KIND, "exit heads file", "effx.train_exit_heads",
        ("hidden_size", "num_layers", "vocab_size"), "was trained for a model with",
    )
    heads: dict[int, dict[str, torch.Tensor]] = {}
    for e in meta["layers"]:
        try:
            heads[int(e)] = {"down": tensors[f"exit.{e}.down"], "up": tensors[f"exit.{e}.up"]}
        except KeyError as err:
            raise ArtifactError(f"{path} lacks tensor {err} for exit layer {e}") from None
    return heads


@dataclass
class NeuronProfile:
    mean_abs: dict[int, torch.Tensor]  # layer -> [F]
    freq: dict[int, torch.Tensor]  # layer -> [F]
    gate_quantiles: dict[int, torch.Tensor]  # layer -> [len(QUANTILE_LEVELS)]
    meta: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        tensors = {}
        for i in self.mean_abs:
            tensors[f"layer.{i}.mean_abs"] = self.mean_abs[i].contiguous()
            tensors[f"layer.{i}.freq"] = self.freq[i].contiguous()
            tensors[f"layer.{i}.gate_quantiles"] = self.gate_quantiles[i].contiguous()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"effx": json.dumps({**self.meta, "kind": NEURONS_KIND})})
        tmp.replace(path)
        return path

    def gate_threshold(self, layer: int, sparsity: float) -> float:
        """The ``|act(gate)|`` below which a ``sparsity`` share of this layer's activations fall."""
        if sparsity <= 0:
            return 0.0
        levels = torch.tensor(QUANTILE_LEVELS, dtype=torch.float64)
        q = self.gate_quantiles[layer].double()
        return float(_interp(torch.tensor([sparsity], dtype=torch.float64), levels, q)[0])


def _interp(x, xp, fp):
    x = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    w = (x - xp[i - 1]) / (xp[i] - xp[i - 1])
    return fp[i - 1] + w * (fp[i] - fp[i - 1])


def load_neuron_profile(path: str | os.PathLike, info) -> NeuronProfile:
    """A profile written by :func:`profile_neurons`, checked against the model (``ModelInfo``)."""
    meta, tensors = _read(
        path, info, NEURONS_KIND, "neuron profile", "effx.profile_neurons",
        ("num_layers", "hidden_size", "intermediate_size"), "profiles a model with",
    )
    out = NeuronProfile({}, {}, {}, meta)
    width = info.intermediate_size
    for i in range(info.num_layers):
        try:
            mean, freq, q = (tensors[f"layer.{i}.{name}"] for name in ("mean_abs", "freq", "gate_quantiles"))
        except KeyError as err:
            raise ArtifactError(f"{path} lacks tensor {err}") from None
        if mean.shape != (width,) or freq.shape != (width,) or q.shape != (len(QUANTILE_LEVELS),):
            raise ArtifactError(
                f"{path}: layer {i} tensors have the wrong shape for intermediate size {width}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(freq).all() and torch.isfinite(q).all()):
            raise ArtifactError(f"{path}: layer {i} holds non-finite values")
        out.mean_abs[i], out.freq[i], out.gate_quantiles[i] = mean, freq, q
    return out
