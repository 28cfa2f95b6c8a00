"""Cheap trained exit heads (EE-Tuning style): small adapters before the shared norm + LM head.

A stock model was not trained to predict from its middle layers, so an exit that reuses the final norm and
head directly is a poor predictor. ``train_exit_heads`` keeps the backbone frozen and trains, per exit layer
``e``, a low-rank residual adapter ``h -> h + up(down(h))`` (``up`` starts at zero, so training starts from
the shared head) to match the final layer's next-token distribution (KL divergence to the last layer's
logits) on a few thousand tokens of text. The adapters are saved as safetensors with JSON metadata and
loaded by ``EarlyExit(head="trained", heads=path)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .data import token_chunks
from .formats import EXIT_HEADS_KIND, load_exit_heads

__all__ = ["load_exit_heads", "train_exit_heads"]



def _backbone(program, chunk: torch.Tensor, layers):
    """For one chunk of text: the embedding output, the hidden states after each of ``layers``, and the full
    model's log-probabilities."""
    from .runtime.forward import KVCache, MaskCache, run_layers
    from .runtime.vocab import head_logits

    cache = KVCache.for_program(program, 1, chunk.shape[1])
    hidden, cos, sin = program.embed.graph(chunk, torch.arange(chunk.shape[1])[None])
    masks = MaskCache(program, torch.ones_like(chunk, dtype=torch.bool), hidden.dtype)
    embedded = hidden
    taken = {}
    for stage in program.layers:
        hidden = run_layers(program, cache, (stage,), hidden, cos, sin, masks)
        if stage.layer in layers:
            taken[stage.layer] = hidden
    teacher = head_logits(program, hidden).float().log_softmax(-1)
    return embedded, taken, teacher


def train_exit_heads(
    program,
    texts,
    tokenizer,
    *,
    layers: list[int] | None = None,
    rank: int = 64,
    seq_len: int = 128,
    max_tokens: int = 4096,
    epochs: int = 3,
    lr: float = 2e-3,
    path: str | os.PathLike | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Train one adapter per exit layer (``layers``, default: the program's exits) with the backbone frozen.

    Returns ``{"layers", "rank", "tokens", "kl_before", "kl_after", "state"}`` (mean KL per token and layer, in
    nats, over the first and the last epoch) and, with ``path``, writes the adapters there as safetensors.
    """
    from safetensors.torch import save_file

    info = program.info
    layers = sorted(layers if layers is not None else program.exits)
    if not layers:
        raise ValueError("no exit layers: pass layers=[...] or apply EarlyExit first")
    if any(not 0 <= x < info.num_layers - 1 for x in layers):
        raise ValueError(f"exit layers must be in 0..{info.num_layers - 2}, got {layers}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    chunks = token_chunks(tokenizer, texts, seq_len, max_tokens)
    g = torch.Generator().manual_seed(seed)
    d = info.hidden_size
    params = {
        e: {
            "down": torch.nn.Parameter(torch.randn(rank, d, generator=g) / d**0.5),
            "up": torch.nn.Parameter(torch.zeros(d, rank)),
        }
        for e in layers
    }
    optim = torch.optim.Adam([p for ps in params.values() for p in ps.values()], lr=lr)
    head = program.head.graph
    frozen = {name: t.detach() for name, t in list(head.named_parameters()) + list(head.named_buffers())}
    kl_before: dict[int, float] = {}
    kl_after: dict[int, float] = {}
    steps = range(epochs * len(chunks))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="train exit heads", unit="chunk")
    for step in steps:
        epoch, chunk = divmod(step, len(chunks))
        with torch.no_grad():
            _, hiddens, teacher = _backbone(program, chunks[chunk], layers)
        optim.zero_grad()
        total = 0.0
        for e in layers:
            h = hiddens[e]
            adapted = h + torch.nn.functional.linear(
                torch.nn.functional.linear(h, params[e]["down"]), params[e]["up"]
            )
            logits = torch.func.functional_call(head, frozen, (adapted,))[0].float()
            # mean KL(teacher || exit) per token
            kl = (
                torch.nn.functional.kl_div(logits.log_softmax(-1), teacher, log_target=True, reduction="sum")
                / teacher[..., 0].numel()
            )
            total = total + kl
            if epoch == 0:
                kl_before[e] = kl_before.get(e, 0.0) + kl.item() / len(chunks)
            if epoch == epochs - 1:
                kl_after[e] = kl_after.get(e, 0.0) + kl.item() / len(chunks)
        total.backward()
        optim.step()
    state = {
        f"exit.{e}.{k}": p.detach().clone().contiguous() for e, ps in params.items() for k, p in ps.items()
    }
    result = {
        "layers": layers,
        "rank": rank,
        "tokens": len(chunks) * seq_len,
        "kl_before": kl_before,
        "kl_after": kl_after,
        "state": state,
    }
    if path is not None:
        meta = {
            "kind": EXIT_HEADS_KIND,
            "architecture": info.architecture,
            "hidden_size": info.hidden_size,
            "num_layers": info.num_layers,
            "vocab_size": info.vocab_size,
            "layers": layers,
            "rank": rank,
            "tokens": result["tokens"],
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(state, str(tmp), metadata={"effx": json.dumps(meta)})
        tmp.replace(path)
    return result


