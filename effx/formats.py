"""The files that passes read, and that effx's calibration tools write: trained exit heads
(``effx.train_exit_heads``, read by ``EarlyExit(head="trained")``), draft branches
(``effx.train_draft_branch``, read by ``DraftBranch``) and neuron profiles (``effx.profile_neurons``, read
by ``NeuronMask``). Safetensors with JSON metadata that names the kind of
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
    "BRANCH_KIND",
    "EXIT_HEADS_KIND",
    "NEURONS_KIND",
    "QUANTILE_LEVELS",
    "NeuronProfile",
    "branch_shapes",
    "load_draft_branch",
    "load_exit_heads",
    "load_neuron_profile",
]

EXIT_HEADS_KIND = "effx-exit-heads"
BRANCH_KIND = "effx-draft-branch"
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


# Widening these to float32 is exact; anything else would change the trained values or is not a weight.
_WIDENED_EXACTLY = (torch.float16, torch.bfloat16)


def _float32(path, what: str, t: torch.Tensor, kind: str = "exit heads") -> torch.Tensor:
    """``t`` as float32: float32 as is, float16/bfloat16 widened (exact); float64 (narrowing would change
    the values silently), integers and bools refused; NaN and inf refused."""
    if t.dtype in _WIDENED_EXACTLY:
        t = t.float()
    elif t.dtype != torch.float32:
        raise ArtifactError(
            f"{path}: {what} is {str(t.dtype).removeprefix('torch.')}; {kind} are float32 "
            "(float16/bfloat16 are widened exactly; convert others with tensor.float() and save again)"
        )
    if not torch.isfinite(t).all():
        raise ArtifactError(f"{path}: {what} holds NaN or infinite values")
    return t


def load_exit_heads(path: str | os.PathLike, info) -> dict[int, dict[str, torch.Tensor]]:
    """Adapters from a file written by :func:`train_exit_heads`, checked against the model (``ModelInfo``):
    exit layers in ``0..num_layers-2``, per layer ``down [rank, hidden_size]`` and ``up [hidden_size, rank]``
    with ``1 <= rank <= hidden_size``, float32 (float16 and bfloat16 are widened exactly; float64, integer
    and bool tensors are refused), every value finite. Each problem is a one-line ``ArtifactError`` naming
    the file."""
    meta, tensors = _read(
        path,
        info,
        EXIT_HEADS_KIND,
        "exit heads file",
        "effx.train_exit_heads",
        ("hidden_size", "num_layers", "vocab_size"),
        "was trained for a model with",
    )
    layers = meta.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ArtifactError(f"{path}: its metadata lists no exit layers")
    d = info.hidden_size
    heads: dict[int, dict[str, torch.Tensor]] = {}
    for e in layers:
        if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < info.num_layers - 1:
            raise ArtifactError(
                f"{path}: exit layer {e!r} is not in 0..{info.num_layers - 2} (the model has {info.num_layers})"
            )
        try:
            down, up = tensors[f"exit.{e}.down"], tensors[f"exit.{e}.up"]
        except KeyError as err:
            raise ArtifactError(f"{path} lacks tensor {err} for exit layer {e}") from None
        rank = down.shape[0] if down.dim() == 2 else -1
        if down.dim() != 2 or up.dim() != 2 or down.shape[1] != d or tuple(up.shape) != (d, rank):
            raise ArtifactError(
                f"{path}: exit layer {e} has down {list(down.shape)} and up {list(up.shape)}; expected "
                f"[rank, {d}] and [{d}, rank] (hidden_size {d})"
            )
        if not 1 <= rank <= d:
            raise ArtifactError(f"{path}: exit layer {e} has rank {rank}; expected 1..{d} (the hidden size)")
        heads[e] = {
            "down": _float32(path, f"exit.{e}.down", down),
            "up": _float32(path, f"exit.{e}.up", up),
        }
    return heads


def branch_shapes(info, ffn: int) -> dict[str, tuple[int, ...]]:
    """The tensors of a draft branch for the model ``info`` (``ModelInfo``) with an MLP ``ffn`` wide, and
    their shapes: the input norms and fusion, then one decoder layer of the model's attention shape."""
    d, heads, kv, hd = info.hidden_size, info.num_heads, info.num_kv_heads, info.head_dim
    return {
        "norm_emb": (d,),
        "norm_feat": (d,),
        "fc.weight": (d, 2 * d),
        "norm_attn": (d,),
        "q.weight": (heads * hd, d),
        "k.weight": (kv * hd, d),
        "v.weight": (kv * hd, d),
        "o.weight": (d, heads * hd),
        "norm_mlp": (d,),
        "gate.weight": (ffn, d),
        "up.weight": (ffn, d),
        "down.weight": (d, ffn),
    }


def load_draft_branch(path: str | os.PathLike, info) -> tuple[dict, dict[str, torch.Tensor]]:
    """A draft branch written by :func:`effx.train_draft_branch`, checked against the model (``ModelInfo``):
    its metadata (``ffn``, the MLP width, 1..4 x hidden_size; ``eps``), every tensor of
    :func:`branch_shapes` with its shape, float32 (float16 and bfloat16 widened exactly), finite, and no
    other tensor. Returns ``(metadata, tensors)``; each problem is a one-line ``ArtifactError``."""
    meta, tensors = _read(
        path,
        info,
        BRANCH_KIND,
        "draft branch file",
        "effx.train_draft_branch",
        ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"),
        "was trained for a model with",
    )
    ffn = meta.get("ffn")
    if isinstance(ffn, bool) or not isinstance(ffn, int) or not 1 <= ffn <= 4 * info.hidden_size:
        raise ArtifactError(f"{path}: its metadata gives ffn={ffn!r}; expected 1..{4 * info.hidden_size}")
    eps = meta.get("eps")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ArtifactError(f"{path}: its metadata gives eps={eps!r}; expected a number in (0, 1)")
    shapes = branch_shapes(info, ffn)
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise ArtifactError(f"{path} holds tensors a draft branch does not have: {', '.join(extra)}")
    out = {}
    for name, shape in shapes.items():
        if name not in tensors:
            raise ArtifactError(f"{path} lacks tensor {name!r} of a draft branch")
        if tuple(tensors[name].shape) != shape:
            raise ArtifactError(f"{path}: {name} is {list(tensors[name].shape)}; expected {list(shape)}")
        out[name] = _float32(path, name, tensors[name], "draft branches")
    return meta, out


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
        path,
        info,
        NEURONS_KIND,
        "neuron profile",
        "effx.profile_neurons",
        ("num_layers", "hidden_size", "intermediate_size"),
        "profiles a model with",
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
        if not all(t.is_floating_point() for t in (mean, freq, q)):
            raise ArtifactError(f"{path}: layer {i} tensors must be floating point (they are statistics)")
        if not (torch.isfinite(mean).all() and torch.isfinite(freq).all() and torch.isfinite(q).all()):
            raise ArtifactError(f"{path}: layer {i} holds non-finite values")
        if (mean < 0).any() or (freq < 0).any() or (freq > 1).any() or (q < 0).any():
            raise ArtifactError(f"{path}: layer {i} holds a negative magnitude or a frequency outside [0, 1]")
        if (q[1:] < q[:-1]).any():
            raise ArtifactError(f"{path}: layer {i}'s gate quantiles are not in increasing order")
        out.mean_abs[i], out.freq[i], out.gate_quantiles[i] = mean, freq, q
    return out
