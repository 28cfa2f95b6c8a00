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
    "drafting_sets",
    "exit_heads",
    "generator",
    "median_ms",
    "neuron_profile",
    "print_draft_rows",
    "print_draft_sets",
    "same",
    "stats_of",
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


def stats_of(fn):
    """``(fn(stats), stats)`` with a fresh stats dict: a runner that also returns what the loop counted."""
    stats: dict = {}
    return fn(stats), stats


def drafting_sets(tok, names: str, prompts: int, doc_tokens: int = 512) -> dict:
    """The drafting benchmarks' prompt sets by name: ``summ`` (ACLSum test summaries of ``doc_tokens`` paper
    tokens) and ``chat`` (``effx.data.PROMPTS``), ``prompts`` each, as ``(ids, mask)`` pairs."""
    from cascade import summary_prompts

    from effx.data import PROMPTS, aclsum, encode_prompts

    sets = {}
    for name in names.split(","):
        if name == "summ":
            sets[name] = summary_prompts(tok, aclsum("test", n=prompts), doc_tokens)
        elif name == "chat":
            sets[name] = [encode_prompts(tok, p) for p in PROMPTS[:prompts]]
        else:
            raise SystemExit(f"unknown prompt set {name!r}: choose summ, chat")
    return sets


def print_draft_rows(runs: dict, base_of, new_tokens: int, width: int = 44) -> None:
    """One line per row of :func:`effx.bench.interleave`'s ``runs`` (runners returning ``(ids, stats)``):
    tok/s, speed-up over the row ``base_of(name)`` names, whether the first repeat's tokens equal that row's,
    accepted drafts / drafted and tokens per verification round."""
    print(f"{'row':{width}} {'tok/s':>7} {'x dense':>8} {'same':>5} {'acc':>6} {'tok/round':>9}")
    for name, r in runs.items():
        base = runs[base_of(name)]
        outs, refs = first_outputs(r), first_outputs(base)
        same = all(torch.equal(a[0], b[0]) for a, b in zip(outs, refs, strict=True))
        drafted = sum(o[1].get("drafted", 0) for o in outs)
        accepted = sum(o[1].get("accepted", 0) for o in outs)
        rounds = sum(o[1].get("steps", 0) for o in outs)
        seconds = total_seconds(r)
        acc = f"{accepted / drafted:6.2f}" if drafted else f"{'-':>6}"
        per_round = f"{(new_tokens - 1) * len(outs) / rounds:9.2f}" if rounds else f"{'-':>9}"
        print(
            f"{name:{width}} {new_tokens * len(outs) / seconds:7.1f} {total_seconds(base) / seconds:8.2f} "
            f"{str(same):>5} {acc} {per_round}"
        )


def print_draft_sets(runners: dict, sets: dict, repeats: int, new_tokens: int) -> None:
    """Each prompt set of :func:`drafting_sets` timed over ``runners`` with :func:`effx.bench.interleave`,
    and its rows printed against the dense row of their own kind (the row named by the first word of
    theirs, then ``dense``)."""
    for set_name, prompts in sets.items():
        runs = interleave(
            runners, prompts, repeats=repeats, warmup=(prompts[0][0][:, :8], prompts[0][1][:, :8])
        )
        print(f"\n{set_name}: {len(prompts)} prompts")
        print_draft_rows(runs, lambda name: f"{name.split()[0]} dense", new_tokens)
