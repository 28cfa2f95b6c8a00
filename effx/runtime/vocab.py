"""Runtime side of vocabulary-reduced heads (see :mod:`effx.passes.vocab_reduce`).

* ``head_logits``: the head, with the full-vocabulary fallback of a reduced head applied per position;
* ``select_vocab``: the token ids a pruned exit scores, from the previous exit's logits and the schedule
  the pass wrote in the exit's attributes;
* ``exit_logits``: an exit stage called with or without those ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..arrays import Array, copy, namespace, softmax, topk
from ..plan import StageSpec
from .forward import as_backend
from .stats import DecodeStats, StatsArg, collecting

if TYPE_CHECKING:
    from .forward import BackendLike

__all__ = ["exit_logits", "head_logits", "select_vocab"]


def head_logits(backend: BackendLike, hidden: Array, stats: StatsArg = None) -> Array:
    """The head on ``hidden [b, s, d]``. A reduced head with a fallback threshold re-scores, with the full
    head, every position whose top probability within the subset is below the threshold (counted in
    ``stats``' ``head_positions``/``head_fallbacks``: a DecodeStats, or a dict to fill)."""
    if stats is not None and not isinstance(stats, DecodeStats):
        with collecting(stats) as typed:
            return head_logits(backend, hidden, typed)
    backend = as_backend(backend)
    plan, xp = backend.plan, backend.xp
    logits = backend.run(plan.head, hidden)[0]
    threshold = plan.head.attrs.get("fallback")
    full = plan.full_head
    if not threshold or full is None:
        return logits
    need = xp.max(softmax(xp, logits), axis=-1) < threshold  # [b, s]
    if stats is not None:
        stats.count_head(need.shape[0] * need.shape[1], int(xp.sum(xp.astype(need, xp.int64))))
    if bool(xp.any(need)):
        logits = copy(xp, logits)
        logits[need] = backend.run(full, hidden[need][:, None])[0][:, 0]
    return logits


def select_vocab(logits: Array, stage: StageSpec, ids: Array | None) -> Array:
    """The ids ``[..., k]`` that the pruned exit ``stage`` scores, given the previous exit's logits
    ``[..., V]`` (``-inf`` outside its own subset) and the ids that exit scored (``None`` for a full exit).
    Leading dimensions are rows (decoding: ``[b]``) or rows and positions (teacher-forced: ``[b, s]``)."""
    xp = namespace(logits)
    k = stage.attrs["vocab_k"]
    if ids is not None and ids.shape[-1] <= k:
        return ids  # fixed schedule: the first exit's subset, again
    mass = stage.attrs.get("vocab_mass")
    if mass is None:
        return topk(xp, logits, k)[1]
    values, indices = topk(xp, softmax(xp, logits), k)
    # adaptive: the fewest top tokens whose probability reaches ``mass``; the largest count in the batch
    need = xp.sum(xp.astype(xp.cumulative_sum(values, axis=-1) < mass, xp.int64), axis=-1) + 1
    n = int(xp.max(xp.clip(need, min=stage.attrs["vocab_min_k"], max=k)))
    return indices[..., :n]


def exit_logits(
    backend: BackendLike, stage: StageSpec, hidden: Array, prev: Array, ids: Array | None, *, chunk: int = 16
) -> tuple[Array, ...]:
    """``(logits, confidence)`` of an exit stage on ``hidden [b, s, d]``. Pruned exits need ``ids``: ``[b, k]``
    (one subset for all positions, as in decoding) or ``[b, s, k]`` (one per position, teacher-forced; run
    ``chunk`` positions at a time, each as a row of its own)."""
    backend = as_backend(backend)
    if stage.attrs.get("vocab") != "pruned":
        return tuple(backend.run(stage, hidden, prev))
    if ids is None:
        raise ValueError(f"{stage.name} scores a pruned vocabulary: it needs the ids to score")
    if ids.ndim == 2:
        return tuple(backend.run(stage, hidden, prev, ids))
    xp = backend.xp
    b, s, d = hidden.shape
    rows_h, rows_p = xp.reshape(hidden, (b * s, 1, d)), xp.reshape(prev, (b * s, 1, d))
    rows_i = xp.reshape(ids, (b * s, -1))
    parts = [
        backend.run(stage, rows_h[i : i + chunk], rows_p[i : i + chunk], rows_i[i : i + chunk])
        for i in range(0, b * s, chunk)
    ]
    logits = xp.reshape(xp.concat([p[0] for p in parts]), (b, s, -1))
    conf = xp.reshape(xp.concat([p[1] for p in parts]), (b, s))
    return logits, conf
