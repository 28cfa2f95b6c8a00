"""Token drop on SmolLM2: time to first token on long prompts, and whether answers survive.

Each prompt is real text (Python's own pydoc help pages) cut to 512 / 1024 / 2048 tokens with one short
fact written into it at a random depth, followed by a question whose answer is that fact. For dense and
for TokenDrop at keep 0.7 / 0.5 / 0.3 (two drop points, by default before layers 4 and 12: half of the
dropped tokens go at the first, the rest at the second), every run is timed in the same process, the
configurations interleaved with :func:`effx.bench.interleave` (all of them back to back on every prompt, the
order rotating from prompt to prompt), and reports time to first token (the prefill, from ``on_token``),
retrieval accuracy (the answer word appears in the first 16 generated tokens) and ROUGE-L of the answer
against the dense answer.

    python benchmarks/token_drop.py                         # 6 questions x 3 lengths
    python benchmarks/token_drop.py --questions 3 --lengths 512,2048

Then all-MiniLM-L6-v2 (``--minilm-texts 0`` skips it): up to 64 held-out pydoc topics (cut to 256 tokens),
encoded dense and with token drop before layer 2 at keep 0.7 / 0.5 / 0.3 (attention received, CLS and SEP
kept): encode time ratio (batch 16; every batch's median of 3, summed; the configurations interleaved batch by
batch) and cosine similarity of the mean-pooled embeddings to the dense ones.
"""

from __future__ import annotations

import argparse
import random
import statistics

import effx
from effx.bench import first_outputs, interleave, total_seconds
from effx.data import encode_prompts, pydoc_texts
from effx.passes import TokenDrop
from effx.quality import rouge_l

# a fact to hide in the text, the question about it, and the word the answer must contain
FACTS = (
    (
        "The maintenance password for the archive server is marigold.",
        "What is the maintenance password for the archive server?",
        "marigold",
    ),
    (
        "The quarterly review meeting takes place in room 714.",
        "In which room does the quarterly review meeting take place?",
        "714",
    ),
    (
        "Our support team's mascot is a purple walrus named Otis.",
        "What is the name of the support team's mascot?",
        "otis",
    ),
    (
        "The backup job always starts at quarter past three in the morning.",
        "At what time does the backup job start?",
        "three",
    ),
    (
        "The project was originally code-named Blue Heron.",
        "What was the project's original code name?",
        "heron",
    ),
    (
        "The lab's coffee machine was made in Portugal.",
        "In which country was the lab's coffee machine made?",
        "portugal",
    ),
)


def build_prompt(tok, filler_ids, length: int, fact: str, question: str, rng: random.Random) -> str:
    """Real text of about ``length`` tokens with ``fact`` at a random depth, then the question."""
    start = rng.randrange(0, len(filler_ids) - length)
    words = tok.decode(filler_ids[start : start + length - 60]).split(" ")
    depth = rng.randrange(len(words) // 10, len(words) * 9 // 10)
    text = " ".join(words[:depth] + [fact] + words[depth:])
    return (
        f"Read the text, then answer the question.\n\n{text}\n\nQuestion: {question} Answer in a few words."
    )


def _generator(prog, new_tokens: int):
    """``runner(ids, mask, on_token=...)`` for :func:`effx.bench.interleave`: greedy, ``new_tokens`` at most."""

    def run(ids, mask, on_token=None):
        return prog.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, on_token=on_token
        )

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="512,1024,2048")
    parser.add_argument("--keeps", default="0.7,0.5,0.3")
    parser.add_argument("--questions", type=int, default=len(FACTS))
    parser.add_argument("--at-layers", default="4,12", help="drop points (the first drops half of the share)")
    parser.add_argument("--score", default="attention", choices=("attention", "norm"))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--queries", type=int, default=8, help="last prompt tokens whose attention scores")
    parser.add_argument(
        "--minilm-texts", type=int, default=64, help="paragraphs for the encoder part (0: skip)"
    )
    args = parser.parse_args()
    if args.minilm_texts:
        minilm(args)

    model, tok = effx.models.load(args.model)
    dense = effx.transform(model)
    at = tuple(int(x) for x in args.at_layers.split(","))
    keeps = [float(x) for x in args.keeps.split(",")]
    configs = [("dense", dense)]
    for k in keeps:
        ratios = tuple(1 - (1 - k) * (j + 1) / len(at) for j in range(len(at)))
        configs.append(
            (
                f"keep {k}",
                effx.transform(
                    model, [TokenDrop(at_layers=at, keep=ratios, score=args.score, queries=args.queries)]
                ),
            )
        )
    filler = tok(" ".join(pydoc_texts("heldout")), add_special_tokens=False).input_ids
    facts = FACTS[: args.questions]

    print(
        f"{len(facts)} retrieval questions per length; drops before layers {at} ({args.score} score)",
        flush=True,
    )
    print(
        f"{'length':>6} {'config':<10} {'TTFT ms':>8} {'ratio':>6} {'accuracy':>8} {'vs dense':>8} {'ROUGE-L':>7}"
    )
    for length in (int(x) for x in args.lengths.split(",")):
        rng = random.Random(length)  # the same prompts for a length whatever else runs
        prompts = [encode_prompts(tok, build_prompt(tok, filler, length, f, q, rng)) for f, q, _ in facts]
        runs = interleave(
            {name: _generator(prog, args.new_tokens) for name, prog in configs},
            prompts,
            on_token=True,
            desc=f"length {length}",
        )
        results = {}
        for name, _ in configs:
            texts = [
                tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                for out, (ids, _) in zip(first_outputs(runs[name]), prompts, strict=True)
            ]
            results[name] = (
                [per_prompt[0].first_token_s for per_prompt in runs[name]],
                [answer in text.lower() for text, (_, _, answer) in zip(texts, facts, strict=True)],
                texts,
            )
        dense_ttft = statistics.median(results["dense"][0])
        dense_acc = statistics.mean(results["dense"][1])
        for name, _ in configs:
            ttfts, hits, texts = results[name]
            acc = statistics.mean(hits)
            rel = acc / dense_acc if dense_acc else float("nan")
            t = statistics.median(ttfts)
            rouge = rouge_l(texts, results["dense"][2])
            print(
                f"{length:>6} {name:<10} {t * 1e3:8.0f} {dense_ttft / t:6.2f} {acc:8.2f} {rel:8.2f} {rouge:7.3f}",
                flush=True,
            )


def minilm(args) -> None:
    import torch

    model, tok = effx.models.load_encoder("all-minilm-l6-v2")
    texts = [t for t in pydoc_texts("heldout") if len(t) > 400][: args.minilm_texts]
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    dense = effx.transform_encoder(model)
    configs = [("dense", dense)] + [
        (
            f"keep {k}",
            effx.transform_encoder(
                model, [TokenDrop(at_layers=(2,), keep=(k,), special=(tok.sep_token_id,))]
            ),
        )
        for k in (0.7, 0.5, 0.3)
    ]

    batches = [(enc.input_ids[i : i + 16], enc.attention_mask[i : i + 16]) for i in range(0, len(texts), 16)]
    runs = interleave(
        {name: prog.encode for name, prog in configs}, batches, repeats=3, desc="all-MiniLM-L6-v2"
    )
    ref, dense_t = torch.cat(first_outputs(runs["dense"])), total_seconds(runs["dense"])
    print(
        f"\nall-MiniLM-L6-v2: {len(texts)} pydoc paragraphs, {int(enc.attention_mask.sum())} tokens, batch 16"
    )
    print(f"{'config':<10} {'encode ms':>9} {'ratio':>6} {'cosine mean':>11} {'cosine min':>10}")
    for name, _ in configs:
        emb, t = torch.cat(first_outputs(runs[name])), total_seconds(runs[name])
        cos = (emb * ref).sum(-1)
        print(
            f"{name:<10} {t * 1e3:9.0f} {dense_t / t:6.2f} {float(cos.mean()):11.4f} {float(cos.min()):10.4f}",
            flush=True,
        )
    print()


if __name__ == "__main__":
    main()
