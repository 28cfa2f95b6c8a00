"""Vocabulary-reduced heads on SmolLM2: head cost, and what they do to early exit and drafting end to end.

Part 1, head time and FLOPs per token (batch 1): the full LM head against heads that score k rows, as a
static subset (``where="head"``/``"draft"``) and as a pruned exit head (``where="exits"``: rows gathered per
token).

Part 2, generation, every row timed in the same run against effx dense, interleaved prompt by prompt
(``effx.bench.interleave``):
* lossy early exit (trained exit heads after layers 10, 15, 20, 25) with full exit heads, and with pruned
  exit heads (k=2048: fixed, decaying, adaptive), each calibrated to the same agreement target; quality is
  ROUGE-L against the dense output and teacher-forced agreement on held-out text;
* self-speculative decoding (trained exit head after layer 20) with its full head and with a reduced draft
  head: tokens must be identical to dense;
* dense decoding with a reduced head (k=8192) that falls back to the full head when unsure (fallback
  thresholds 0.9 and 0.5).

The draft/head vocabulary is ranked from the model's own generations on pydoc-based prompts plus pydoc text,
and cached with the exit heads under the effx cache directory.

    python benchmarks/vocab.py                          # 3 prompts, 128 new tokens
    python benchmarks/vocab.py --prompts 2 --new-tokens 64
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import exit_heads, generator, median_ms, same, time_rows, token_match, vocab_file

import effx
from effx.calibrate import agreement
from effx.data import PROMPTS, encode_prompts, pydoc_texts
from effx.flops import count_graph_flops, stage_inputs
from effx.passes import EarlyExit, VocabReduce
from effx.program import torch_dtype
from effx.quality import rouge_l


def head_table(dense, vocab: str) -> None:
    info = dense.info
    hidden = torch.randn(1, 1, info.hidden_size, dtype=torch_dtype(info))
    ee = EarlyExit(layers=(10, 20)).apply(dense).program
    print(f"\nhead per token, batch 1 (V={info.vocab_size}, d={info.hidden_size})")
    print(f"{'head':<28} {'ms':>7} {'MFLOPs':>8} {'time ratio':>10}")
    full_ms = median_ms(dense.head.graph, hidden)
    full_fl = sum(
        count_graph_flops(dense.head.graph, stage_inputs(dense, "head", batch=1, seq=1, past=0)).values()
    )
    print(f"{'full':<28} {full_ms:7.2f} {full_fl / 1e6:8.1f} {1.0:10.2f}")
    for k in (512, 2048, 8192):
        head = VocabReduce(k=k, where="head", vocab=vocab, fallback=0).apply(dense).program.head
        ms = median_ms(head.graph, hidden)
        fl = sum(count_graph_flops(head.graph, stage_inputs(dense, head, batch=1, seq=1, past=0)).values())
        print(f"{f'static subset k={k}':<28} {ms:7.2f} {fl / 1e6:8.1f} {full_ms / ms:10.2f}")
        pruned = VocabReduce(k=k).apply(ee).program.exits[20]
        ids = torch.randperm(info.vocab_size)[:k][None]
        ms = median_ms(pruned.graph, hidden, hidden, ids)
        fl = sum(
            count_graph_flops(pruned.graph, stage_inputs(dense, pruned, batch=1, seq=1, past=0)).values()
        )
        print(f"{f'pruned exit head k={k}':<28} {ms:7.2f} {fl / 1e6:8.1f} {full_ms / ms:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--target", type=float, default=0.95, help="agreement target of the lossy rows")
    parser.add_argument("--k", type=int, default=2048, help="k of the pruned exit heads and the draft head")
    parser.add_argument("--head-k", type=int, default=8192, help="k of the reduced decoding head")
    parser.add_argument("--train-tokens", type=int, default=4096)
    parser.add_argument("--vocab-prompts", type=int, default=16, help="generations that rank the vocabulary")
    args = parser.parse_args()

    model, tok = effx.models.load(args.model)
    dense = effx.transform(model)
    lossy_layers = (10, 15, 20, 25)
    heads = str(exit_heads(args.model, dense, tok, lossy_layers, args.train_tokens))
    vocab = vocab_file(args.model, dense, tok, args.vocab_prompts)
    head_table(dense, vocab)

    prompts = [encode_prompts(tok, p) for p in PROMPTS[: args.prompts]]
    n_new = args.new_tokens

    def gen(prog):
        return generator(prog, n_new)

    runners = {"effx dense": gen(dense)}
    lossy = {}
    for label, extra in [("full exit heads", [])] + [
        (f"pruned k={args.k} {s}", [VocabReduce(k=args.k, schedule=s)])
        for s in ("fixed", "decaying", "adaptive")
    ]:
        prog = effx.transform(model, [EarlyExit(layers=lossy_layers, head="trained", heads=heads), *extra])
        prog, _ = prog.calibrate(pydoc_texts("calib"), tok, target=args.target)
        name = f"lossy early exit, {label} ({args.target})"
        lossy[name] = prog
        runners[name] = gen(prog)
    for label, extra in (
        ("full draft head", []),
        (f"draft k={args.k}", [VocabReduce(k=args.k, where="draft", vocab=vocab)]),
    ):
        passes = [
            EarlyExit(layers=(20,), mode="self-speculative", thresholds=(0.3,), head="trained", heads=heads),
            *extra,
        ]
        runners[f"self-speculative, {label}"] = gen(effx.transform(model, passes))
    for fallback in (0.9, 0.5):
        prog = effx.transform(
            model, [VocabReduce(k=args.head_k, where="head", vocab=vocab, fallback=fallback)]
        )
        runners[f"reduced head k={args.head_k}, fallback {fallback}"] = gen(prog)

    timing = time_rows(runners, prompts)  # every row interleaved with the others, prompt by prompt
    ref, dense_t, _ = timing["effx dense"]
    dense_text = [tok.decode(o, skip_special_tokens=True) for o in ref]
    heldout = pydoc_texts("heldout")
    full_exits_t = timing[next(iter(lossy))][1]
    rows = []
    for name, (out, t, stats) in timing.items():
        text = [tok.decode(o, skip_special_tokens=True) for o in out]
        if name == "effx dense":
            rows.append((name, t, "identical", ""))
        elif name in lossy:
            agree, _ = agreement(lossy[name], heldout, tok, max_tokens=2048)
            depth = statistics.mean(d[0] for st in stats for d in st["exit_layers"])
            quality = (
                f"ROUGE-L {rouge_l(text, dense_text):.3f}, agreement {agree:.3f}, mean layers {depth:.1f}, "
                f"{full_exits_t / t:.2f}x the full-head exits"
            )
            rows.append((name, t, f"{token_match(out, ref):.2f}", quality))
        elif name.startswith("self-speculative"):
            acc = sum(s["accepted"] for s in stats) / max(1, sum(s["drafted"] for s in stats))
            rows.append((name, t, str(same(out, ref)), f"draft acceptance {acc:.2f}"))
        else:
            rate = sum(s["head_fallbacks"] for s in stats) / max(1, sum(s["head_positions"] for s in stats))
            quality = f"ROUGE-L {rouge_l(text, dense_text):.3f}, full head used for {rate:.0%} of positions"
            rows.append((name, t, f"{token_match(out, ref):.2f}", quality))

    tokens = n_new * len(prompts)
    print(f"\n{len(prompts)} prompts x {n_new} new tokens, greedy; ratio = effx dense time / row time")
    print(f"{'row':<48} {'tok/s':>7} {'ratio':>6}  same tokens  quality")
    for name, t, identical, extra in rows:
        print(f"{name:<48} {tokens / t:7.2f} {dense_t / t:6.2f}  {identical:<11}  {extra}")


if __name__ == "__main__":
    main()
