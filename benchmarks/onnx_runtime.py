"""ONNX artifacts of SmolLM2, dense and with each pass, against the torch backend and a plain torch.onnx export.

Rows, every one timed in the same run with :func:`effx.bench.interleave` (every row on both backends back
to back on each prompt, the order rotating from prompt to prompt, so machine noise hits all of them):

* ``torch.onnx single graph``: what a user does today. The whole Hugging Face model with its KV cache
  exported as one graph (``torch.onnx.export(dynamo=True)``), decoded greedily with ONNX Runtime;
* ``dense``: effx's dense Program on the torch backend and as an effx ONNX artifact;
* one row per pass at the settings of its own benchmark: static neuron mask (keep 0.5, layers 3..27), a
  reduced head (k=8192, fallback 0.9), lossy early exit with trained, pruned (adaptive k=2048) exit heads
  calibrated to 0.95 agreement, the same exits with a threshold no token reaches (what exits cost when none
  is taken), self-speculative decoding with a reduced draft head (k=2048);
* TokenDrop is a prefill technique: its row is time to first token on a long prompt (keep 0.5 at layers 4
  and 12), dense against dropped, on each backend: a one-token generation, median of 3, the four
  interleaved.

For each: tokens/s on each backend, the speed-up over dense on the same backend, the ratio of the two
speed-ups (the issue's target: within 15%), whether the ONNX tokens equal the torch tokens, export time and
artifact size on disk. ``onnx.checker.check_model(full_check=True)`` runs on every stage file.

    python benchmarks/onnx_runtime.py                         # 3 prompts x 64 new tokens
    python benchmarks/onnx_runtime.py --prompts 2 --new-tokens 32 --skip-single-graph
    python benchmarks/onnx_runtime.py --skip-single-graph --quantize "quantize{source=gguf}"

``--quantize STEP`` adds the quantize step to every row, dense included (exits calibrated on the quantized
Program), so each speed-up is the pass's on top of the quantized Program, on both backends.

(Not ``benchmarks/onnx.py``: run as a script, that name would shadow the ``onnx`` package.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import exit_heads, neuron_profile, vocab_file
from onnx_providers import single_generate

import effx
from effx.bench import interleave, timed, total_seconds
from effx.data import PROMPTS, encode_prompts, pydoc_texts
from effx.exporters import onnx as exporter
from effx.passes import EarlyExit, NeuronMask, TokenDrop, VocabReduce, parse_pipeline
from effx.runtime import onnx as ort_runtime


class _FlatCache(torch.nn.Module):
    """The Hugging Face model with its KV cache as plain tensors ``[layers, batch, kv_heads, past, head_dim]``,
    which is how a single-graph ONNX export takes and returns it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_k, past_v):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(past_k.shape[0]):
            cache.update(past_k[i], past_v[i], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        layers = out.past_key_values.layers
        return (
            out.logits[:, -1],
            torch.stack([x.keys for x in layers]),
            torch.stack([x.values for x in layers]),
        )


def single_graph(model, info, path: Path):
    """Export ``model`` as one ONNX graph with KV cache inputs/outputs (torch.onnx's optimizer on, as by
    default); returns an ONNX Runtime session."""
    import onnx
    import onnxruntime as ort

    from effx.exporters.onnx_stage import export_onnx

    n, kv, hd = info.num_layers, info.num_kv_heads, info.head_dim
    args = (
        torch.zeros(1, 3, dtype=torch.long),
        torch.ones(1, 5, dtype=torch.long),
        torch.arange(2, 5)[None],
        torch.randn(n, 1, kv, 2, hd),
        torch.randn(n, 1, kv, 2, hd),
    )
    seq, past = {0: "batch", 1: "seq"}, {1: "batch", 3: "past"}
    with torch.no_grad():
        proto = export_onnx(
            _FlatCache(model).eval(), args, (seq, {0: "batch", 1: None}, seq, past, past), optimize=True
        )
    onnx.save(proto, str(path), save_as_external_data=True, location=f"{path.name}.data")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_stages(artifact: Path) -> None:
    import onnx

    for entry in json.loads((artifact / "plan.json").read_text())["files"].values():
        onnx.checker.check_model(str(artifact / entry["onnx"]), full_check=True)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _torch_runner(prog, new: int):
    """``runner(ids, mask=None)``: the Program on the torch backend, exactly ``new`` tokens."""
    return lambda ids, mask=None: prog.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])


def _onnx_runner(gen, new: int):
    """``runner(ids, mask=None)``: the ONNX artifact with ONNX Runtime, exactly ``new`` tokens (the inputs
    converted to numpy inside the timing, as a user of torch tensors would)."""
    return lambda ids, mask=None: gen.generate(
        ids.numpy(), None if mask is None else mask.numpy(), max_new_tokens=new, eos_token_id=[]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ttft-length", type=int, default=1024, help="prompt tokens of the TokenDrop row")
    parser.add_argument("--skip-single-graph", action="store_true", help="skip the ~80 s single-graph export")
    parser.add_argument("--quantize", default="", help="a quantize{...} step added to every row")
    args = parser.parse_args()
    steps = list(parse_pipeline(args.quantize)) if args.quantize else []

    model, tok = effx.models.load(args.model)

    def make(passes):  # a row's Program: its passes, then the --quantize step when given
        return effx.transform(model, list(passes) + steps)

    dense = make([])
    heads = str(exit_heads(args.model, dense, tok, (10, 15, 20, 25), 4096))
    vocab = vocab_file(args.model, dense, tok, 16)
    profile = neuron_profile(args.model, dense, tok, 16384)
    lossy = make(
        [
            EarlyExit(layers=(10, 15, 20, 25), head="trained", heads=heads),
            VocabReduce(k=2048, schedule="adaptive"),
        ],
    )
    lossy, _ = lossy.calibrate(pydoc_texts("calib"), tok, target=0.95)
    configs = {
        "dense": dense,
        "neuron-mask static keep 0.5": make([NeuronMask(keep=0.5, profile=profile, layers=(3, 27))]),
        "reduced head k=8192 fallback 0.9": make(
            [VocabReduce(k=8192, where="head", vocab=vocab, fallback=0.9)]
        ),
        "lossy exits, pruned k=2048 adaptive (0.95)": lossy,
        # the exits' own cost: every exit evaluated, none ever taken (confidence <= 1 < threshold)
        "exits never taken (threshold 2), pruned k=2048": make(
            [
                EarlyExit(layers=(10, 15, 20, 25), head="trained", heads=heads, thresholds=(2.0,)),
                VocabReduce(k=2048, schedule="adaptive"),
            ],
        ),
        "self-speculative, draft k=2048": make(
            [
                EarlyExit(
                    layers=(20,), mode="self-speculative", thresholds=(0.3,), head="trained", heads=heads
                ),
                VocabReduce(k=2048, where="draft", vocab=vocab),
            ],
        ),
    }
    drop = make([TokenDrop(at_layers=(4, 12), keep=(0.75, 0.5))])

    tmp = Path(tempfile.mkdtemp(prefix="effx-onnx-bench-"))
    try:
        exported, gens = {}, {}
        for name, prog in [*configs.items(), ("token drop", drop)]:
            export = timed(exporter.export, prog, tmp / f"a{len(exported)}", progress=True)
            exported[name] = (export.seconds, _size(export.output))
            check_stages(export.output)
            gens[name] = ort_runtime.load(export.output)
        single = None
        if not args.skip_single_graph:
            (tmp / "single").mkdir()
            export = timed(single_graph, model, dense.info, tmp / "single" / "model.onnx")
            single, single_s = export.output, export.seconds
            single_size = _size(tmp / "single")
            print(f"single-graph torch.onnx export: {single_s:.0f} s", flush=True)

        prompts = [encode_prompts(tok, p) for p in PROMPTS[: args.prompts]]
        new = args.new_tokens
        runners = {}
        for name, prog in configs.items():
            runners[f"{name} (torch)"] = _torch_runner(prog, new)
            runners[f"{name} (onnx)"] = _onnx_runner(gens[name], new)
        if single is not None:
            runners["single graph"] = lambda ids, mask: single_generate(single, dense.info, ids.numpy(), new)
        runs = interleave(runners, prompts, desc="decode")
        times = {name: [total_seconds(runs[f"{name} ({b})"]) for b in ("torch", "onnx")] for name in configs}
        identical = {
            name: all(
                bool(np.array_equal(o[0].output, t[0].output.numpy()))
                for t, o in zip(runs[f"{name} (torch)"], runs[f"{name} (onnx)"], strict=True)
            )
            for name in configs
        }
        if single is not None:
            single_t = total_seconds(runs["single graph"])
            single_same = all(
                bool(np.array_equal(s[0].output, d[0].output))
                for s, d in zip(runs["single graph"], runs["dense (onnx)"], strict=True)
            )

        # TokenDrop: time to first token on a long prompt (a one-token generation), median of 3, dense and
        # dropped on each backend
        long_ids = tok(" ".join(pydoc_texts("heldout")), return_tensors="pt").input_ids[:, : args.ttft_length]
        ttft_runners = {}
        for name, prog in (("dense", dense), ("token drop", drop)):
            ttft_runners[f"{name} (torch)"] = _torch_runner(prog, 1)
            ttft_runners[f"{name} (onnx)"] = _onnx_runner(gens[name], 1)
        ttft_runs = interleave(ttft_runners, [(long_ids,)], repeats=3, desc="TTFT")
        ttft = {}
        for name in ("dense", "token drop"):
            ttft[name] = {
                b: statistics.median(t.seconds for t in ttft_runs[f"{name} ({b})"][0])
                for b in ("torch", "onnx")
            }
            outs = [t.output.numpy() for t in ttft_runs[f"{name} (torch)"][0]]
            outs += [t.output for t in ttft_runs[f"{name} (onnx)"][0]]
            ttft[name]["same"] = all(np.array_equal(o, outs[0]) for o in outs)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    tokens = new * len(prompts)
    dense_torch, dense_onnx = times["dense"]
    on = f", every row with {args.quantize}" if steps else ""
    print(
        f"\n{len(prompts)} prompts x {new} new tokens, greedy, batch 1{on}; speed-up = dense time / row time"
    )
    header = f"{'configuration':<44} {'torch tok/s':>11} {'x':>5} {'ONNX tok/s':>10} {'x':>5} {'ONNX x / torch x':>16}  same  {'export s':>8} {'MB':>6}"
    print(header)
    if single is not None:
        print(
            f"{'torch.onnx single graph (ONNX Runtime)':<44} {'':>11} {'':>5} {tokens / single_t:10.2f} "
            f"{single_t / dense_onnx:5.2f} {'':>16}  {str(single_same):<5} {single_s:8.1f} {single_size / 1e6:6.0f}"
        )
    for name, (t_torch, t_onnx) in times.items():
        sx, ox = dense_torch / t_torch, dense_onnx / t_onnx
        secs, size = exported[name]
        print(
            f"{name:<44} {tokens / t_torch:11.2f} {sx:5.2f} {tokens / t_onnx:10.2f} {ox:5.2f} {ox / sx:16.2f}  "
            f"{str(identical[name]):<5} {secs:8.1f} {size / 1e6:6.0f}"
        )
    if single is not None:
        print(f"\neffx ONNX dense / single graph: {single_t / dense_onnx:.2f}x (target >= 0.9x)")
    d, k = ttft["dense"], ttft["token drop"]
    print(
        f"\nTokenDrop (keep 0.75 / 0.5 before layers 4 / 12), time to first token at {long_ids.shape[1]} tokens:"
    )
    for backend in ("torch", "onnx"):
        print(
            f"  {backend:<5} dense {d[backend] * 1e3:7.0f} ms  dropped {k[backend] * 1e3:7.0f} ms  "
            f"speed-up {d[backend] / k[backend]:.2f}x"
        )
    print(
        f"  ONNX speed-up / torch speed-up {(d['onnx'] / k['onnx']) / (d['torch'] / k['torch']):.2f}; "
        f"same first token on both backends: dense {d['same']}, dropped {k['same']}; "
        f"artifact {exported['token drop'][1] / 1e6:.0f} MB"
    )


if __name__ == "__main__":
    main()
