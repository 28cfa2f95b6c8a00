"""Gemma 3 270M (a 262,144-token vocabulary): where a decode step's time goes, and what a vocabulary-reduced
head and the GGUF file's own values do to it, beside HF ``generate``, in one run.

Rows, every one timed in the same run (batch 1, greedy, a fixed number of new tokens, no stop token,
interleaved prompt by prompt by :func:`effx.bench.interleave`):

* HF ``generate`` float32 and effx dense float32;
* ``vocab-reduce{k=... where=head fallback=0.9}``: the head scores the k most frequent tokens of the model's
  own generations (ranked once and cached, as ``effx bench`` does) and falls back to the full head where it
  is unsure, so its tokens are the dense ones where it does not fall back;
* ``quantize{source=gguf}`` (the file's Q5_0/Q4_K/Q6_K/Q8_0 values, exactly) alone and with the reduced head.

Per row: tok/s, ratio to effx dense, tokens equal to dense (leading, of 32, per prompt), and the share of a
decode step spent in each kind of stage (embed, layers, head and the full head's fallback), from a second,
instrumented pass over the first prompt (the stage calls timed one by one).

Gemma 3 270M is a base model (no chat template): the prompts are effx's chat prompts as plain text.

    python benchmarks/gemma3.py                         # 4 prompts x 64 tokens, 2 repeats
    python benchmarks/gemma3.py --prompts 2 --new-tokens 32 --repeats 1
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from common import peer_runners

import effx
from effx.bench import first_outputs, interleave, total_seconds
from effx.bench.configs import vocab_file
from effx.data import PROMPTS, encode_prompts
from effx.passes import Quantize, VocabReduce
from effx.runtime.torch_backend import TorchBackend


def stage_shares(prog, ids, mask, n: int) -> dict[str, float]:
    """The share of a generation's stage time per kind of stage (``layer`` stages summed), from timing each
    stage call of one generation of ``n`` tokens."""
    seconds: dict[str, float] = collections.Counter()
    run = TorchBackend.run

    def timed(self, stage, *inputs):
        start = time.perf_counter()
        out = run(self, stage, *inputs)
        seconds[stage.kind] += time.perf_counter() - start
        return out

    TorchBackend.run = timed
    try:
        prog.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[])
    finally:
        TorchBackend.run = run
    total = sum(seconds.values())
    return {kind: s / total for kind, s in sorted(seconds.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--k", type=int, default=32768, help="rows of the reduced head (default 32768 = V/8)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = effx.models.load("gemma3-270m")
    prompts = [encode_prompts(tok, [p]) for p in PROMPTS[: args.prompts]]
    dense = effx.transform(model, passes=[])
    ranking = vocab_file("gemma3-270m", dense, tok, 16)
    head = VocabReduce(k=args.k, where="head", vocab=ranking, fallback=0.9)
    gguf = Quantize(source="gguf")
    progs = {
        "effx dense": dense,
        "effx reduced head": effx.transform(model, passes=[head]),
        "effx quantize{source=gguf}": effx.transform(model, passes=[gguf]),
        "effx quantize + reduced head": effx.transform(model, passes=[head, gguf]),
    }
    n = args.new_tokens

    runners = peer_runners(model, progs, n)
    runs = interleave(
        runners, prompts, repeats=args.repeats, warmup=(prompts[0][0][:, :8], prompts[0][1][:, :8])
    )
    tokens = n * len(prompts)
    seconds = {name: total_seconds(r) for name, r in runs.items()}
    outs = {name: first_outputs(r) for name, r in runs.items()}
    ids, mask = prompts[0]
    shares = {label: stage_shares(prog, ids, mask, n) for label, prog in progs.items()}

    print(
        f"\nGemma 3 270M, {len(prompts)} prompts x {n} tokens, batch 1, {args.threads} threads, "
        f"median of {args.repeats}; reduced head k={args.k} of {dense.info.vocab_size}"
    )
    print(f"{'row':<30} {'tok/s':>7} {'x dense':>8}  {'stage time shares':<48} lead (of 32)")
    base = tokens / seconds["effx dense"]
    for name in runners:
        tps = tokens / seconds[name]
        leads = []
        for out, ref, (p_ids, _) in zip(outs[name], outs["effx dense"], prompts, strict=True):
            s = p_ids.shape[1]
            a, b = out[0, s : s + 32], ref[0, s : s + 32]
            diff = (a != b).nonzero()
            leads.append(int(diff[0]) if len(diff) else a.numel())
        share = " ".join(f"{k} {v:.0%}" for k, v in shares.get(name, {}).items())
        print(f"{name:<30} {tps:7.1f} {tps / base:8.2f}  {share:<48} " + " ".join(map(str, leads)))
    for label, prog in progs.items():
        print(f"  {label}: resident weights {effx.flops.weight_bytes(prog) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
