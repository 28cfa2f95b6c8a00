"""Early exit on SmolLM2: speed against dense and quality, every row timed in the same run.

Rows: HF ``model.generate`` (dense), effx dense, HF's ``assistant_early_exit`` (LayerSkip-style
self-speculation, same exit layer), effx self-speculative with the shared head and with a trained exit head,
and effx lossy early exit at thresholds calibrated for agreement targets 0.99 / 0.95 / 0.90. Lossy rows also
show ROUGE-L of the output against the dense output, teacher-forced agreement with the full model on held-out
text, and the mean number of layers per generated token.

Exit heads are trained once (pydoc calibration text) and cached under the effx cache directory.

    python benchmarks/early_exit.py                         # 3 prompts, 128 new tokens
    python benchmarks/early_exit.py --prompts 2 --new-tokens 64
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from common import exit_heads, same
from common import run_prompts as _run

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

    run = functools.partial(_run, prompts=prompts)

    rows = []
    with torch.inference_mode():
        hf_out, hf_t = run(
            lambda ids, m: model.generate(ids, attention_mask=m, max_new_tokens=n_new, do_sample=False)
        )
    rows.append(("HF generate (dense)", hf_t, True, None))
    ref_out, dense_t = run(
        lambda ids, m: dense.generate(ids, attention_mask=m, max_new_tokens=n_new, eos_token_id=[])
    )
    rows.append(
        ("effx dense", dense_t, all(torch.equal(a, b) for a, b in zip(ref_out, hf_out, strict=True)), None)
    )
    with torch.inference_mode():
        out, t = run(
            lambda ids, m: model.generate(
                ids,
                attention_mask=m,
                max_new_tokens=n_new,
                do_sample=False,
                assistant_early_exit=args.spec_layer + 1,
            )
        )
    rows.append((f"HF assistant_early_exit={args.spec_layer + 1}", t, same(out, ref_out), None))
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
        acc = []

        def spec(ids, mask, prog=prog, acc=acc):
            st = {}
            out = prog.generate(ids, attention_mask=mask, max_new_tokens=n_new, eos_token_id=[], stats=st)
            acc.append(st["accepted"] / max(1, st["drafted"]))
            return out

        out, t = run(spec)
        note = f"draft acceptance {statistics.mean(acc):.2f}"
        rows.append(
            (f"effx self-speculative ({head} head, exit {args.spec_layer})", t, same(out, ref_out), note)
        )
    exits = effx.transform(
        model, passes=[EarlyExit(layers=tuple(lossy_layers), head="trained", heads=str(heads))]
    )
    dense_text = [tok.decode(o, skip_special_tokens=True) for o in ref_out]
    heldout = pydoc_texts("heldout")
    from effx.calibrate import agreement

    for target in (0.99, 0.95, 0.90):
        prog, report = exits.calibrate(pydoc_texts("calib"), tok, target=target)
        depth = []

        def lossy(ids, mask, prog=prog, depth=depth):
            st = {}
            out = prog.generate(ids, attention_mask=mask, max_new_tokens=n_new, eos_token_id=[], stats=st)
            depth.extend(d[0] for d in st["exit_layers"])
            return out

        out, t = run(lossy)
        text = [tok.decode(o, skip_special_tokens=True) for o in out]
        agree, _ = agreement(prog, heldout, tok, max_tokens=2048)
        quality = (
            f"ROUGE-L {rouge_l(text, dense_text):.3f}, teacher-forced agreement {agree:.3f}, "
            f"mean layers {statistics.mean(depth):.1f}/{dense.info.num_layers}"
        )
        rows.append((f"effx lossy, calibrated {target}", t, same(out, ref_out), quality))

    tokens = n_new * len(prompts)
    print(f"\n{len(prompts)} prompts x {n_new} new tokens, greedy; ratio = effx dense time / row time")
    print(f"{'row':<52} {'tok/s':>7} {'ratio':>6}  identical  quality")
    for name, t, identical, extra in rows:
        print(f"{name:<52} {tokens / t:7.2f} {dense_t / t:6.2f}  {str(identical):<9}  {extra or ''}")


if __name__ == "__main__":
    main()
