"""effx ONNX artifacts on every execution provider ONNX Runtime offers on a machine: the same tokens as the
torch backend, and the speed against a plain single-graph ``torch.onnx`` export.

Two steps, so that the second runs where torch and the model are not (a GPU machine with onnxruntime-gpu):

    python benchmarks/onnx_providers.py prepare DIR   # torch: the artifacts and the torch backend's tokens
    python benchmarks/onnx_providers.py check DIR     # numpy + onnxruntime (+ effx.runtime.onnx) only

``prepare`` writes into DIR:

* ``tiny/<name>/``: the artifacts of ``tests/test_onnx.py`` (a 4-layer random model, dense and with each
  pass), and ``tiny/expected.json``: the torch backend's tokens and runtime decisions (exit depths, drafts,
  fallbacks, kept tokens) on left-padded batches of 1 to 4 prompts;
* ``shaped.tar.gz``: SmolLM2-135M's architecture with each weight tensor one constant, as an effx dense artifact and as
  a single-graph ``torch.onnx`` export. For timing only: constants compress to almost nothing, so the pair
  travels where 540 MB of real weights cannot, and a matrix product takes as long on them as on weights.

``check`` runs, on each provider available (CPU; CUDA when onnxruntime-gpu and a GPU are there): every tiny
artifact against ``expected.json`` (tokens and decisions); which provider ``load()`` picks by default; then
greedy decoding tok/s of the single graph and of effx's dense artifact on the SmolLM2-shaped pair (its
cache bound where the session runs, as ``generate`` does, and in host arrays), timed interleaved in one
run. It exits 1 when any tokens or decisions differ.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

CASES = ([5], [7, 3], [4, 12, 6, 2], [9, 9, 1])
NEW = 9


def single_generate(sess, info, ids: np.ndarray, new: int) -> np.ndarray:
    """Greedy decoding with a single-graph export (batch 1, no padding), as a user would write it; ``info``
    holds ``num_layers``, ``num_kv_heads`` and ``head_dim`` (attributes or keys)."""
    get = info.get if isinstance(info, dict) else lambda k: getattr(info, k)
    shape = (get("num_layers"), ids.shape[0], get("num_kv_heads"), 0, get("head_dim"))
    past_k = past_v = np.zeros(shape, np.float32)
    x, pos = ids, np.arange(ids.shape[1])[None]
    out = []
    for _ in range(new):
        mask = np.ones((1, past_k.shape[3] + x.shape[1]), np.int64)
        feeds = dict(input_ids=x, attention_mask=mask, position_ids=pos, past_k=past_k, past_v=past_v)
        logits, past_k, past_v = sess.run(None, feeds)
        token = logits.argmax(-1)
        out.append(token)
        x, pos = token[:, None], pos[:, -1:] + 1
    return np.concatenate([ids, np.stack(out, 1)], 1)


# -- prepare (torch) --------------------------------------------------------------------------------------


def prepare(out: Path) -> None:
    import torch
    from onnx_runtime import single_graph  # beside this script

    import effx
    from effx.exporters import onnx as exporter
    from effx.testing import PARITY_PASSES as PASSES
    from effx.testing import TINY_VOCAB as V
    from effx.testing import left_padded_batch, tiny_model

    model = tiny_model("llama", layers=4, seed=3)  # the model of tests/test_onnx.py's pass artifacts
    vocab = out / "vocab.json"
    out.mkdir(parents=True, exist_ok=True)
    vocab.write_text(json.dumps({"ids": list(range(3, 60))}))
    expected = {}
    for name, passes in {"dense": lambda v: [], **PASSES}.items():
        program = effx.transform(model, passes(str(vocab)))
        exporter.export(program, out / "tiny" / name, progress=False)
        runs = []
        for lengths in CASES:
            ids, mask = left_padded_batch(lengths, V, seed=len(lengths) + sum(lengths))
            stats: dict = {}
            ref = program.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[], stats=stats)
            runs.append({"ids": ids.tolist(), "mask": mask.tolist(), "tokens": ref.tolist(), "stats": stats})
        expected[name] = runs
        print(f"tiny/{name}: exported, torch tokens recorded", flush=True)
    (out / "tiny" / "expected.json").write_text(json.dumps(expected))

    model, _ = effx.models.load("smollm2-135m")
    with torch.no_grad():  # a constant per tensor: no two alike, so none are stored or mapped once
        for i, p in enumerate(model.parameters()):
            p.fill_((i + 1) * 1e-4)
    dense = effx.transform(model)
    shaped = out / "shaped"
    exporter.export(dense, shaped / "effx", progress=True)
    (shaped / "single").mkdir(parents=True)
    print("single-graph torch.onnx export of the SmolLM2 shape (about 80 s)", flush=True)
    single_graph(model, dense.info, shaped / "single" / "model.onnx")
    with tarfile.open(out / "shaped.tar.gz", "w:gz", compresslevel=1) as tar:
        tar.add(shaped, arcname="shaped")
    shutil.rmtree(shaped)
    vocab.unlink()
    print(f"wrote {out}", flush=True)


# -- check (numpy + onnxruntime) ----------------------------------------------------------------------------


def _same_stats(a: dict, b: dict) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def _providers() -> dict:
    """``{label: providers}``: CPU; with CUDA, what ``load()`` picks by default and CUDA with ONNX Runtime's
    own default options."""
    import onnxruntime as ort

    from effx.runtime import onnx as rt

    out = {"CPU": ["CPUExecutionProvider"]}
    if "CUDAExecutionProvider" in ort.get_available_providers():
        out["CUDA"] = rt.default_providers()
        out["CUDA (ORT options)"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return out


def check(root: Path, new_tokens: int, prompt: int, repeats: int) -> int:
    import onnxruntime as ort

    from effx.runtime import onnx as rt

    print(f"onnxruntime {ort.__version__}: available providers {ort.get_available_providers()}")
    expected = json.loads((root / "tiny" / "expected.json").read_text())
    gen = rt.load(root / "tiny" / "dense")
    print(f"load() default: {next(iter(gen.sessions.values())).get_providers()}")
    failures = 0
    for label, providers in _providers().items():
        for name, runs in expected.items():
            gen = rt.load(root / "tiny" / name, providers=providers)
            same_tokens = same_stats = 0
            for run in runs:
                stats: dict = {}
                tokens = gen.generate(
                    np.array(run["ids"]),
                    np.array(run["mask"]),
                    max_new_tokens=NEW,
                    eos_token_id=[],
                    stats=stats,
                )
                same_tokens += tokens.tolist() == run["tokens"]
                same_stats += _same_stats(stats, run["stats"])
            ok = same_tokens == same_stats == len(runs)
            failures += not ok
            print(
                f"{label:<24} {name:<18} tokens {same_tokens}/{len(runs)}  decisions {same_stats}/{len(runs)}"
                f"  {'ok' if ok else 'DIFFERENT'}",
                flush=True,
            )

    archive = root / "shaped.tar.gz"
    if archive.is_file():
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        _time_shaped(root / "shaped", new_tokens, prompt, repeats)
    return 1 if failures else 0


def _time_shaped(shaped: Path, new: int, prompt: int, repeats: int) -> None:
    import onnxruntime as ort

    from effx.runtime import onnx as rt

    info = json.loads((shaped / "effx" / "plan.json").read_text())["plan"]["model"]
    ids = np.random.default_rng(0).integers(3, 1000, (1, prompt))
    print(
        f"\nSmolLM2-shaped (constant weights), batch 1, {prompt} prompt tokens + {new} new, median of {repeats}"
    )
    print(
        f"{'provider':<10} {'single graph tok/s':>18} {'effx dense tok/s':>16} {'effx / single':>13}  host cache"
    )
    for label, providers in _providers().items():
        if label not in ("CPU", "CUDA"):
            continue
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        single = ort.InferenceSession(str(shaped / "single" / "model.onnx"), opts, providers=providers)
        gen = rt.load(shaped / "effx", providers=providers)
        host = rt.load(shaped / "effx", providers=providers)
        host.bind_cache = False  # the cache in host arrays, copied to the device and back every step
        rows = {
            "single": lambda s=single: single_generate(s, info, ids, new),
            "effx": lambda g=gen: g.generate(ids, max_new_tokens=new, eos_token_id=[]),
            "host": lambda g=host: g.generate(ids, max_new_tokens=new, eos_token_id=[]),
        }
        times: dict = {k: [] for k in rows}
        for f in rows.values():
            f()  # warm-up: first runs allocate and (on CUDA) pick kernels
        order = list(rows)
        for r in range(repeats):
            for k in order[r % 3 :] + order[: r % 3]:
                t = time.perf_counter()
                rows[k]()
                times[k].append(time.perf_counter() - t)
        s, e, h = (statistics.median(times[k]) for k in rows)
        print(f"{label:<10} {new / s:18.1f} {new / e:16.1f} {s / e:13.2f}  {new / h:.1f} tok/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="export the artifacts and record the torch backend's tokens (torch)")
    p.add_argument("dir", type=Path)
    c = sub.add_parser("check", help="run them on every available provider (numpy + onnxruntime only)")
    c.add_argument("dir", type=Path)
    c.add_argument("--new-tokens", type=int, default=64)
    c.add_argument("--prompt", type=int, default=32, help="prompt tokens of the timing rows")
    c.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.dir)
    else:
        sys.exit(check(args.dir, args.new_tokens, args.prompt, args.repeats))


if __name__ == "__main__":
    main()
