"""Exit heads trained on the model's own generations: acceptance per exit layer and rank, training time, and
self-speculative decoding speed with them, against the heads of the first measurements (4,096 pydoc tokens).

1. **States** (:func:`effx.bench.own_states`, cached): SmolLM2's own greedy generations on
   :func:`effx.data.training_prompts` (128 new tokens per prompt) until --tokens tokens, read once
   teacher-forced: the hidden states after the --layers and the final layer's top-32.
2. **Acceptance table**, per layer, on the held-out tenth of the sequences: how often the exit's greedy token
   equals the final layer's (a one-token draft's acceptance rate), for
   * the shared head (no adapter);
   * the pydoc heads (rank 64 on 4,096 tokens of pydoc text, top-k KL over the full vocabulary; the kind
     ``effx bench`` and the first drafting measurements used);
   * own-generation heads at each of --ranks, fitted with top-k KL on the exit's draft vocabulary (the top
     --vocab-k ids of :func:`effx.bench.draft_vocab`; 0 scores the full vocabulary), with their fitting
     time per layer.
3. **Speed**: dense and ``early-exit{layers=L mode=self-speculative draft=--draft thresholds=--threshold}`` at
   each of --speed-layers, with the pydoc heads (full vocabulary, as measured before) and with the
   own-generation heads of --speed-rank plus ``vocab-reduce{where=draft k=--vocab-k}``, decoding greedily at
   batch 1, --new-tokens tokens per prompt (no stop), rows interleaved (:func:`effx.bench.interleave`),
   --repeats repeats, on ``chat`` (``effx.data.PROMPTS``) and ``summ`` (ACLSum test summaries) prompts.
   "acc" is accepted drafts / drafted, "tok/round" tokens per verification step.

    python benchmarks/exit_heads.py
    python benchmarks/exit_heads.py --ranks 64 --speed-layers 15 --sets chat --repeats 1
"""

from __future__ import annotations

import argparse
import time

import torch
from common import drafting_sets, print_draft_rows, stats_of

import effx
from effx.bench import draft_vocab, exit_heads, interleave, own_states
from effx.exit_heads import exit_agreement, fit_exit_heads, save_exit_heads
from effx.models import cache_dir

MODEL = "smollm2-135m"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768, help="own-generation tokens to train on")
    ap.add_argument("--layers", default="6,10,15,20,25", help="exit layers in the acceptance table")
    ap.add_argument("--ranks", default="64,576", help="adapter ranks (576: a full map on SmolLM2)")
    ap.add_argument("--vocab-k", type=int, default=8192, help="draft vocabulary (0: the full one)")
    ap.add_argument("--speed-layers", default="10,15,20", help="self-speculative exits timed")
    ap.add_argument("--speed-rank", type=int, default=576)
    ap.add_argument("--draft", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=0.0, help="stop drafting below this confidence")
    ap.add_argument("--sets", default="chat,summ", help="prompt sets timed: chat, summ")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers, ranks, speed_layers = _ints(args.layers), _ints(args.ranks), _ints(args.speed_layers)
    k = args.vocab_k or None

    model, tok = effx.models.load(MODEL)
    dense = effx.transform(model)
    start = time.perf_counter()
    states = own_states(MODEL, dense, tok, sorted(set(layers) | set(speed_layers)), args.tokens)
    print(
        f"states: {states.tokens} positions ({states.source}), ready in {time.perf_counter() - start:.0f} s"
    )
    vocab = draft_vocab(MODEL, dense, tok, args.tokens, states) if k else None
    pydoc = exit_heads(MODEL, dense, tok, layers, 4096)

    # -- acceptance per layer and rank ---------------------------------------------------------------
    subset = {"vocab": vocab, "vocab_k": k}
    columns = {
        "shared head": exit_agreement(dense, states),
        "pydoc r64": exit_agreement(dense, states, pydoc),
        f"shared head, k={k}": exit_agreement(dense, states, **subset) if k else None,
    }
    fitted = {}
    for rank in ranks:
        result = fit_exit_heads(dense, states, layers=layers, rank=rank, **subset)
        name = f"own r{rank}" + (f" k={k}" if k else "")
        columns[name] = result["agreement_after"]
        columns[f"{name} s"] = result["seconds"]
        path = cache_dir() / "exit_heads" / f"bench-{MODEL}-own{args.tokens}-r{rank}-k{k or 0}.safetensors"
        fitted[rank] = save_exit_heads(dense, result, path, source=states.source)
    columns = {c: v for c, v in columns.items() if v is not None}
    print(f"\nheld-out agreement with the final layer ({states.split(0.1)[1].numel()} positions)")
    print(f"{'layer':>5} " + " ".join(f"{c:>16}" for c in columns))
    for e in layers:
        cells = [f"{v[e]:16.1f}" if c.endswith(" s") else f"{v[e]:16.3f}" for c, v in columns.items()]
        print(f"{e:>5} " + " ".join(cells))

    # -- speed -----------------------------------------------------------------------------------------
    if not speed_layers:
        return
    if args.speed_rank not in fitted:
        raise SystemExit(f"--speed-rank {args.speed_rank} is not one of --ranks {ranks}")
    if not set(speed_layers) <= set(layers):
        raise SystemExit(f"--speed-layers {speed_layers} must be among --layers {layers}")
    n = args.new_tokens
    spec = f"mode=self-speculative draft={args.draft} thresholds={args.threshold} head=trained"
    pipelines = {"dense": ""}
    for e in speed_layers:
        pipelines[f"exit {e}, pydoc r64"] = f"early-exit{{layers={e} {spec} heads={pydoc}}}"
        pipelines[f"exit {e}, own r{args.speed_rank}" + (f" k={k}" if k else "")] = (
            f"early-exit{{layers={e} {spec} heads={fitted[args.speed_rank]}}}"
            + (f", vocab-reduce{{where=draft vocab={vocab} k={k}}}" if k else "")
        )
    runners = {}
    for name, p in pipelines.items():
        prog = effx.transform(model, passes=p or None)
        runners[name] = lambda ids, mask, prog=prog: stats_of(
            lambda st: prog.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[], stats=st)
        )
    for set_name, prompts in drafting_sets(tok, args.sets, args.prompts).items():
        runs = interleave(
            runners, prompts, repeats=args.repeats, warmup=(prompts[0][0][:, :8], prompts[0][1][:, :8])
        )
        print(f"\n{set_name}: {len(prompts)} prompts x {n} tokens, batch 1, {args.repeats} repeats (medians)")
        print_draft_rows(runs, lambda name: "dense", n, width=34)


if __name__ == "__main__":
    main()
