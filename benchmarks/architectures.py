"""Encoder-decoder token elimination (BART) and Mamba decoding: what they cost, on random weights.

No BART or Mamba weights ship offline, so both models are built from their configurations with random
weights (BART-base and Mamba-130m shapes by default): the timings hold, the outputs mean nothing, and
quality is not measured here. Every configuration is timed in the same run (median of ``--repeats``), each
checked against its reference first.

* BART: one ``--source``-token source (batch 1), ``--new`` new tokens, no stop token. Dense (HF ``generate``
  and effx) against encoder TokenDrop before layer ``--drop-layer`` at each ``--keep``: the encoder's time
  (the prefill) and the decode time per new token, whose cross-attention reads the kept tokens only.
* Mamba: a ``--prompt``-token prompt, ``--new`` new tokens. HF ``generate`` against effx's dense loop (same
  tokens), and the two exit modes at an exit after the middle layer: lossy with every token leaving there
  (threshold 0: the bound on what deferral saves; the skipped layers still run, in blocks, with the next
  token that goes deeper or at the end) and self-speculative (threshold 0, 4 drafts: on random weights
  almost every draft is rejected, so this is the cost of a round that gains nothing).

    python benchmarks/architectures.py
    python benchmarks/architectures.py --only bart --source 1024 --keep 0.5,0.25
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import effx
from effx.passes import EarlyExit, TokenDrop


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up, and its first result."""
    with torch.inference_mode():
        first = fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times), first


def bench_bart(args) -> None:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(
        vocab_size=50265,
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
        max_position_embeddings=1024,
        forced_eos_token_id=None,
    )
    model = BartForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = None  # random weights: decode all --new tokens, HF and effx alike
    ids = torch.randint(3, cfg.vocab_size, (1, args.source))
    ids[0, 0], ids[0, -1] = 0, 2
    mask = torch.ones_like(ids)
    n = args.new
    print(f"BART-base shapes, random weights: source {args.source} tokens, {n} new tokens, batch 1")

    def hf():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)

    t_hf, ref = timed(hf, args.repeats)
    rows = []
    configs = [("dense", None)] + [(f"token-drop keep {k:g}", k) for k in args.keep]
    for label, keep in configs:
        passes = [] if keep is None else [TokenDrop(at_layers=(args.drop_layer,), keep=(keep,))]
        program = effx.transform_seq2seq(model, passes)
        stats: dict = {}
        t_enc, _ = timed(lambda p=program: p.encoder.hidden_states(ids, mask), args.repeats)
        t_all, out = timed(
            lambda p=program: p.generate(ids, mask, max_new_tokens=n, eos_token_id=[]), args.repeats
        )
        program.generate(ids, mask, max_new_tokens=n, eos_token_id=[], stats=stats)
        if keep is None and not torch.equal(out, ref):
            raise SystemExit("effx dense BART differs from HF generate: not timing it")
        rows.append((label, t_enc, (t_all - t_enc) / n, t_all, stats["cross_keys"][0]))
    print(
        f"  {'row':<22} {'encoder ms':>10} {'ms/token':>9} {'total s':>8} {'x dense':>8} {'cross keys':>10}"
    )
    print(f"  {'HF generate':<22} {'':>10} {'':>9} {t_hf:>8.2f} {rows[0][3] / t_hf:>8.2f}")
    base = rows[0]
    for label, t_enc, per_tok, t_all, keys in rows:
        print(
            f"  {label:<22} {t_enc * 1e3:>10.1f} {per_tok * 1e3:>9.2f} {t_all:>8.2f} {base[3] / t_all:>8.2f} "
            f"{keys:>10}"
        )
    print(
        f"  (encoder: {base[1] / rows[-1][1]:.2f}x faster at the smallest keep; decode step: "
        f"{base[2] / rows[-1][2]:.2f}x)"
    )


def bench_mamba(args) -> None:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    cfg = MambaConfig(
        vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2, conv_kernel=4
    )
    model = MambaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    ids = torch.randint(1, cfg.vocab_size, (1, args.prompt))
    mask = torch.ones_like(ids)
    n = args.new
    print(f"\nMamba-130m shapes, random weights: prompt {args.prompt} tokens, {n} new tokens, batch 1")

    def hf():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)

    t_hf, ref = timed(hf, args.repeats)
    dense = effx.capture_mamba(model)
    t_dense, out = timed(lambda: dense.generate(ids, mask, max_new_tokens=n, eos_token_id=[]), args.repeats)
    print(f"  {'row':<34} {'s':>7} {'x HF':>6} {'x dense':>8}  tokens")
    print(f"  {'HF generate':<34} {t_hf:>7.2f} {1:>6.2f} {t_hf / t_dense:>8.2f}")
    print(
        f"  {'effx dense':<34} {t_dense:>7.2f} {t_hf / t_dense:>6.2f} {1:>8.2f}  "
        f"{'identical' if torch.equal(out, ref) else 'DIFFER'} to HF"
    )
    mid = cfg.num_hidden_layers // 2 - 1
    for label, mode in (
        (f"lossy, all exit after layer {mid}", "lossy"),
        (f"self-speculative, exit {mid}, draft 4", "self-speculative"),
    ):
        program = effx.transform_mamba(
            model, [EarlyExit(layers=(mid,), thresholds=(0.0,), mode=mode, draft=4)]
        )
        t, got = timed(
            lambda p=program: p.generate(ids, mask, max_new_tokens=n, eos_token_id=[]), args.repeats
        )
        same = "identical" if torch.equal(got, out) else "lossy"
        print(f"  {label:<34} {t:>7.2f} {t_hf / t:>6.2f} {t_dense / t:>8.2f}  {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("bart", "mamba"), help="run one of the two")
    parser.add_argument("--source", type=int, default=512, help="BART source tokens (default 512)")
    parser.add_argument("--prompt", type=int, default=64, help="Mamba prompt tokens (default 64)")
    parser.add_argument("--new", type=int, default=32, help="new tokens (default 32)")
    parser.add_argument(
        "--keep",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.5, 0.25],
        help="BART token-drop keep shares (default 0.5,0.25)",
    )
    parser.add_argument(
        "--drop-layer", type=int, default=2, help="BART encoder layer to drop before (default 2)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row, median (default 3)")
    args = parser.parse_args()
    if args.only in (None, "bart"):
        bench_bart(args)
    if args.only in (None, "mamba"):
        bench_mamba(args)


if __name__ == "__main__":
    main()
