"""Prompt lookup paced by the verify step's width cost, against unpaced lookup and dense, in float32 and on
SmolLM2's own 4-bit weights (``quantize{source=gguf}``), in one run.

Rows per weight format, each against that format's dense Program (interleaved per prompt with
:func:`effx.bench.interleave`, --repeats repeats, medians; batch 1, greedy, --new-tokens forced tokens):

* ``dense``;
* ``prompt-lookup``: drafts paced per row (``effx.runtime.pacing``: as far as the row's recent acceptance
  pays for the wider verify step, whose cost per position ``width_cost`` models from the plan's weights:
  0.05 of a step in float32, 0.2 on 4-bit weights);
* ``prompt-lookup unpaced``: the rule before pacing, up to ``draft`` tokens whenever the n-gram matches.

Prompt sets as ``benchmarks/drafting.py``'s: ``chat`` (open chat) and ``summ`` (ACLSum summaries).
Every row must give the dense tokens ("same").

    python benchmarks/lookup_pacing.py
    python benchmarks/lookup_pacing.py --sets chat --formats 4bit --repeats 3
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch
from common import drafting_sets, print_draft_sets, stats_of

import effx
from effx.kernels import describe
from effx.techniques.prompt_lookup import LookupDraft

FORMATS = {"float": "", "4bit": "quantize{source=gguf}"}


@contextmanager
def unpaced():
    """Lookup as it drafted before pacing: a source without a cost drafts up to ``draft`` every round."""
    cost = LookupDraft.cost
    LookupDraft.cost = None
    try:
        yield
    finally:
        LookupDraft.cost = cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="chat,summ", help="prompt sets: chat, summ (ACLSum summaries)")
    ap.add_argument("--formats", default="float,4bit", help="weights: float, 4bit (quantize{source=gguf})")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per set")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.new_tokens
    model, tok = effx.models.load("smollm2-135m")
    runners = {}
    for fmt in args.formats.split(","):
        base = FORMATS[fmt]
        dense = effx.transform(model, passes=base or None)
        lookup = effx.transform(model, passes=f"{base}, prompt-lookup" if base else "prompt-lookup")

        def run(prog, ids, mask, paced=True):
            def generate(st):
                return prog.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[], stats=st)

            if paced:
                return stats_of(generate)
            with unpaced():
                return stats_of(generate)

        runners[f"{fmt} dense"] = lambda ids, mask, p=dense: run(p, ids, mask)
        runners[f"{fmt} prompt-lookup"] = lambda ids, mask, p=lookup: run(p, ids, mask)
        runners[f"{fmt} prompt-lookup unpaced"] = lambda ids, mask, p=lookup: run(p, ids, mask, paced=False)
    sets = drafting_sets(tok, args.sets, args.prompts)
    print(f"SmolLM2-135M, batch 1, {n} new tokens, {args.threads} threads, {args.repeats} repeats (medians)")
    print(describe())
    print_draft_sets(runners, sets, args.repeats, n)


if __name__ == "__main__":
    main()
