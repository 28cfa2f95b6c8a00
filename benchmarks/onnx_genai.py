"""effx's ONNX backend against ONNX Runtime GenAI on the same float32 weights, timed in the same run.

Rows (batch 1, greedy, the effx.data chat prompts, a fixed number of new tokens, no stop token), every one
interleaved by :func:`effx.bench.interleave` so machine noise hits all of them:

* ``HF generate``: the Hugging Face model, float32 (the baseline of every ratio);
* ``effx torch``: effx's dense Program on the torch backend;
* ``effx ONNX``: the same Program as an effx artifact (fused attention graphs where the exporter made them),
  run by effx's ONNX Runtime backend;
* ``effx ONNX plain``: the same artifact without its fused graphs (what artifacts ran before them);
* ``onnxruntime-genai fp32``: ONNX Runtime GenAI's model builder on the same weights (the de-quantized
  SmolLM2 directory effx caches), one graph with its own fused attention, run by its own generator. Its
  session gets the same thread count (``intra_op_num_threads`` in its ``genai_config.json``).

GenAI has no "no stop token" setting: it runs with ``min_length`` (the end-of-text token masked until the
length is reached), so its tokens may part from effx's where the model would have chosen that token;
``lead`` counts the leading tokens equal to effx ONNX's, per prompt.

    pip install onnxruntime-genai          # or: pip install -e .[genai]
    python benchmarks/onnx_genai.py                              # 4 prompts x 128 tokens, 3 repeats
    python benchmarks/onnx_genai.py --prompts 2 --new-tokens 32 --repeats 1     # quick look
    python benchmarks/onnx_genai.py --genai-dir /tmp/genai      # build the GenAI model once, keep it
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import effx
from effx import kernels
from effx.bench import first_outputs, interleave
from effx.data import PROMPTS, encode_prompts
from effx.exporters.onnx import export
from effx.runtime.onnx import load


def _genai_model(out: Path, threads: int):
    """ONNX Runtime GenAI's fp32 CPU model of SmolLM2, built into ``out`` unless it is there already."""
    if not (out / "genai_config.json").exists():
        source = effx.models.resolve("smollm2-135m")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out)]
        cmd += ["-p", "fp32", "-e", "cpu", "-c", str(out / "build-cache")]
        print("building the GenAI model:", " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the GenAI model builder failed:\n{done.stderr[-4000:]}")
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=2))
    import onnxruntime_genai as og

    return og.Model(str(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help="chat prompts of effx.data.PROMPTS (default 4)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--genai-dir", type=Path, help="where the GenAI model is (built there if missing)")
    ap.add_argument("--no-hf", action="store_true", help="leave the HF and effx torch rows out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import onnxruntime_genai as og
    except ImportError:
        sys.exit("onnxruntime-genai is not installed: pip install onnxruntime-genai (or -e .[genai])")

    model, tok = effx.models.load("smollm2-135m")
    prompts = [encode_prompts(tok, [p]) for p in PROMPTS[: args.prompts]]
    dense = effx.transform(model, passes=[])
    n = args.new_tokens
    tmp = tempfile.TemporaryDirectory(prefix="effx-genai-")
    artifact = export(dense, Path(tmp.name) / "effx")
    plain_dir = Path(tmp.name) / "plain"
    plain_dir.mkdir()
    for f in artifact.iterdir():
        (plain_dir / f.name).symlink_to(f)
    manifest = json.loads((artifact / "plan.json").read_text())
    manifest.pop("fused", None)
    (plain_dir / "plan.json").unlink()
    (plain_dir / "plan.json").write_text(json.dumps(manifest))
    genai = _genai_model(args.genai_dir or Path(tmp.name) / "genai", args.threads)

    def onnx_runner(gen):
        return lambda ids, mask: torch.from_numpy(
            gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=n, eos_token_id=[])
        )

    def genai_runner(ids, mask):
        params = og.GeneratorParams(genai)
        length = ids.shape[1] + n
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        gen = og.Generator(genai, params)
        gen.append_tokens(ids[0].tolist())
        while not gen.is_done():
            gen.generate_next_token()
        return torch.tensor([list(gen.get_sequence(0))])

    runners = {}
    if not args.no_hf:

        def hf(ids, mask):
            with torch.inference_mode():
                return model.generate(
                    ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n
                )

        runners["HF generate"] = hf
        runners["effx torch"] = lambda ids, mask: dense.generate(
            ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[]
        )
    runners["effx ONNX"] = onnx_runner(load(artifact))
    runners["effx ONNX plain"] = onnx_runner(load(plain_dir))
    runners["onnxruntime-genai fp32"] = genai_runner

    runs = interleave(
        runners, prompts, repeats=args.repeats, warmup=(prompts[0][0][:, :8], prompts[0][1][:, :8])
    )
    tokens = n * len(prompts)
    # tokens/s per repeat (each repeat's seconds summed over the prompts), median and spread
    rates = {
        name: [tokens / sum(per[r].seconds for per in r_) for r in range(args.repeats)]
        for name, r_ in runs.items()
    }
    outs = {name: first_outputs(r) for name, r in runs.items()}
    base_name = "HF generate" if not args.no_hf else "effx ONNX"
    base = statistics.median(rates[base_name])
    genai_rate = statistics.median(rates["onnxruntime-genai fp32"])
    ref = outs["effx ONNX"]
    starts = [ids.shape[1] for ids, _ in prompts]
    print(f"\nSmolLM2-135M float32, {len(prompts)} chat prompts x {n} tokens, batch 1, {args.threads} threads, "
          f"median of {args.repeats} (spread: lowest-highest); {kernels.describe()}")  # fmt: skip
    print(f"{'row':<24} {'tok/s':>7} {'spread':>13} {'x ' + base_name:>14} {'x GenAI':>8}  lead (of 32)")
    for name, values in rates.items():
        tps = statistics.median(values)
        leads = []
        for out, s, want in zip(outs[name], starts, ref, strict=True):
            a, b = out[0, s : s + 32], want[0, s : s + 32]
            diff = (a != b).nonzero()
            leads.append(int(diff[0]) if len(diff) else a.numel())
        print(
            f"{name:<24} {tps:7.1f} {min(values):6.1f}-{max(values):<6.1f} {tps / base:14.2f} "
            f"{tps / genai_rate:8.2f}  " + " ".join(map(str, leads))
        )
    same = all(torch.equal(a, b) for a, b in zip(outs["effx ONNX"], outs["effx ONNX plain"], strict=True))
    print(f"effx ONNX fused and plain tokens identical: {same}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
