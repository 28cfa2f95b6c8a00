"""MLP neuron profiles: how strongly and how often each FFN neuron is active on some text.

A gated MLP computes ``down(act(gate(x)) * up(x))``; neuron ``j`` of a layer is column ``j`` of that
intermediate product. ``profile_neurons`` runs calibration text through a Program (teacher-forced, with
the KV cache) and records per layer and neuron:

* ``mean_abs``: the mean of ``|act(gate) * up|`` over the tokens;
* ``freq``: the share of tokens for which the neuron is among that token's top ``top_share`` neurons by
  magnitude (CoreInfer's token-wise core neurons, counted over the text: PartInfer's activation frequency);
* ``gate_quantiles``: quantiles of ``|act(gate)|`` over tokens and neurons, at ``QUANTILE_LEVELS``, from
  which per-token magnitude thresholds for a target sparsity are read (CATS).

A profile is written as safetensors with JSON metadata (model shape, what data, how many tokens), so a
profile of one model is refused by another. Profile per task (the user's own texts) and for the model as
a whole, as PartInfer does, and combine them in ``NeuronMask(profile=..., base=...)``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ArtifactError

__all__ = ["NeuronProfile", "load_neuron_profile", "mlp_nodes", "mlp_probe", "profile_neurons"]

_KIND = "effx-neurons"
QUANTILE_LEVELS = tuple(i / 100 for i in range(1, 100))


def mlp_nodes(graph: torch.fx.Graph):
    """The gate, up and down projections (``aten.linear`` nodes) of a layer graph's MLP."""
    found = {}
    for n in graph.nodes:
        role = n.meta.get("effx_role")
        if (
            n.op == "call_function"
            and n.target == torch.ops.aten.linear.default
            and role
            in (
                "mlp.gate",
                "mlp.up",
                "mlp.down",
            )
        ):
            if role in found:
                raise ValueError(f"two {role} projections in one layer graph")
            found[role] = n
    missing = {"mlp.gate", "mlp.up", "mlp.down"} - set(found)
    if missing:
        raise ValueError(f"the layer graph has no {', '.join(sorted(missing))} projection: not a gated MLP")
    return found["mlp.gate"], found["mlp.up"], found["mlp.down"]


def mlp_probe(layer_graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The layer graph with two more outputs: the MLP intermediate ``act(gate) * up`` and ``act(gate)``."""
    gm = torch.fx.GraphModule(layer_graph, copy.deepcopy(layer_graph.graph))
    gate, _, down = mlp_nodes(gm.graph)
    act = next(iter(gate.users))  # act(gate): the gate's only user
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = (tuple(output.args[0]) + (down.args[0], act),)
    gm.recompile()
    return gm


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
        save_file(tensors, str(tmp), metadata={"effx": json.dumps({**self.meta, "kind": _KIND})})
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


def profile_neurons(
    program,
    texts,
    tokenizer,
    *,
    path: str | os.PathLike | None = None,
    data: str = "",
    seq_len: int = 256,
    max_tokens: int = 8192,
    top_share: float = 0.2,
    progress: bool = False,
) -> NeuronProfile:
    """Profile every layer's MLP neurons on ``texts`` (see the module docstring); save to ``path`` if given.

    ``data`` names the text in the file's metadata (e.g. ``"chat"``, ``"qa"``); ``program`` is a dense
    Program (``effx.transform(model)``).
    """
    from tqdm.auto import tqdm

    from .exit_heads import _token_chunks
    from .runtime.forward import KVCache, MaskCache

    if not 0 < top_share <= 1:
        raise ValueError(f"top_share must be in (0, 1], got {top_share}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    chunks = _token_chunks(tokenizer, texts, seq_len, max_tokens)
    probes = {s.layer: mlp_probe(s.graph) for s in program.layers}
    width = program.info.intermediate_size
    top = max(1, round(top_share * width))
    sums = {i: torch.zeros(width, dtype=torch.float64) for i in probes}
    counts = {i: torch.zeros(width, dtype=torch.float64) for i in probes}
    samples: dict[int, list] = {i: [] for i in probes}
    g = torch.Generator().manual_seed(0)
    n = 0
    with torch.inference_mode():
        for chunk in tqdm(chunks, desc="profile neurons", unit="chunk", disable=not progress):
            cache = KVCache.for_program(program, 1, chunk.shape[1])
            hidden, cos, sin = program.embed.graph(chunk, torch.arange(chunk.shape[1])[None])
            masks = MaskCache(program, torch.ones_like(chunk, dtype=torch.bool), hidden.dtype)
            for stage in program.layers:
                i = stage.layer
                mask = masks.get(0, chunk.shape[1], stage.attrs.get("sliding_window"))
                hidden, k, v, inter, act = probes[i](hidden, cos, sin, mask, *cache.past(i))
                cache.write(i, k, v)
                a = inter[0].abs().double()  # [s, F]
                sums[i] += a.sum(0)
                counts[i] += torch.zeros_like(a).scatter_(1, a.topk(top, dim=-1).indices, 1.0).sum(0)
                flat = act.abs().flatten().float()
                samples[i].append(flat[torch.randint(flat.numel(), (4096,), generator=g)])
            n += chunk.shape[1]
    levels = torch.tensor(QUANTILE_LEVELS)
    info = program.info
    profile = NeuronProfile(
        mean_abs={i: (sums[i] / n).float() for i in probes},
        freq={i: (counts[i] / n).float() for i in probes},
        gate_quantiles={i: torch.quantile(torch.cat(samples[i]), levels) for i in probes},
        meta={
            "architecture": info.architecture,
            "num_layers": info.num_layers,
            "hidden_size": info.hidden_size,
            "intermediate_size": info.intermediate_size,
            "data": data or f"{len(texts)} texts",
            "tokens": n,
            "top_share": top_share,
        },
    )
    if path is not None:
        profile.save(path)
    return profile


def load_neuron_profile(path: str | os.PathLike, info) -> NeuronProfile:
    """A profile written by :func:`profile_neurons`, checked against the model (``ModelInfo``)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(
            f"neuron profile {path} does not exist; write one with effx.profile_neurons(..., path=...)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("effx", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, ValueError, OSError) as e:
        raise ArtifactError(f"{path} is not a readable neuron profile: {e}") from e
    if meta.get("kind") != _KIND:
        raise ArtifactError(f"{path} was not written by effx.profile_neurons (no '{_KIND}' metadata)")
    for key in ("num_layers", "hidden_size", "intermediate_size"):
        if meta.get(key) != getattr(info, key):
            raise ArtifactError(
                f"{path} profiles a model with {key}={meta.get(key)}; this one has {getattr(info, key)}"
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
