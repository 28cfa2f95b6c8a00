"""What a decode step costs against what its weights cost to read, for steps of 1, 2, 4 and 8 tokens.

A decode step at batch 1 reads every weight once, so on a CPU its floor is the weights' bytes over the
machine's read bandwidth. For each backend (the torch backend, and the Program as an ONNX artifact on ONNX
Runtime), this times one step of ``n`` new tokens on a cache already holding ``--context`` tokens, through
every layer and then the head over all ``n`` positions (what verification of ``n - 1`` drafts needs), and
prints:

* the step's time (median over ``--repeats``, the sizes interleaved so that noise hits them alike), split
  into layers and head;
* its cost relative to a 1-token step on the same backend (issue 17's target: a 4-token step about one
  token);
* the bytes of weights the step reads (each layer's and the head's, each tensor once) and the share of the
  bandwidth floor reached: ``(bytes / bandwidth) / time`` (1.0 = bandwidth-bound).

The read bandwidth is measured here, in the same run, as the best of several reductions over a buffer
much larger than the last-level cache.

    python benchmarks/steps.py                                  # SmolLM2-135M, context 256
    python benchmarks/steps.py --backends torch --repeats 5     # no ONNX export
    python benchmarks/steps.py --backends torch --isas all      # the torch backend on every kernel target
    python benchmarks/steps.py --passes "quantize{source=gguf}" # the GGUF file's 4-bit weights

The first line printed names the kernel target and the CPU's instruction sets.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

import effx
from effx import kernels
from effx.runtime.forward import MaskCache, run_step
from effx.runtime.torch_backend import torch_backend
from effx.runtime.vocab import head_logits

SIZES = (1, 2, 4, 8)


def read_bandwidth(mib: int = 1024, rounds: int = 5) -> float:
    """Bytes per second read by a reduction over ``mib`` MiB of float32 (the best of ``rounds``)."""
    x = torch.ones(mib * (1 << 20) // 4, dtype=torch.float32)
    x.sum()  # touch every page first
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def step_bytes(program) -> tuple[int, int]:
    """Bytes of weights a decode step reads: the layers' and the head's (each tensor once)."""
    seen: set[int] = set()

    def held(stages) -> int:
        total = 0
        for stage in stages:
            for t in list(stage.graph.parameters()) + list(stage.graph.buffers()):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total

    return held(program.layers), held([program.head])


def time_steps(backend, context: int, repeats: int, vocab: int) -> dict[int, tuple[float, float]]:
    """``n -> (layers seconds, head seconds)``: medians over ``repeats`` of one ``n``-token step on a cache of
    ``context`` tokens, the cache rolled back after each step."""
    xp = backend.xp
    g = torch.Generator().manual_seed(0)
    as_xp = (lambda t: t) if backend.name == "torch" else (lambda t: t.numpy())
    prompt = as_xp(torch.randint(3, vocab, (1, context), generator=g))
    cache = backend.new_cache(1, context + max(SIZES))
    valid = xp.ones((1, context + max(SIZES)), dtype=xp.bool)
    plan = backend.plan
    samples: dict[int, list[tuple[float, float]]] = {n: [] for n in SIZES}
    with backend.compute():
        run_step(backend, cache, prompt, as_xp(torch.arange(context)[None]), valid[:, :context])
        for r in range(repeats + 1):  # the first round warms up and is not kept
            order = SIZES[r % len(SIZES) :] + SIZES[: r % len(SIZES)]
            for n in order:
                ids = as_xp(torch.randint(3, vocab, (1, n), generator=g))
                pos = as_xp(torch.arange(context, context + n)[None])
                start = time.perf_counter()
                hidden, cos, sin = backend.run(plan.embed, ids, pos)
                masks = MaskCache(backend, valid[:, : context + n], backend.dtype)
                hidden = backend.run_layers(cache, plan.layers, hidden, cos, sin, masks)
                mid = time.perf_counter()
                head_logits(backend, hidden)
                end = time.perf_counter()
                cache.truncate(context)
                if r:
                    samples[n].append((mid - start, end - mid))
    return {
        n: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v))
        for n, v in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--context", type=int, default=256, help="tokens already in the cache (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per size (default: %(default)s)")
    parser.add_argument(
        "--backends", default="torch,onnx", help="comma-separated: torch, onnx (default: %(default)s)"
    )
    parser.add_argument(
        "--isas",
        default="best",
        help="kernel targets the torch backend runs: best (this CPU's best), all (every one it runs but the "
        "portable C), or a "
        "comma-separated list such as avx512,avx2 (default: %(default)s)",
    )
    parser.add_argument("--passes", default="", help="the Program's pipeline (default: dense)")
    args = parser.parse_args()
    every = [i for i in kernels.isas() if i != "generic"] or ["generic"]  # portable C: for tests, not timing
    isas = kernels.isas()[:1] if args.isas == "best" else every if args.isas == "all" else None
    if isas is None:
        isas = tuple(i.strip() for i in args.isas.split(",") if i.strip())
        if not set(isas) <= set(kernels.isas()):
            parser.error(f"--isas: this machine runs {', '.join(kernels.isas())}, not {args.isas}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - {"torch", "onnx"})
    if unknown:
        parser.error(f"unknown backends {unknown}; choose from torch, onnx")

    model, _ = effx.models.load(args.model)
    program = effx.transform(model, args.passes)
    layer_bytes, head_bytes = step_bytes(program)
    bandwidth = read_bandwidth()
    print(
        f"{args.model}: torch {torch.__version__}, {torch.get_num_threads()} threads; read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s; a step reads {layer_bytes / 1e6:.1f} MB of layer weights and "
        f"{head_bytes / 1e6:.1f} MB of head weights; context {args.context} tokens; {args.passes or 'dense'}"
    )
    print(kernels.describe())
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        if "torch" in backends:
            for isa in isas:
                runners[f"torch {isa}"] = (torch_backend(program), isa)
        if "onnx" in backends:
            from effx.exporters import onnx as exporter
            from effx.runtime import onnx as ort_runtime

            runners["onnx"] = (ort_runtime.load(exporter.export(program, Path(tmp) / "dense")), None)
        print(
            f"{'backend':14} {'tokens':>6} {'step ms':>9} {'layers ms':>10} {'head ms':>8} {'x 1 token':>10} "
            f"{'floor ms':>9} {'of floor':>9}"
        )
        for name, (backend, isa) in runners.items():
            with kernels.use(isa) if isa else contextlib.nullcontext():
                times = time_steps(backend, args.context, args.repeats, program.info.vocab_size)
            one = sum(times[1])
            floor = (layer_bytes + head_bytes) / bandwidth
            for n, (layers, head) in times.items():
                step = layers + head
                print(
                    f"{name:14} {n:>6} {step * 1e3:>9.2f} {layers * 1e3:>10.2f} {head * 1e3:>8.2f} "
                    f"{step / one:>9.2f}x {floor * 1e3:>9.2f} {floor / step:>9.2f}"
                )


if __name__ == "__main__":
    main()
