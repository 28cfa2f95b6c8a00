"""Cascade gating on real prompts with references: ACLSum papers summarized by a small and a large model.

Each prompt asks for a three-sentence summary of one ACLSum test paper (title, abstract and introduction,
cut to --doc-tokens tokens), as a chat turn. Every model decodes greedily, batch 1, the same number of new
tokens (no stop at end-of-turn, so every row does the same work; the text is cut at the first end-of-turn
token before scoring). Timed in the same run with :func:`effx.bench.interleave`: per prompt the four
rows back to back (the order rotating from prompt to prompt, after one untimed warm-up call each), time to
the first new token from ``on_token``:

* large-only: the large model alone (effx dense Program, with KV cache): the baseline of every ratio;
* small-only: the small model alone;
* gated: the small model decodes, an entropy gate calibrated to --share of the tokens of held-out text hands
  uncertain tokens to the large model, which catches up on its KV cache in one batched pass;
* verified: speculative decoding (the small model drafts up to --draft tokens, the large model verifies):
  its tokens must equal large-only's.

Quality is ROUGE-L (effx.quality.rouge_l) against the ACLSum reference summary (the paper's challenge,
approach and outcome sentences) and against the large model's output. The gate is calibrated on ACLSum
validation papers, which the test prompts never share: by default on the small model's own summaries of
them (the entropy it has while decoding), with --calib text on their text read teacher-forced
(Cascade.calibrate), which puts the threshold far above what a chat model's answers reach.

Threads: one by default. On a CPU shared with other jobs, OpenMP threads that spin at barriers make
multi-token steps (the large model's catch-up and verification passes, [q>1] x weight GEMMs) several times
slower than their share of the work, while one-token steps (GEMV) are not hurt: a measured 1536x8960 linear
took 5 ms for 1 token and 41 ms for 2 with 2 threads, 6 ms and 11 ms with one. Use --threads 0 (torch's
default) on an idle machine.

Two pairs: ``qwen`` (Qwen2.5-Coder-0.5B-Instruct -> 1.5B-Instruct; `make install-cascade`) and ``smollm2``
(a self-cascade: the small model is SmolLM2-135M with statically masked FFNs, NeuronMask keep=--keep with a
pydoc neuron profile, the large one is dense SmolLM2-135M).

    python benchmarks/cascade.py                                 # both pairs, 2 prompts x 48 new tokens
    python benchmarks/cascade.py --pair qwen --prompts 5 --new-tokens 128 --share 0.2
"""

from __future__ import annotations

import argparse
import gc

import torch
from common import neuron_profile

import effx
from effx.bench import interleave, timed
from effx.data import aclsum, encode_prompts
from effx.passes import NeuronMask
from effx.quality import rouge_l
from effx.runtime.forward import forward_logits

ASK = (
    "Summarize the following paper in three sentences: the challenge it addresses, its approach, and its "
    "outcome.\n\n"
)


def summary_prompts(tok, papers, doc_tokens: int):
    """One chat prompt per paper: the request, then title, abstract and introduction cut to ``doc_tokens``."""
    prompts = []
    for p in papers:
        doc = f"Title: {p['title']}\n\n{p['abstract']}\n\n{p['introduction']}"
        ids = tok(doc, add_special_tokens=False).input_ids[:doc_tokens]
        prompts.append(encode_prompts(tok, ASK + tok.decode(ids)))
    return prompts


def calibration_texts(papers) -> list[str]:
    return [
        f"{p['title']}\n\n{p['abstract']}\n\n{p['introduction']}\n\nSummary: {p['summary']}" for p in papers
    ]


def text_of(tok, new: torch.Tensor, stops: set[int]) -> str:
    ids = new.tolist()
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tok.decode(ids[:cut], skip_special_tokens=True).strip()


def generator(fn, new_tokens: int, stats: bool = False):
    """``runner(ids, mask, new=new_tokens, on_token=...)`` for :func:`effx.bench.interleave`: ``fn`` (a
    ``generate``) decodes exactly ``new`` tokens; returns ``(output, stats)``, the dict ``generate`` filled
    when ``stats`` (else empty)."""

    def run(ids, mask, new=new_tokens, on_token=None):
        run_stats: dict = {}
        extra = {"stats": run_stats} if stats else {}
        out = fn(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], on_token=on_token, **extra)
        return out, run_stats

    return run


def calibrate_on_generations(casc, tok, papers, args):
    """The gate calibrated to ``args.share`` on the small model's own greedy summaries of ``papers``: its
    measure at every generated token, given the prompt and the tokens before, as the gate sees it while
    decoding. Text read teacher-forced (``Cascade.calibrate``) is far less predictable than a chat model's
    own answers, so a threshold from it fires on a much smaller share of generated tokens."""
    measures = []
    with torch.inference_mode():
        for ids, mask in summary_prompts(tok, papers, args.doc_tokens):
            out = casc.small.generate(
                ids, attention_mask=mask, max_new_tokens=args.new_tokens, eos_token_id=[]
            )
            full_mask = torch.cat([mask, torch.ones_like(out[:, ids.shape[1] :])], 1)
            logits = forward_logits(casc.small, out, full_mask)[0, ids.shape[1] - 1 : -1]
            measures.append(casc.gate.measure(logits))
    measures = torch.cat(measures)
    threshold = casc.gate.threshold_for_share(measures, args.share)
    gate = effx.EntropyGate(threshold=threshold)
    observed = float(gate.fires_at(measures, threshold).double().mean())
    note = (
        f"entropy gate calibrated on {measures.numel()} tokens of the small model's summaries of {len(papers)} "
        f"ACLSum validation papers for a large-model share of {args.share:.1%}: threshold {threshold:.4g}, "
        f"observed share {observed:.1%}"
    )
    return casc.with_gate(gate), note


def bench_pair(label: str, small, large, tok, args, papers, calib_papers) -> dict:
    """Time and score the four ways of decoding on every prompt; print per-prompt rows, return totals."""
    n_new = args.new_tokens
    casc = effx.cascade(small, large, gate=effx.EntropyGate(percentile=100 * (1 - args.share)))

    def calibrate():
        if args.calib == "generations":
            return calibrate_on_generations(casc, tok, calib_papers[: args.calib_gens], args)
        gated, calib = casc.calibrate(calibration_texts(calib_papers), tok, max_tokens=args.calib_tokens)
        return gated, f"{calib.format()} (ACLSum validation text)"

    calibration = timed(calibrate)
    (gated, note), calib_s = calibration.output, calibration.seconds
    verified = effx.cascade(small, large, mode="verified", draft=args.draft)
    stops = set(large.plan.eos_token_ids)

    prompts = summary_prompts(tok, papers, args.doc_tokens)
    runners = {
        "large": generator(large.generate, n_new),
        "small": generator(small.generate, n_new),
        "gated": generator(gated.generate, n_new, stats=True),
        "verified": generator(verified.generate, n_new, stats=True),
    }

    print(f"\n== {label}: {note} ({calib_s:.0f} s)", flush=True)
    # interleaved: the four runs of one prompt follow each other, so load drift hits them alike; the warm-up
    # (first calls allocate and pick kernels): 4 tokens on the first 16 tokens of the first prompt
    runs = interleave(
        runners,
        prompts,
        on_token=True,
        warmup=(prompts[0][0][:, :16], prompts[0][1][:, :16], 4),
        desc=label,
    )
    print(
        f"{'prompt':<6} {'tokens':>6} {'large s':>8} {'prefill':>8} {'small s':>8} {'gated s':>8} {'gated x':>8} "
        f"{'dec x':>6} {'verif s':>8} {'verif x':>8} {'dec x':>6} {'same':>5} {'large %':>8} {'accept':>7} "
        f"{'R-L large':>9} {'R-L small':>9} {'R-L gated':>9} {'small~L':>8} {'gated~L':>8}"
    )
    rows = []
    for i, ((ids, _), paper) in enumerate(zip(prompts, papers, strict=True)):
        n = ids.shape[1]
        call = {k: runs[k][i][0] for k in runners}  # one repeat
        (big, _), (little, _) = call["large"].output, call["small"].output
        (g_out, g_stats), (v_out, v_stats) = call["gated"].output, call["verified"].output
        t_large, t_small, t_gated, t_verif = (call[k].seconds for k in runners)
        f_large, f_small, f_gated, f_verif = (call[k].first_token_s for k in runners)
        outs = {"large": big, "small": little, "gated": g_out}
        texts = {k: text_of(tok, o[0, n:], stops) for k, o in outs.items()}
        ref = [paper["summary"]]
        row = dict(
            time={"large": t_large, "small": t_small, "gated": t_gated, "verified": t_verif},
            # the prefill and first token (the large model's prefill bounds every cascade from below)
            first={"large": f_large, "small": f_small, "gated": f_gated, "verified": f_verif},
            same=torch.equal(v_out, big),
            share=g_stats["large_share"],
            accepted=v_stats["accepted"],
            drafted=v_stats["drafted"],
            rl={k: rouge_l([t], ref) for k, t in texts.items()},
            vs_large={k: rouge_l([texts[k]], [texts["large"]]) for k in ("small", "gated")},
            texts=texts,
        )
        rows.append(row)
        dec = {k: row["time"][k] - row["first"][k] for k in row["time"]}
        print(
            f"{i:<6} {n:>6} {t_large:8.2f} {f_large:8.2f} {t_small:8.2f} {t_gated:8.2f} {t_large / t_gated:8.2f} "
            f"{dec['large'] / dec['gated']:6.2f} {t_verif:8.2f} {t_large / t_verif:8.2f} "
            f"{dec['large'] / dec['verified']:6.2f} {str(row['same']):>5} {row['share']:8.1%} "
            f"{row['accepted'] / max(1, row['drafted']):7.1%} {row['rl']['large']:9.3f} {row['rl']['small']:9.3f} "
            f"{row['rl']['gated']:9.3f} {row['vs_large']['small']:8.3f} {row['vs_large']['gated']:8.3f}",
            flush=True,
        )
    if args.show_text:
        for i, row in enumerate(rows):
            for k, t in row["texts"].items():
                print(f"  [{i} {k}] {t}")
    return summarize(label, rows, n_new)


def summarize(label: str, rows: list[dict], n_new: int) -> dict:
    """Totals over the prompts: time ratios against large-only, mean ROUGE-L, shares."""
    kinds = ("large", "small", "gated", "verified")
    total = {k: sum(r["time"][k] for r in rows) for k in kinds}
    dec = {k: total[k] - sum(r["first"][k] for r in rows) for k in kinds}
    return dict(
        pair=label,
        large_tok_s=n_new * len(rows) / total["large"],
        prefill=sum(r["first"]["large"] for r in rows) / total["large"],
        x={k: total["large"] / total[k] for k in kinds},
        dec_x={k: dec["large"] / dec[k] for k in kinds},
        same=all(r["same"] for r in rows),
        share=sum(r["share"] for r in rows) / len(rows),
        accept=sum(r["accepted"] for r in rows) / max(1, sum(r["drafted"] for r in rows)),
        rl={k: sum(r["rl"][k] for r in rows) / len(rows) for k in ("large", "small", "gated")},
        vs_large={k: sum(r["vs_large"][k] for r in rows) / len(rows) for k in ("small", "gated")},
    )


def qwen_pair():
    small_model, tok = effx.models.load("qwen2.5-coder-0.5b")
    large_model, _ = effx.models.load("qwen2.5-coder-1.5b")
    return effx.transform(small_model), effx.transform(large_model), tok


def smollm2_pair(keep: float, layers: tuple[int, int], profile_tokens: int):
    model, tok = effx.models.load("smollm2-135m")
    large = effx.transform(model)
    profile = neuron_profile("smollm2-135m", large, tok, profile_tokens)
    return effx.transform(model, [NeuronMask(keep=keep, profile=profile, layers=layers)]), large, tok


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pair", choices=("qwen", "smollm2", "both"), default="both")
    parser.add_argument("--prompts", type=int, default=2, help="ACLSum test papers to summarize")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--doc-tokens", type=int, default=160, help="paper tokens in each prompt")
    parser.add_argument("--share", type=float, default=0.2, help="target share of large-model tokens")
    parser.add_argument(
        "--calib",
        choices=("generations", "text"),
        default="generations",
        help="calibrate the gate on the small model's summaries of validation papers, or on their text",
    )
    parser.add_argument(
        "--calib-gens", type=int, default=3, help="validation papers summarized (generations)"
    )
    parser.add_argument("--calib-papers", type=int, default=20, help="validation papers read (text)")
    parser.add_argument("--calib-tokens", type=int, default=1024, help="tokens read (text)")
    parser.add_argument("--draft", type=int, default=4, help="longest draft of verified mode")
    parser.add_argument("--keep", type=float, default=0.5, help="NeuronMask keep of the SmolLM2 small model")
    parser.add_argument(
        "--layers", default="3,27", help="first and last masked layer of the SmolLM2 small model"
    )
    parser.add_argument("--profile-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--show-text", action="store_true", help="print every summary")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    papers = aclsum("test", n=args.prompts)
    calib_papers = aclsum("val", n=args.calib_papers)
    pairs = ("qwen", "smollm2") if args.pair == "both" else (args.pair,)
    results = []
    for pair in pairs:
        if pair == "qwen":
            small, large, tok = qwen_pair()
            label = "Qwen2.5-Coder 0.5B -> 1.5B"
        else:
            layers = tuple(int(x) for x in args.layers.split(","))
            small, large, tok = smollm2_pair(args.keep, layers, args.profile_tokens)
            label = f"SmolLM2-135M NeuronMask keep={args.keep} -> dense"
        results.append(bench_pair(label, small, large, tok, args, papers, calib_papers))
        del small, large
        gc.collect()

    print(
        f"\n{args.prompts} ACLSum test papers x {args.new_tokens} new tokens, greedy, batch 1, "
        f"{torch.get_num_threads()} threads. x = large-only time / row time, same run; dec x = the same for the "
        "time after the first new token (prefill excluded); prefill = large-only's share of time before its "
        f"first token. Gate calibrated to {args.share:.0%} of held-out tokens; large % = share of generated "
        "tokens the large model decided. R-L = ROUGE-L vs the reference summary; ~L = vs large-only's output."
    )
    print(
        f"{'pair':<42} {'large tok/s':>11} {'prefill':>7} {'small x':>7} {'gated x':>7} {'dec x':>6} "
        f"{'large %':>7} {'verif x':>7} {'dec x':>6} {'same':>5} {'accept':>6} {'R-L large':>9} {'R-L small':>9} "
        f"{'R-L gated':>9} {'gated/large':>11} {'small~L':>7} {'gated~L':>7}"
    )
    for r in results:
        x, d = r["x"], r["dec_x"]
        print(
            f"{r['pair']:<42} {r['large_tok_s']:11.2f} {r['prefill']:7.0%} {x['small']:7.2f} {x['gated']:7.2f} "
            f"{d['gated']:6.2f} {r['share']:7.1%} {x['verified']:7.2f} {d['verified']:6.2f} {str(r['same']):>5} "
            f"{r['accept']:6.1%} {r['rl']['large']:9.3f} {r['rl']['small']:9.3f} {r['rl']['gated']:9.3f} "
            f"{r['rl']['gated'] / max(r['rl']['large'], 1e-9):11.1%} {r['vs_large']['small']:7.3f} "
            f"{r['vs_large']['gated']:7.3f}"
        )
    print(
        "targets (issue 7): gated x >= 1.5 with R-L gated/large >= 95%; verified x >= 1.4 with the same tokens"
    )


if __name__ == "__main__":
    main()
