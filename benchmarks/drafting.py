"""Lossless drafting on SmolLM2: prompt lookup and self-speculative exits, on torch and ONNX, in one run.

Two prompt sets, each decoded greedily at batch 1 for --new-tokens tokens (no stop at end-of-turn, so every
row does the same work):

* ``summ``: ACLSum test papers (title, abstract, introduction cut to --doc-tokens tokens), "summarize in
  three sentences" as a chat turn: a grounded task, where the answer reuses the prompt's words;
* ``chat``: the first --prompts of ``effx.data.PROMPTS``, open chat prompts where lookup has little to find.

Rows, each against the dense Program of its own backend, timed in the same run with
:func:`effx.bench.interleave` (per prompt all rows back to back, the order rotating, --repeats repeats,
each prompt's median):

* ``dense``: the Program, no drafting (the baseline of every ratio);
* ``prompt-lookup``: ``prompt-lookup`` at its defaults (--lookup to change them);
* ``self-speculative``: ``early-exit{layers=--exit-layer mode=self-speculative}`` drafting --draft tokens
  (stopping below --threshold confidence), with exit heads trained on --heads: ``own`` (default), 32,768
  tokens of the model's own generations, rank --rank, scoring a --vocab-k draft vocabulary
  (``vocab-reduce{where=draft}``; see ``benchmarks/exit_heads.py``), or ``pydoc``, rank-64 heads on
  4,096 pydoc tokens as in the first measurements (full vocabulary); cached;
* ``self-speculative + prompt-lookup``: both sources, lookup first;
* the same on ONNX artifacts (exported to a temporary directory) unless --no-onnx.

Every row must give the dense tokens ("same"); "acc" is accepted drafts / drafted, "tok/round" the tokens a
verification round emits on average.

    python benchmarks/drafting.py                       # both sets, 4 prompts x 128 tokens, torch + ONNX
    python benchmarks/drafting.py --sets summ --no-onnx --repeats 3
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import drafting_sets, exit_heads, print_draft_sets, stats_of

import effx
from effx.bench import draft_vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="summ,chat", help="prompt sets: summ (ACLSum summaries), chat")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per set")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--doc-tokens", type=int, default=512, help="paper tokens in a summary prompt")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lookup", default="prompt-lookup", help="the prompt-lookup step (pipeline string)")
    ap.add_argument("--exit-layer", type=int, default=20, help="the self-speculative exit")
    ap.add_argument("--draft", type=int, default=4, help="self-speculative draft length")
    ap.add_argument("--threshold", type=float, default=0.0, help="self-speculative: stop drafting below it")
    ap.add_argument("--heads", choices=("own", "pydoc"), default="own", help="exit heads trained on")
    ap.add_argument("--rank", type=int, default=576, help="own heads: adapter rank")
    ap.add_argument("--vocab-k", type=int, default=8192, help="own heads: draft vocabulary (0: full)")
    ap.add_argument("--no-onnx", action="store_true", help="leave the ONNX artifact rows out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.new_tokens

    model, tok = effx.models.load("smollm2-135m")
    dense = effx.transform(model)
    spec = (
        f"early-exit{{layers={args.exit_layer} mode=self-speculative draft={args.draft} "
        f"thresholds={args.threshold} head=trained heads=HEADS}}"
    )
    if args.heads == "pydoc":
        spec = spec.replace("HEADS", str(exit_heads("smollm2-135m", dense, tok, [args.exit_layer], 4096)))
    else:
        k = args.vocab_k or None
        tokens = 32768
        heads = exit_heads(
            "smollm2-135m", dense, tok, [args.exit_layer], tokens, source="own", rank=args.rank, vocab_k=k
        )
        spec = spec.replace("HEADS", str(heads))
        if k:
            spec += (
                f", vocab-reduce{{where=draft vocab={draft_vocab('smollm2-135m', dense, tok, tokens)} k={k}}}"
            )
    pipelines = {
        "dense": "",
        "prompt-lookup": args.lookup,
        "self-speculative": spec,
        "self-speculative + prompt-lookup": f"{spec}, {args.lookup}",
    }
    progs = {name: effx.transform(model, passes=p or None) for name, p in pipelines.items()}
    runners = {}
    for name, prog in progs.items():
        runners[f"torch {name}"] = lambda ids, mask, p=prog: stats_of(
            lambda st: p.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[], stats=st)
        )
    tmp = tempfile.TemporaryDirectory(prefix="effx-drafting-")
    if not args.no_onnx:
        from effx.exporters.onnx import export
        from effx.runtime.onnx import load

        for name in ("dense", "prompt-lookup", "self-speculative"):
            gen = load(export(progs[name], Path(tmp.name) / name.replace(" ", "_")))
            runners[f"onnx {name}"] = lambda ids, mask, g=gen: stats_of(
                lambda st: torch.from_numpy(
                    g.generate(ids.numpy(), mask.numpy(), max_new_tokens=n, eos_token_id=[], stats=st)
                )
            )

    sets = drafting_sets(tok, args.sets, args.prompts, args.doc_tokens)
    print(f"SmolLM2-135M, batch 1, {n} new tokens, {args.threads} threads, {args.repeats} repeats (medians)")
    print_draft_sets(runners, sets, args.repeats, n)


if __name__ == "__main__":
    main()
