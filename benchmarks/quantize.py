"""Quantized decoding on SmolLM2: effx's quantize configurations beside HF ``generate`` float32, effx's
float32 Program and llama.cpp on the model's own Q4_1 file, timed in the same run.

Every row decodes the same chat prompts (batch 1, greedy, a fixed number of new tokens, no stop token),
interleaved by :func:`effx.bench.interleave` so machine noise hits all rows alike. Quality against the
float32 Program: ``agree`` is teacher-forced agreement (the share of positions of the float32 Program's own
continuation where the row's model predicts the same next token), ``lead`` the leading generated tokens
equal to the float32 Program's (per prompt), ``ppl`` the perplexity on held-out pydoc text; llama.cpp's
agreement and perplexity are measured the same way, on its own logits (a second context that keeps them
for every position).

    python benchmarks/quantize.py                          # 4 prompts x 128 tokens, 3 repeats
    python benchmarks/quantize.py --prompts 2 --new-tokens 32 --repeats 1     # quick look
    python benchmarks/quantize.py --no-llama-cpp            # without the llama.cpp row
    python benchmarks/quantize.py --no-onnx                 # without the ONNX artifact rows
    python benchmarks/quantize.py --isas all                # effx torch rows on every kernel target too

The first line printed names the kernel target and the CPU's instruction sets; ``--isas all`` adds the
float32 and ``quantize{source=gguf}`` rows on each other target this CPU runs (an AVX-512 machine also
runs the AVX2 kernels), labelled with the target.

The ONNX rows are artifacts of the float32 Program, ``quantize{source=gguf}`` and
``quantize{bits=8 symmetric=true}`` (exported to a temporary directory) run by effx's ONNX Runtime backend,
their agreement and perplexity measured on the artifact itself; their size is printed beside the GGUF
file's.

llama.cpp runs through llama-cpp-python (``pip install -e .[llama]``, a source build of a few minutes);
without it the row is left out, and the script says so.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import peer_runners

import effx
from effx import kernels
from effx.bench import first_outputs, interleave, total_seconds
from effx.data import PROMPTS, encode_prompts, pydoc_texts, token_chunks
from effx.models import gguf_file
from effx.runtime.forward import forward_logits

CONFIGS = {
    "effx quantize{source=gguf}": "quantize{source=gguf}",
    "effx quantize{source=gguf activations=int8}": "quantize{source=gguf activations=int8}",
    "effx quantize{bits=8 symmetric=true}": "quantize{bits=8 symmetric=true}",
    "effx quantize{bits=4}": "quantize{bits=4}",
    "effx quantize{dtype=bf16}": "quantize{dtype=bf16}",
}


# the ONNX artifact rows: the float32 Program and these pipelines
ONNX = (
    "float32",
    "quantize{source=gguf}",
    "quantize{source=gguf activations=int8}",
    "quantize{bits=8 symmetric=true}",
)


def _llama_cpp(path, threads: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(model_path=str(path), n_threads=threads, n_ctx=1024, verbose=False, logits_all=False)


class _LlamaCppLogits:
    """llama.cpp's logits at every position of a sequence (a second context that keeps them all), for its
    agreement and perplexity beside effx's rows."""

    def __init__(self, path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_threads=threads, n_ctx=1024, verbose=False, logits_all=True)

    def __call__(self, seq):
        self.llm.reset()
        self.llm.eval(seq[0].tolist())
        return torch.from_numpy(np.array(self.llm.scores[: self.llm.n_tokens], dtype=np.float32))[None]


def _logits(model, seq):
    """A torch Program's logits, an ONNX artifact's (its generator) or llama.cpp's, as a torch tensor."""
    if isinstance(model, effx.Program):
        return model(seq)
    if isinstance(model, _LlamaCppLogits):
        return model(seq)
    return torch.from_numpy(forward_logits(model, seq.numpy()))


def _agreement(prog, ref_logits, seqs, start) -> float:
    hits = total = 0
    for seq, ref, s in zip(seqs, ref_logits, start, strict=True):
        pred = _logits(prog, seq).argmax(-1)[0, s - 1 : -1]
        hits += int((pred == ref).sum())
        total += ref.numel()
    return hits / total


def _perplexity(prog, chunks) -> float:
    nll = n = 0.0
    for chunk in chunks:
        logp = _logits(prog, chunk).log_softmax(-1)[0, :-1]
        nll -= float(logp.gather(-1, chunk[0, 1:, None]).sum())
        n += chunk.shape[1] - 1
    return math.exp(nll / n)


def _on(isa, runner, ids, mask):
    with kernels.use(isa):
        return runner(ids, mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help="chat prompts of effx.data.PROMPTS (default 4)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-llama-cpp", action="store_true", help="leave the llama.cpp row out")
    ap.add_argument("--no-onnx", action="store_true", help="leave the ONNX artifact rows out")
    ap.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated effx torch rows to time, from: " + ", ".join(CONFIGS) + " (default: all)",
    )
    ap.add_argument(
        "--isas",
        default="best",
        help="kernel targets for the effx torch rows: best, all (but the portable C), or a list such as avx2 "
        "(default: best)",
    )
    args = ap.parse_args()
    every = [i for i in kernels.isas()[1:] if i != "generic"]  # portable C: for tests, not timing, on x86
    isas = () if args.isas == "best" else every if args.isas == "all" else args.isas.split(",")
    isas = [i for i in isas if i != kernels.isa()]
    if not set(isas) <= set(kernels.isas()):
        ap.error(f"--isas: this machine runs {', '.join(kernels.isas())}, not {args.isas}")
    torch.set_num_threads(args.threads)

    model, tok = effx.models.load("smollm2-135m")
    prompts = [encode_prompts(tok, [p]) for p in PROMPTS[: args.prompts]]
    dense = effx.transform(model, passes=[])
    progs = {"effx float32": dense}
    wanted = {c.strip() for c in args.configs.split(",")} | {"effx quantize{source=gguf}"}
    if not wanted <= set(CONFIGS):
        ap.error(f"--configs: unknown {sorted(wanted - set(CONFIGS))}")
    for label, pipeline in CONFIGS.items():
        if label in wanted:
            progs[label] = effx.transform(model, passes=pipeline)
    n = args.new_tokens

    runners = peer_runners(model, progs, n)
    for isa in isas:  # the same Programs on another kernel target
        for label in ("effx float32", "effx quantize{source=gguf}"):
            runners[f"{label} [{isa}]"] = lambda ids, mask, r=runners[label], i=isa: _on(i, r, ids, mask)
    quality = dict(progs)  # row -> what its agreement and perplexity are measured on
    tmp = tempfile.TemporaryDirectory(prefix="effx-quantize-")
    sizes = {}
    if not args.no_onnx:
        from effx.exporters.onnx import export
        from effx.runtime.onnx import load

        for label in ONNX:
            prog = progs.get(f"effx {label}") or (
                dense if label == "float32" else effx.transform(model, label)
            )
            name = label.replace("{", "_").replace("}", "").replace("=", "_").replace(" ", "_")
            out = export(prog, Path(tmp.name) / name)
            sizes[label] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            gen = load(out)
            runners[f"effx ONNX {label}"] = lambda ids, mask, g=gen: torch.from_numpy(
                g.generate(ids.numpy(), mask.numpy(), max_new_tokens=n, eos_token_id=[])
            )
            quality[f"effx ONNX {label}"] = gen
    llm = None if args.no_llama_cpp else _llama_cpp(gguf_file("smollm2-135m"), args.threads)
    if llm is not None:

        def llama_cpp(ids, mask):
            llm.reset()
            out = []
            for t in llm.generate(ids[0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                out.append(t)
                if len(out) == n:
                    break
            return torch.cat([ids, torch.tensor([out])], dim=1)

        runners["llama.cpp Q4_1 (the GGUF file)"] = llama_cpp
        quality["llama.cpp Q4_1 (the GGUF file)"] = _LlamaCppLogits(gguf_file("smollm2-135m"), args.threads)
    elif not args.no_llama_cpp:
        print("llama-cpp-python is not installed (pip install -e .[llama]): no llama.cpp row")

    runs = interleave(
        runners, prompts, repeats=args.repeats, warmup=(prompts[0][0][:, :8], prompts[0][1][:, :8])
    )
    tokens = n * len(prompts)
    seconds = {name: total_seconds(r) for name, r in runs.items()}
    outs = {name: first_outputs(r) for name, r in runs.items()}

    # quality against the float32 Program: its own continuations, teacher-forced
    seqs = outs["effx float32"]
    starts = [ids.shape[1] for ids, _ in prompts]
    ref = [dense(s).argmax(-1)[0, st - 1 : -1] for s, st in zip(seqs, starts, strict=True)]
    chunks = token_chunks(tok, pydoc_texts("heldout"), 256, 4096)
    hf_tps = tokens / seconds["HF generate float32"]
    print(f"\nSmolLM2-135M, {len(prompts)} chat prompts x {n} tokens, batch 1, {args.threads} threads, "
          f"median of {args.repeats}; {kernels.describe()}")  # fmt: skip
    print(f"{'row':<42} {'tok/s':>7} {'x HF':>6} {'x f32':>6} {'agree':>6} {'ppl':>6}  lead (of 32 or fewer)")
    dense_tps = tokens / seconds["effx float32"]
    for name in runners:
        tps = tokens / seconds[name]
        leads = []
        for out, s, base in zip(outs[name], starts, seqs, strict=True):
            a, b = out[0, s : s + 32], base[0, s : s + 32]
            diff = (a != b).nonzero()
            leads.append(int(diff[0]) if len(diff) else a.numel())
        prog = quality.get(name.split(" [")[0])
        agree = f"{_agreement(prog, ref, seqs, starts):.3f}" if prog is not None else "-"
        ppl = f"{_perplexity(prog, chunks):.2f}" if prog is not None else "-"
        print(
            f"{name:<42} {tps:7.1f} {tps / hf_tps:6.2f} {tps / dense_tps:6.2f} {agree:>6} {ppl:>6}  "
            + " ".join(map(str, leads))
        )
    for label, prog in progs.items():
        if label != "effx float32":
            size = effx.flops.weight_bytes(prog) / 1e6
            print(f"  {label}: resident weights {size:.1f} MB")
    gguf_size = gguf_file("smollm2-135m").stat().st_size
    for label, size in sizes.items():
        print(
            f"  ONNX artifact {label}: {size / 1e6:.1f} MB ({size / gguf_size:.2f}x the GGUF file's {gguf_size / 1e6:.1f} MB)"
        )
    tmp.cleanup()
    for peer in (llm, quality.get("llama.cpp Q4_1 (the GGUF file)")):  # before interpreter shutdown tears
        if peer is not None:  # down what llama-cpp-python's finalizer needs
            (peer.llm if isinstance(peer, _LlamaCppLogits) else peer).close()


if __name__ == "__main__":
    main()
