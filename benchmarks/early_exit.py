"""Early exit on SmolLM2: speed against dense and quality, every row timed in the same run.

Rows, timed interleaved prompt by prompt (``effx.bench.interleave``): HF ``model.generate`` (dense), effx
dense, HF's ``assistant_early_exit`` (LayerSkip-style self-speculation, same exit layer), effx
self-speculative with the shared head and with a trained exit head, and effx lossy early exit at thresholds calibrated for agreement targets 0.99 / 0.95 / 0.90. Lossy rows also
show ROUGE-L of the output against the dense output, teacher-forced agreement with the full model on held-out
text, and the mean number of layers per generated token.

Exit heads are trained once (pydoc calibration text) and cached under the effx cache directory.

    python benchmarks/early_exit.py                         # 3 prompts, 128 new tokens
    python benchmarks/early_exit.py --prompts 2 --new-tokens 64
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import exit_heads, generator, same, time_rows

import effx
from effx.data import PROMPTS, encode_prompts, pydoc_texts
from effx.passes import EarlyExit
from effx.quality import rouge_l


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--spec-layer", type=int, default=20, help="exit layer that drafts (self-speculative)"
    )
    parser.add_argument("--draft", type=int, default=4)
    parser.add_argument("--lossy-layers", default="10,15,20,25", help="exit layers for lossy early exit")
    parser.add_argument("--train-tokens", type=int, default=4096)
    args = parser.parse_args()

    model, tok = effx.models.load(args.model)
    model.generation_config.eos_token_id = None  # every row decodes exactly --new-tokens
    dense = effx.transform(model)
    lossy_layers = [int(x) for x in args.lossy_layers.split(",")]
    exit_layers = sorted(set(lossy_layers + [args.spec_layer]))
    heads = exit_heads(args.model, dense, tok, exit_layers, args.train_tokens)
    # the chat template puts <|im_end|> (also the pad id) inside prompts: always pass the attention mask
    prompts = [encode_prompts(tok, p) for p in PROMPTS[: args.prompts]]
    n_new = args.new_tokens

    def gen(prog):
        return generator(prog, n_new)

    def hf(**kwargs):
        def fn(ids, mask):
            with torch.inference_mode():
                return model.generate(
                    ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False, **kwargs
                )

        return fn

    assist = f"HF assistant_early_exit={args.spec_layer + 1}"
    runners = {
        "HF generate (dense)": hf(),
        "effx dense": gen(dense),
        assist: hf(assistant_early_exit=args.spec_layer + 1),
    }
    for head in ("shared", "trained"):
        kw = dict(head=head, heads=str(heads)) if head == "trained" else {}
        prog = effx.transform(
            model,
            passes=[
                EarlyExit(
                    layers=(args.spec_layer,),
                    mode="self-speculative",
                    draft=args.draft,
                    thresholds=(0.3,),
                    **kw,
                )
            ],
        )
        runners[f"effx self-speculative ({head} head, exit {args.spec_layer})"] = gen(prog)
    exits = effx.transform(
        model, passes=[EarlyExit(layers=tuple(lossy_layers), head="trained", heads=str(heads))]
    )
    lossy = {}
    for target in (0.99, 0.95, 0.90):
        prog, _ = exits.calibrate(pydoc_texts("calib"), tok, target=target)
        lossy[f"effx lossy, calibrated {target}"] = prog
        runners[f"effx lossy, calibrated {target}"] = gen(prog)

    timing = time_rows(runners, prompts)  # every row interleaved with the others, prompt by prompt
    ref_out, dense_t, _ = timing["effx dense"]
    hf_out = timing["HF generate (dense)"][0]
    dense_text = [tok.decode(o, skip_special_tokens=True) for o in ref_out]
    heldout = pydoc_texts("heldout")
    from effx.calibrate import agreement

    rows = []
    for name, (out, t, stats) in timing.items():
        note = None
        if name == "effx dense":
            identical = same(ref_out, hf_out)
        else:
            identical = same(out, ref_out)
        if "self-speculative" in name:
            drafted = sum(st["drafted"] for st in stats)
            note = f"draft acceptance {sum(st['accepted'] for st in stats) / max(1, drafted):.2f}"
        elif name in lossy:
            text = [tok.decode(o, skip_special_tokens=True) for o in out]
            agree, _ = agreement(lossy[name], heldout, tok, max_tokens=2048)
            depth = statistics.mean(d[0] for st in stats for d in st["exit_layers"])
            note = (
                f"ROUGE-L {rouge_l(text, dense_text):.3f}, teacher-forced agreement {agree:.3f}, "
                f"mean layers {depth:.1f}/{dense.info.num_layers}"
            )
        rows.append((name, t, identical, note))

    tokens = n_new * len(prompts)
    print(f"\n{len(prompts)} prompts x {n_new} new tokens, greedy; ratio = effx dense time / row time")
    print(f"{'row':<52} {'tok/s':>7} {'ratio':>6}  identical  quality")
    for name, t, identical, extra in rows:
        print(f"{name:<52} {tokens / t:7.2f} {dense_t / t:6.2f}  {str(identical):<9}  {extra or ''}")


if __name__ == "__main__":
    main()
