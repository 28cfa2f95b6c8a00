"""Helpers shared by the benchmark scripts: timing a Program over a prompt set; exit heads, vocabulary
rankings and neuron profiles made once and cached."""

from __future__ import annotations

import statistics
import time

import torch

import effx
from effx.data import pydoc_texts
from effx.models import cache_dir


def run_prompts(fn, prompts):
    """Call ``fn(ids, mask)`` on each prompt; returns (new tokens of row 0 per prompt, total seconds)."""
    outs, secs = [], []
    for ids, mask in prompts:
        start = time.perf_counter()
        out = fn(ids, mask)
        secs.append(time.perf_counter() - start)
        outs.append(out[0, ids.shape[1] :])
    return outs, sum(secs)


def same(outs, refs) -> bool:
    return all(torch.equal(a, b) for a, b in zip(outs, refs, strict=True))


def token_match(outs, refs) -> float:
    """Share of generated positions where two runs emitted the same token."""
    hits = sum(int((a == b).sum()) for a, b in zip(outs, refs, strict=True))
    return hits / sum(r.numel() for r in refs)


def median_ms(fn, *args, repeats: int = 30) -> float:
    times = []
    with torch.inference_mode():
        fn(*args)
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def exit_heads(model_name: str, dense, tokenizer, layers, tokens: int):
    """Path of trained exit heads for ``layers``: trained once on pydoc calibration text, then cached."""
    path = cache_dir() / "exit_heads" / f"{model_name}-{'-'.join(map(str, layers))}-{tokens}.safetensors"
    if not path.is_file():
        start = time.perf_counter()
        result = effx.train_exit_heads(
            dense, pydoc_texts("calib"), tokenizer, layers=list(layers), max_tokens=tokens, path=path
        )
        kl = ", ".join(f"{e}: {result['kl_before'][e]:.2f}->{result['kl_after'][e]:.2f}" for e in layers)
        print(f"trained exit heads in {time.perf_counter() - start:.0f} s (KL per token {kl})", flush=True)
    return path


def vocab_file(model_name: str, dense, tok, prompts: int) -> str:
    """A vocabulary ranking from the model's own generations on ``prompts`` pydoc-based prompts plus pydoc
    calibration text, made once and cached."""
    path = cache_dir() / "vocab" / f"{model_name}-gen{prompts}.safetensors"
    if not path.is_file():
        asks = [f"Explain this in simple words:\n{t[:400]}" for t in pydoc_texts("calib")[:prompts]]
        generated = effx.calibrate_vocab(tok, asks, program=dense, max_new_tokens=48, progress=True)
        text = effx.calibrate_vocab(tok, pydoc_texts("calib"))
        (generated + text).save(path, dense.info)
    return str(path)


def neuron_profile(model_name: str, dense, tok, tokens: int) -> str:
    """A neuron profile of ``dense`` on ``tokens`` tokens of pydoc calibration text, made once and cached."""
    path = cache_dir() / "neurons" / f"{model_name}-pydoc-{tokens}.safetensors"
    if not path.is_file():
        start = time.perf_counter()
        effx.profile_neurons(
            dense, pydoc_texts("calib"), tok, path=path, data="pydoc calib", max_tokens=tokens, progress=True
        )
        print(f"profiled neurons in {time.perf_counter() - start:.0f} s", flush=True)
    return str(path)
