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

import os

import torch

from .data import token_chunks
from .formats import QUANTILE_LEVELS, NeuronProfile, load_neuron_profile
from .fx import mlp_probe
from .runtime.forward import KVCache, MaskCache

__all__ = ["QUANTILE_LEVELS", "NeuronProfile", "load_neuron_profile", "profile_neurons"]


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

    if not 0 < top_share <= 1:
        raise ValueError(f"top_share must be in (0, 1], got {top_share}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    chunks = token_chunks(tokenizer, texts, seq_len, max_tokens)
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
