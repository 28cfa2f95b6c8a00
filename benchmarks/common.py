"""Helpers shared by the benchmark scripts: timing a Program over a prompt set. Exit heads, vocabulary
rankings and neuron profiles made once and cached live in effx.bench (``effx bench`` needs them too) and are
re-exported here under their old names."""

from __future__ import annotations

import logging
import statistics
import time

import torch

from effx.bench import exit_heads, neuron_profile, vocab_file

__all__ = ["exit_heads", "median_ms", "neuron_profile", "run_prompts", "same", "token_match", "vocab_file"]

# the helpers log how long making an artifact took; the scripts show it as they used to print it
_log = logging.getLogger("effx.bench")
if not _log.handlers:
    _log.addHandler(logging.StreamHandler())
    _log.setLevel(logging.INFO)


def run_prompts(fn, prompts):
    """Call ``fn(ids, mask)`` on each prompt; returns (new tokens of row 0 per prompt, total seconds)."""
    outs, secs = [], []
    for ids, mask in prompts:
        start = time.perf_counter()
        out = fn(ids, mask)
        secs.append(time.perf_counter() - start)
        outs.append(out[0, ids.shape[1] :])
    return outs, sum(secs)


def same(outs, refs) -> bool:
    return all(torch.equal(a, b) for a, b in zip(outs, refs, strict=True))


def token_match(outs, refs) -> float:
    """Share of generated positions where two runs emitted the same token."""
    hits = sum(int((a == b).sum()) for a, b in zip(outs, refs, strict=True))
    return hits / sum(r.numel() for r in refs)


def median_ms(fn, *args, repeats: int = 30) -> float:
    times = []
    with torch.inference_mode():
        fn(*args)
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
