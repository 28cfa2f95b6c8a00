"""Neuron-masked FFNs on SmolLM2: decode speed, time to first token, weights, FLOPs and quality, one run.

The task is Python documentation: the neuron profile is built on pydoc calibration text (two of every three
help topics), perplexity is measured on the held-out topics (never profiled), and generation on the chat
prompt suite (ROUGE-L against the dense output). Rows, each timed in the same run as effx dense and
interleaved with it prompt by prompt (``effx.bench.interleave``):

* static masks (sliced weights) in layers 3..27 at keep 0.3 / 0.5 / 0.7 / 0.9, and a random mask of the
  same size at keep 0.5 (a task profile must beat it on the task's held-out text);
* per-prompt core neurons (CoreInfer) in the same layers and keeps;
* per-token gate thresholds (CATS) at sparsity 0.7 / 0.5 / 0.3 / 0.1 (keep = 1 - sparsity): dense matmuls,
  so no speed-up is expected on CPU; the rows show the quality effect.

    python benchmarks/neuron_mask.py                       # 3 prompts x 64 new tokens
    python benchmarks/neuron_mask.py --prompts 2 --new-tokens 32 --keeps 0.5
"""

from __future__ import annotations

import argparse

from common import neuron_profile, time_rows, token_match

import effx
from effx.bench import interleave, total_seconds
from effx.data import PROMPTS, encode_prompts, pydoc_texts
from effx.flops import decode_flops, weight_bytes
from effx.passes import NeuronMask
from effx.quality import perplexity, rouge_l


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--keeps", default="0.3,0.5,0.7,0.9")
    parser.add_argument("--layers", default="3,27", help="first and last masked layer")
    parser.add_argument("--profile-tokens", type=int, default=16384)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--ttft-length", type=int, default=512)
    args = parser.parse_args()

    model, tok = effx.models.load(args.model)
    dense = effx.transform(model)
    profile = neuron_profile(args.model, dense, tok, args.profile_tokens)
    layers = tuple(int(x) for x in args.layers.split(","))
    keeps = [float(x) for x in args.keeps.split(",")]

    prompts = [encode_prompts(tok, p) for p in PROMPTS[: args.prompts]]
    n_new = args.new_tokens
    heldout = pydoc_texts("heldout")
    long_ids = tok(" ".join(heldout), return_tensors="pt").input_ids[:, : args.ttft_length]

    def gen(prog):
        return lambda ids, mask: prog.generate(
            ids, attention_mask=mask, max_new_tokens=n_new, eos_token_id=[]
        )

    configs = [(f"static keep={k}", NeuronMask(keep=k, profile=str(profile), layers=layers)) for k in keeps]
    configs.append(("random static keep=0.5", NeuronMask(keep=0.5, score="random", layers=layers)))
    configs += [(f"core keep={k}", NeuronMask(mode="core", keep=k, layers=layers)) for k in keeps]
    configs += [
        (
            f"threshold sparsity={1 - k:.1f}",
            NeuronMask(mode="threshold", sparsity=round(1 - k, 2), profile=str(profile), layers=layers),
        )
        for k in keeps
    ]
    programs = {"dense": dense} | {label: effx.transform(model, [mask]) for label, mask in configs}
    masks = dict(configs)
    # decode, then time to first token on the long prompt (max_new_tokens=1): each interleaved over every
    # program, prompt by prompt
    timing = time_rows({label: gen(prog) for label, prog in programs.items()}, prompts)
    first = interleave(
        {
            label: lambda ids, prog=prog: prog.generate(ids, max_new_tokens=1, eos_token_id=[])
            for label, prog in programs.items()
        },
        [(long_ids,)],
        warmup=(long_ids[:, :32],),
        desc="TTFT",
    )
    ref, dense_t, _ = timing["dense"]
    dense_text = [tok.decode(o, skip_special_tokens=True) for o in ref]
    dense_ppl = perplexity(dense, heldout, tok, max_tokens=args.ppl_tokens)
    rows = []
    for label, prog in programs.items():
        out, t, _ = timing[label]
        text = [tok.decode(o, skip_special_tokens=True) for o in out]
        flops = decode_flops(prog)
        mask = masks.get(label)
        if mask is not None and mask.mode == "core":
            # decode runs the sliced MLP; the graphs hold the full one for the prefill
            k = round(mask.keep * dense.info.intermediate_size)
            per_layer_mlp = 3 * 2 * dense.info.hidden_size * dense.info.intermediate_size
            flops -= (layers[1] - layers[0] + 1) * per_layer_mlp * (1 - k / dense.info.intermediate_size)
        rows.append(
            (
                label,
                t,
                total_seconds(first[label]),
                weight_bytes(prog),
                flops,
                dense_ppl if prog is dense else perplexity(prog, heldout, tok, max_tokens=args.ppl_tokens),
                rouge_l(text, dense_text),
                token_match(out, ref),
            )
        )

    tokens = n_new * len(prompts)
    print(
        f"\n{len(prompts)} prompts x {n_new} new tokens, greedy, layers {layers[0]}..{layers[1]}; "
        f"TTFT at {long_ids.shape[1]} tokens; perplexity on {args.ppl_tokens} held-out pydoc tokens"
    )
    print(
        f"{'row':<26} {'tok/s':>7} {'ratio':>6} {'TTFT ms':>8} {'weights MB':>10} {'MFLOPs/tok':>10} {'ppl':>7} {'ppl/dense':>9} {'ROUGE-L':>7} {'same':>5}"
    )
    for label, t, first, nbytes, flops, ppl, rouge, same in rows:
        print(
            f"{label:<26} {tokens / t:7.2f} {dense_t / t:6.2f} {first * 1e3:8.0f} {nbytes / 1e6:10.1f} "
            f"{flops / 1e6:10.1f} {ppl:7.2f} {ppl / dense_ppl:9.3f} {rouge:7.3f} {same:5.2f}"
        )


if __name__ == "__main__":
    main()
