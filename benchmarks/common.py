"""Helpers shared by the benchmark scripts: timing rows over a prompt set with effx.bench's interleaved
loop. Exit heads, vocabulary rankings and neuron profiles made once and cached live in effx.bench
(``effx bench`` needs them too) and are re-exported here under their old names."""

from __future__ import annotations

import logging
import statistics
import time

import torch

from effx.bench import exit_heads, first_outputs, interleave, neuron_profile, total_seconds, vocab_file

__all__ = [
    "exit_heads",
    "generator",
    "median_ms",
    "neuron_profile",
    "same",
    "time_rows",
    "token_match",
    "vocab_file",
]

# the helpers log how long making an artifact took; the scripts show it as they used to print it
_log = logging.getLogger("effx.bench")
if not _log.handlers:
    _log.addHandler(logging.StreamHandler())
    _log.setLevel(logging.INFO)


def generator(prog, new_tokens: int):
    """``runner(ids, mask)`` for :func:`time_rows`: ``prog`` decodes exactly ``new_tokens`` tokens greedily;
    returns ``(ids, stats)``."""

    def run(ids, mask):
        stats: dict = {}
        out = prog.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=[], stats=stats)
        return out, stats

    return run


def peer_runners(model, progs: dict, n: int) -> dict:
    """``runner(ids, mask)`` per row for :func:`effx.bench.interleave`: HF ``generate`` float32 on ``model``
    (``"HF generate float32"``), then each Program of ``progs`` by its label, every one decoding exactly
    ``n`` tokens greedily with no stop token."""

    def hf(ids, mask):
        with torch.inference_mode():
            return model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n
            )

    runners = {"HF generate float32": hf}
    for label, prog in progs.items():
        runners[label] = lambda ids, mask, p=prog: p.generate(
            ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[]
        )
    return runners


def time_rows(runners, prompts, *, repeats: int = 1) -> dict:
    """Every ``runner(ids, mask)`` on every prompt through :func:`effx.bench.interleave` (rows back to back
    per prompt, order rotating, one untimed warm-up call each). A runner returns the generated ids, or
    ``(ids, stats)``. Returns ``{name: (new tokens of row 0 per prompt, seconds over all prompts, stats per
    prompt or None)}``, outputs and stats from the first repeat."""
    warm_ids, warm_mask = prompts[0]
    runs = interleave(runners, prompts, repeats=repeats, warmup=(warm_ids[:, :8], warm_mask[:, :8]))
    rows = {}
    for name, r in runs.items():
        outs = first_outputs(r)
        stats = [o[1] for o in outs] if isinstance(outs[0], tuple) else None
        outs = [o[0] if isinstance(o, tuple) else o for o in outs]
        new = [out[0, ids.shape[1] :] for out, (ids, _) in zip(outs, prompts, strict=True)]
        rows[name] = (new, total_seconds(r), stats)
    return rows


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
