"""Decode speed: HF ``model.generate`` vs effx's dense runtime, timed in the same run.

Runs are interleaved with :func:`effx.bench.interleave` (HF and effx back to back on every input, the order
rotating from input to input and repeat to repeat) so that machine noise hits both; each figure is the median
over repeats. Greedy decoding, the effx.data prompt suite, batch 1 (prompt by prompt) and batch 4 (mixed
lengths, left-padded). Also checks that the outputs are identical and reports time to first token for a
512-token prompt.

    python benchmarks/decode.py                       # SmolLM2-135M, 128 new tokens
    python benchmarks/decode.py --new-tokens 32 --prompts 2 --repeats 1   # quick look
"""

from __future__ import annotations

import argparse
import statistics

import torch

import effx
from effx.bench import interleave, timed
from effx.data import PROMPTS, encode_prompts


def _runners(model, prog, **kw) -> dict:
    """``runner(ids, mask=None)`` for HF ``model.generate`` and for the effx Program, greedy, no stop token."""

    def hf(ids, mask=None):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, do_sample=False, **kw)

    def fx(ids, mask=None):
        return prog.generate(ids, attention_mask=mask, eos_token_id=[], **kw)

    return {"HF": hf, "effx": fx}


def _compare(label, runs, model, prog, batches, new_tokens, repeats):
    timings = interleave(
        _runners(model, prog, max_new_tokens=new_tokens), batches, repeats=repeats, desc=label
    )
    # seconds over all batches, per repeat
    hf_times, fx_times = (
        [sum(per_batch[r].seconds for per_batch in timings[name]) for r in range(repeats)]
        for name in ("HF", "effx")
    )
    identical = all(
        torch.equal(fx.output, hf.output)
        for hf_batch, fx_batch in zip(timings["HF"], timings["effx"], strict=True)
        for hf, fx in zip(hf_batch, fx_batch, strict=True)
    )
    tokens = sum(
        (per_batch[0].output.shape[1] - ids.shape[1]) * ids.shape[0]
        for per_batch, (ids, _) in zip(timings["effx"], batches, strict=True)
    )
    hf_tps = tokens / statistics.median(hf_times)
    fx_tps = tokens / statistics.median(fx_times)
    runs.append((label, hf_tps, fx_tps, identical))
    print(
        f"{label:<10} HF {hf_tps:7.2f} tok/s   effx {fx_tps:7.2f} tok/s   ratio {fx_tps / hf_tps:5.2f}x   "
        f"identical: {identical}   (spread HF {min(hf_times):.1f}-{max(hf_times):.1f} s, "
        f"effx {min(fx_times):.1f}-{max(fx_times):.1f} s)",
        flush=True,
    )


def _ttft(model, prog, tokenizer, length, repeats):
    text = " ".join(PROMPTS) * 40
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :length]
    # one new token: the whole call is the prefill plus the first token (HF generate has no on_token hook)
    timings = interleave(_runners(model, prog, max_new_tokens=1), [(ids,)], repeats=repeats, desc="TTFT")
    h, f = (statistics.median(t.seconds for t in timings[name][0]) for name in ("HF", "effx"))
    print(
        f"TTFT {ids.shape[1]}-token prompt: HF {h * 1000:.0f} ms   effx {f * 1000:.0f} ms   ratio {h / f:.2f}x faster"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=4, help="prompts from the suite (batch 1 runs each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ttft-length", type=int, default=512)
    args = parser.parse_args()

    model, tokenizer = effx.models.load(args.model)
    capture = timed(effx.transform, model)
    prog = capture.output
    print(
        f"{args.model}: captured in {capture.seconds:.1f} s; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    prompts = list(PROMPTS[: args.prompts])
    runs: list = []
    # no stop token: every run decodes exactly --new-tokens, so both sides do the same work
    model.generation_config.eos_token_id = None
    batch1 = [encode_prompts(tokenizer, p) for p in prompts]
    _compare("batch 1", runs, model, prog, batch1, args.new_tokens, args.repeats)
    batch4 = [encode_prompts(tokenizer, PROMPTS[i : i + 4]) for i in range(0, len(prompts), 4)]
    _compare("batch 4", runs, model, prog, batch4, args.new_tokens, args.repeats)
    _ttft(model, prog, tokenizer, args.ttft_length, args.repeats)
    flops = prog.flops(context=256)
    print(f"FLOPs/token at context 256: {sum(flops.values()) / 1e6:.1f} MFLOPs")


if __name__ == "__main__":
    main()
