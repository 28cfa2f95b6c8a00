"""effx's local lm-eval tasks on SmolLM2: lm-eval's own HF model, the dense Program, two pipelines and an
ONNX artifact, in one run, with effx's run-time decisions beside lm-eval's metrics.

    python benchmarks/harness.py                  # --limit 20 documents per task, batch 4
    python benchmarks/harness.py --limit 50 --no-onnx

Prints a markdown table: each row's teacher-forced agreement with the dense Program (held-out pydoc text,
``effx.calibrate.agreement``), each task's metric, the seconds the row took, and what the runtime decided
(exit depths, accepted drafts). The dense rows must agree with HF's (same weights, float32).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

import effx
from effx.calibrate import agreement
from effx.data import pydoc_texts
from effx.harness import TASKS_DIR, EffxLM, format_stats

COLUMNS = [
    ("effx_aclsum_title", "acc,none", "title acc"),
    ("effx_aclsum_title", "acc_norm,none", "title acc_norm"),
    ("effx_aclsum_challenge", "rougeL,none", "challenge ROUGE-L"),
    ("effx_pydoc", "word_perplexity,none", "pydoc word ppl"),
    ("effx_pydoc", "bits_per_byte,none", "pydoc bits/byte"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=20, help="documents per task (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="requests per batch (default: %(default)s)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX artifact row")
    parser.add_argument("--no-hf", action="store_true", help="skip lm-eval's HF model row")
    args = parser.parse_args()

    tasks = sorted({c[0] for c in COLUMNS})
    manager = TaskManager(include_path=[str(TASKS_DIR)], verbosity="ERROR")
    rows = []

    def run(name, lm, stats=None, agree=""):
        start = time.perf_counter()
        results = simple_evaluate(model=lm, tasks=tasks, limit=args.limit, task_manager=manager, verbosity="ERROR")
        seconds = time.perf_counter() - start
        rows.append((name, results["results"], seconds, stats() if stats else "", agree))
        print(f"[lm_eval] {name}: {seconds:.0f} s", flush=True)

    if not args.no_hf:
        from lm_eval.models.huggingface import HFLM

        directory = effx.models.resolve("smollm2-135m")
        run("HF (lm-eval's hf model)", HFLM(pretrained=str(directory), device="cpu", dtype="float32", batch_size=args.batch_size))
    _, tokenizer = effx.models.load("smollm2-135m")
    for name, passes in (
        ("effx dense (torch)", ""),
        ("effx early-exit{layers=10,20 thresholds=0.99}", "early-exit{layers=10,20 thresholds=0.99}"),
        ("effx early-exit{layers=10,20 thresholds=0.9}", "early-exit{layers=10,20 thresholds=0.9}"),
        ("effx prompt-lookup (lossless)", "prompt-lookup"),
    ):
        lm = EffxLM(model="smollm2-135m", passes=passes, batch_size=args.batch_size)
        # teacher-forced agreement with the dense Program's greedy tokens on held-out pydoc text
        agree = agreement(lm.program, pydoc_texts("heldout"), tokenizer, max_tokens=2048)[0]
        run(name, lm, lambda lm=lm: format_stats(lm.stats()), f"{agree:.3f}")
    if not args.no_onnx:
        from effx.exporters import onnx as exporter

        model, tokenizer = effx.models.load("smollm2-135m")
        with tempfile.TemporaryDirectory() as out:
            exporter.export(effx.transform(model), out, tokenizer=tokenizer)
            lm = EffxLM(artifact=out, batch_size=args.batch_size)
            run("effx dense (ONNX artifact)", lm, lambda: format_stats(lm.stats()))

    print(f"\n{args.limit} documents per task, batch {args.batch_size}, SmolLM2-135M-Instruct float32\n")
    print("| row | agreement | " + " | ".join(c[2] for c in COLUMNS) + " | seconds | effx's decisions |")
    print("|---" * (len(COLUMNS) + 4) + "|")
    for name, results, seconds, stats, agree in rows:
        values = [results.get(task, {}).get(key) for task, key, _ in COLUMNS]
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in values]
        print(f"| {name} | {agree} | " + " | ".join(cells) + f" | {seconds:.0f} | {stats} |")


if __name__ == "__main__":
    main()
