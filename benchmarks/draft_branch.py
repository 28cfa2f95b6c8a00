"""Draft branches (EAGLE-style) on SmolLM2: the branch alone and with prompt lookup, against dense and lookup,
in one run.

The branch is trained once on --tokens tokens of the model's own generations (``effx.bench.draft_branch``,
cached under effx's cache directory; its held-out acceptance per draft position is printed). Two prompt
sets (``benchmarks/drafting.py``'s): ``chat`` (``effx.data.PROMPTS``, open chat) and ``summ`` (ACLSum test
summaries, grounded). Rows, each against the dense Program in the same run, interleaved per prompt
(:func:`effx.bench.interleave`, --repeats repeats, medians), batch 1, greedy, --new-tokens forced tokens:

* ``dense``; ``prompt-lookup`` (defaults); ``draft-branch`` (``draft=--draft``); ``draft-branch +
  prompt-lookup`` (lookup first, the branch where nothing matches).

Every row must give the dense tokens ("same"); "acc" is accepted drafts / drafted, "tok/round" the tokens
a verification step emits on average.

With ``--temperature T`` every row samples (seeded; speculation keeps the dense sampling distribution,
tests/test_speculative_sampling.py), so "same" does not apply; the speed-up is the point.

    python benchmarks/draft_branch.py                          # chat and summ, 4 prompts x 128 tokens
    python benchmarks/draft_branch.py --sets chat --draft 3 --repeats 3
    python benchmarks/draft_branch.py --quantize --temperature 0.7
"""

from __future__ import annotations

import argparse

import torch
from common import drafting_sets, print_draft_rows, stats_of

import effx
from effx.bench import draft_branch, interleave
from effx.kernels import describe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="chat,summ", help="prompt sets: chat, summ (ACLSum summaries)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per set")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--doc-tokens", type=int, default=512, help="paper tokens in a summary prompt")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft", type=int, default=4, help="the branch's draft length")
    ap.add_argument("--threshold", type=float, default=0.0, help="stop drafting below this probability")
    ap.add_argument("--tokens", type=int, default=16384, help="training tokens of the model's own text")
    ap.add_argument("--weights", default=None, help="a branch file to use instead of the cached one")
    ap.add_argument("--quantize", action="store_true", help="every row on top of quantize{source=gguf}")
    ap.add_argument("--bits", type=int, default=8, help="the branch's weights: 8 (int8), 16 (bf16), 32")
    ap.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (0: greedy)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.new_tokens

    model, tok = effx.models.load("smollm2-135m")
    dense = effx.transform(model)
    if args.weights:
        weights = args.weights
    else:
        path, report = draft_branch("smollm2-135m", dense, tok, args.tokens)
        weights = str(path)
        print(
            f"branch: {report['tokens']} training tokens, held-out acceptance per draft position "
            + " ".join(f"{a:.2f}" for a in report["after"])
        )
    branch = (
        f"draft-branch{{weights={weights} draft={args.draft} threshold={args.threshold} bits={args.bits}}}"
    )
    base = "quantize{source=gguf}" if args.quantize else ""
    pipelines = {
        "dense": "",
        "prompt-lookup": "prompt-lookup",
        "draft-branch": branch,
        "draft-branch + prompt-lookup": f"{branch}, prompt-lookup",
    }
    sampling = {"do_sample": True, "temperature": args.temperature, "seed": 0} if args.temperature else {}
    runners = {}
    for name, p in pipelines.items():
        spec = ", ".join(x for x in (base, p) if x) or None
        prog = effx.transform(model, passes=spec)
        runners[f"torch {name}"] = lambda ids, mask, p=prog: stats_of(
            lambda st: p.generate(
                ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[], stats=st, **sampling
            )
        )
    sets = drafting_sets(tok, args.sets, args.prompts, args.doc_tokens)
    print(
        f"SmolLM2-135M{' gguf' if args.quantize else ''}, batch 1, {n} new tokens, "
        f"{f'sampled at T={args.temperature}' if args.temperature else 'greedy'}, {args.threads} threads, "
        f"{args.repeats} repeats (medians); {describe()}"
    )
    for set_name, prompts in sets.items():
        runs = interleave(
            runners, prompts, repeats=args.repeats, warmup=(prompts[0][0][:, :8], prompts[0][1][:, :8])
        )
        print(f"\n{set_name}: {len(prompts)} prompts")
        print_draft_rows(runs, lambda name: "torch dense", n)


if __name__ == "__main__":
    main()
