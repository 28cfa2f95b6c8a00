"""Runtime side of vocabulary-reduced heads (see :mod:`effx.passes.vocab_reduce`).

* ``head_logits``: the head, with the full-vocabulary fallback of a reduced head applied per position;
* ``select_vocab``: the token ids a pruned exit scores, from the previous exit's logits and the schedule
  the pass wrote in the exit's attributes;
* ``exit_logits``: an exit stage called with or without those ids.
"""

from __future__ import annotations

import torch

__all__ = ["exit_logits", "head_logits", "select_vocab"]


def head_logits(program, hidden: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
    """``program.head`` on ``hidden [b, s, d]``. A reduced head with a fallback threshold re-scores, with the
    full head, every position whose top probability within the subset is below the threshold."""
    logits = program.head.graph(hidden)[0]
    threshold = program.head.attrs.get("fallback")
    if not threshold or program.full_head is None:
        return logits
    need = logits.float().softmax(-1).amax(-1) < threshold  # [b, s]
    if stats is not None:
        stats["head_positions"] = stats.get("head_positions", 0) + need.numel()
        stats["head_fallbacks"] = stats.get("head_fallbacks", 0) + int(need.sum())
    if bool(need.any()):
        logits = logits.clone()
        logits[need] = program.full_head.graph(hidden[need][:, None])[0][:, 0]
    return logits


def select_vocab(logits: torch.Tensor, stage, ids: torch.Tensor | None) -> torch.Tensor:
    """The ids ``[..., k]`` that the pruned exit ``stage`` scores, given the previous exit's logits
    ``[..., V]`` (``-inf`` outside its own subset) and the ids that exit scored (``None`` for a full exit).
    Leading dimensions are rows (decoding: ``[b]``) or rows and positions (teacher-forced: ``[b, s]``)."""
    k = stage.attrs["vocab_k"]
    if ids is not None and ids.shape[-1] <= k:
        return ids  # fixed schedule: the first exit's subset, again
    mass = stage.attrs.get("vocab_mass")
    if mass is None:
        return logits.topk(k, dim=-1).indices
    top = logits.float().softmax(-1).topk(k, dim=-1)
    # adaptive: the fewest top tokens whose probability reaches ``mass``; the largest count in the batch
    need = (top.values.cumsum(-1) < mass).sum(-1) + 1
    n = int(need.clamp(min=stage.attrs["vocab_min_k"], max=k).max())
    return top.indices[..., :n]


def exit_logits(
    stage, hidden: torch.Tensor, prev: torch.Tensor, ids: torch.Tensor | None, *, chunk: int = 16
):
    """``(logits, confidence)`` of an exit stage on ``hidden [b, s, d]``. Pruned exits need ``ids``: ``[b, k]``
    (one subset for all positions, as in decoding) or ``[b, s, k]`` (one per position, teacher-forced; run
    ``chunk`` positions at a time, each as a row of its own)."""
    if stage.attrs.get("vocab") != "pruned":
        return stage.graph(hidden, prev)
    if ids is None:
        raise ValueError(f"{stage.name} scores a pruned vocabulary: it needs the ids to score")
    if ids.ndim == 2:
        return stage.graph(hidden, prev, ids)
    b, s, d = hidden.shape
    rows_h, rows_p, rows_i = hidden.reshape(b * s, 1, d), prev.reshape(b * s, 1, d), ids.reshape(b * s, -1)
    parts = [
        stage.graph(rows_h[i : i + chunk], rows_p[i : i + chunk], rows_i[i : i + chunk])
        for i in range(0, b * s, chunk)
    ]
    logits = torch.cat([p[0] for p in parts]).reshape(b, s, -1)
    conf = torch.cat([p[1] for p in parts]).reshape(b, s)
    return logits, conf
