"""What ``effx bench`` computes from generations: pass statistics, the share of tokens per path (see
:mod:`effx.bench.schema`), ROUGE-L, and the spread of a timing. Agreement and perplexity on held-out text
come from :func:`effx.quality.teacher_forced` (:func:`effx.bench.run.score_heldout`)."""

from __future__ import annotations

import statistics

from ..quality import rouge_l
from ..runtime.stats import DecodeStats


def pass_stats(stats_list: list[dict], prompt_lengths: list[int]) -> dict[str, float]:
    """A configuration's pass statistics over its generations (``stats_list``, one ``generate`` stats dict
    per prompt): mean layers per decoded token, the reduced head's fallback share, draft acceptance and the
    share of prompt tokens TokenDrop kept; a key only where the pass ran."""
    out: dict[str, float] = {}
    depths = [d[0] for st in stats_list for d in st.get("exit_layers", [])]
    if depths:
        out["mean_layers"] = statistics.mean(depths)
    positions = sum(st.get("head_positions", 0) for st in stats_list)
    if positions:
        out["head_fallback_share"] = sum(st.get("head_fallbacks", 0) for st in stats_list) / positions
    drafted = sum(st.get("drafted", 0) for st in stats_list)
    if drafted:
        out["draft_acceptance"] = sum(st.get("accepted", 0) for st in stats_list) / drafted
    shares = []
    for st, n in zip(stats_list, prompt_lengths, strict=True):
        kept = st.get("kept_tokens")
        if kept:
            shares.append(kept[max(kept)][0] / n)
    if shares:
        out["kept_share"] = statistics.mean(shares)
    return out


def paths(stats: dict, new_tokens: int, num_layers: int, reduced_head: bool = False) -> dict[str, float]:
    """Share of one generation's tokens each path produced, the cascade seed's "share of tokens per path"
    (:meth:`effx.runtime.stats.DecodeStats.paths` of the run's stats)."""
    return DecodeStats.from_dict(stats).paths(new_tokens, num_layers, reduced_head)


def _path_order(key: str) -> tuple:
    """Exits by depth, then the full depth, then the rest (heads, drafts) as they came."""
    if key.startswith("exit at layer "):
        return (0, int(key.rsplit(" ", 1)[1]))
    return (1, 0) if key.startswith("all ") else (2, 0)


def mean_paths(per_sample: list[dict[str, float]]) -> dict[str, float]:
    """The mean of per-generation :func:`paths` (a path missing from a generation counts 0), exits by
    depth, then the full depth, then the rest."""
    keys = sorted(dict.fromkeys(k for p in per_sample for k in p), key=_path_order)
    return {k: statistics.mean(p.get(k, 0.0) for p in per_sample) for k in keys}


def rouge(preds: list[str], refs: list[str]) -> float:
    """Mean ROUGE-L F1; identical texts score exactly 1.0 (also two empty ones, which the scorer gives 0)."""

    scores = [1.0 if p == r else rouge_l([p], [r]) for p, r in zip(preds, refs, strict=True)]
    return statistics.mean(scores)


def spread(values: list[float]) -> dict[str, float]:
    """The median, minimum and maximum of a timing's values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
