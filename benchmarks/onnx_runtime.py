"""The ONNX artifact of dense SmolLM2 against the torch backend: export time, size, parity and speed.

Exports the dense Program stage by stage (``effx.exporters.onnx``), loads it with the torch-free runtime
(``effx.runtime.onnx``) and decodes the same prompts as effx's torch backend, interleaved in one run:
tokens/s of each, the ratio, and whether the tokens are identical. Programs with passes are not exported
yet, and the single-graph ``torch.onnx`` baseline of the issue is not measured here yet.

    python benchmarks/onnx_runtime.py                  # 3 prompts x 64 new tokens

(Not ``benchmarks/onnx.py``: run as a script, that name would shadow the ``onnx`` package.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import effx
from effx.data import PROMPTS, encode_prompts
from effx.exporters import onnx as exporter
from effx.runtime import onnx as ort_runtime


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    model, tok = effx.models.load(args.model)
    dense = effx.transform(model)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out_dir = exporter.export(dense, Path(tmp) / "dense", tokenizer=tok, progress=True)
        export_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
        gen = ort_runtime.load(out_dir)
        prompts = [encode_prompts(tok, p) for p in PROMPTS[: args.prompts]]
        torch_t = onnx_t = 0.0
        same = True
        for ids, mask in prompts:  # interleaved, so machine noise hits both
            start = time.perf_counter()
            ref = dense.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, eos_token_id=[])
            torch_t += time.perf_counter() - start
            start = time.perf_counter()
            out = gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=args.new_tokens, eos_token_id=[])
            onnx_t += time.perf_counter() - start
            same &= bool(np.array_equal(out, ref.numpy()))
    tokens = args.new_tokens * len(prompts)
    print(
        f"\nexport {export_s:.1f} s, artifact {size / 1e6:.1f} MB ({len(dense.layers)} layers from one layer export)"
    )
    print(f"{len(prompts)} prompts x {args.new_tokens} new tokens, greedy, batch 1")
    print(f"effx torch backend   {tokens / torch_t:7.2f} tok/s")
    print(
        f"effx ONNX Runtime    {tokens / onnx_t:7.2f} tok/s   ratio {torch_t / onnx_t:.2f}x   identical tokens: {same}"
    )


if __name__ == "__main__":
    main()
