"""The effx-bench result schema: :func:`validate_result` checks a result, :func:`load_result` reads and
checks a file.

**Output schema** (``{"schema": "effx-bench", "version": 1}``; :func:`validate_result` checks it)::

    {"schema": "effx-bench", "version": 1, "created": ISO-8601 UTC time,
     "machine": {"cpu_count", "torch_threads", "platform", "processor", "python", "torch", "transformers",
                 "effx"},
     "model": {"name", "architecture", "num_layers", "hidden_size", "vocab_size", "dtype"},
     "settings": {"data", "prompts", "new_tokens", "repeats", "chat", "heldout_tokens", "seq_len",
                  "flops_context", "memory", "timing", "seconds",
                  "phases": {"prepare", "generate", "quality"} (seconds)},
     "configs": [{"name", "pipeline" (a pipeline string; "" for dense), "passes" (each pass's JSON),
                  "calibration" (null, or {"target", "agreement", "thresholds"}),
                  "metrics": {"decode_tok_s": {"median", "min", "max"}, "ttft_ms": {...},
                              "peak_rss_mb", "peak_rss_delta_mb", "weights_mb", "decode_mflops",
                              "prefill_mflops",
                              "agreement", "same_tokens", "rouge_l_dense", "rouge_l_reference" (null without
                              references), "bleu_dense", "bleu_reference" (corpus BLEU, 0-1; null
                              without references), "perplexity" (effx.quality.perplexity's; null when infinite:
                              some held-out token gets probability 0), "zero_prob_share", "stats": {pass-specific: "mean_layers",
                              "head_fallback_share", "draft_acceptance", "kept_share"},
                              "paths": {path: mean share of the generated tokens it produced}},
                  "ratios": {"speedup", "ttft_speedup", "flops", "weights", "peak_rss", "perplexity"}
                            (config / dense, except the speed-ups: dense time / config time;
                            perplexity null when infinite),
                  "samples": [{"prompt", "repeat", "ttft_ms", "decode_tok_s", "seconds" (TTFT + decode),
                               "peak_rss_mb", "peak_rss_delta_mb", "paths"}],
                  "outputs": [generated text per prompt, first repeat],
                  "per_prompt": [{"rouge_l_dense", "rouge_l_reference"} per prompt, first repeat]}]}

**Paths** are the cascade seed's "share of tokens per path": self-speculative decoding's ``accepted draft``
against ``full model``; lossy exits' ``exit at layer N`` (0-based, as passes name layers) against
``all L layers``; a reduced head's
``reduced head`` against ``full head (fallback)``. Each group sums to 1 per generation.
:func:`effx.bench.format_path_table` prints the seed's per-prompt table from them (time, ROUGE-L, shares).

``configs[0]`` is always the dense model (``"name": "dense"``, every ratio 1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import BenchDataError

SCHEMA = "effx-bench"
VERSION = 1

_NUMBER = (int, float)
_TOP = {
    "schema": str,
    "version": int,
    "created": str,
    "machine": dict,
    "model": dict,
    "settings": dict,
    "configs": list,
}
_MACHINE = ("cpu_count", "torch_threads", "platform", "processor", "python", "torch", "transformers", "effx")
_SETTINGS = (
    "phases",
    "data",
    "prompts",
    "new_tokens",
    "repeats",
    "chat",
    "heldout_tokens",
    "seq_len",
    "flops_context",
    "memory",
    "timing",
    "seconds",
)
_METRICS = {
    "peak_rss_mb": _NUMBER,
    "peak_rss_delta_mb": _NUMBER,
    "weights_mb": _NUMBER,
    "decode_mflops": _NUMBER,
    "prefill_mflops": _NUMBER,
    "agreement": _NUMBER,
    "same_tokens": _NUMBER,
    "rouge_l_dense": _NUMBER,
    "rouge_l_reference": (*_NUMBER, type(None)),
    "bleu_dense": _NUMBER,
    "bleu_reference": (*_NUMBER, type(None)),
    "perplexity": (*_NUMBER, type(None)),
    "zero_prob_share": _NUMBER,
    "stats": dict,
    "paths": dict,
}
_RATIOS = ("speedup", "ttft_speedup", "flops", "weights", "peak_rss", "perplexity")


def validate_result(data: Any) -> None:
    """Check that ``data`` follows the effx-bench schema (version 1); raise :class:`BenchDataError` naming
    the first key or type that does not."""

    def need(obj, key, types, where):
        if not isinstance(obj, dict) or key not in obj:
            raise BenchDataError(f"effx-bench result: {where} has no {key!r}")
        value = obj[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            raise BenchDataError(
                f"effx-bench result: {where}.{key} is {type(obj[key]).__name__}, not {types}"
            )
        return obj[key]

    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise BenchDataError(
            f"not an effx-bench result (schema {data.get('schema') if isinstance(data, dict) else None!r})"
        )
    if data.get("version") != VERSION:
        raise BenchDataError(
            f"effx-bench result version {data.get('version')!r}; this effx reads version {VERSION}"
        )
    for key, types in _TOP.items():
        need(data, key, types, "the result")
    for key in _MACHINE:
        if key not in data["machine"]:
            raise BenchDataError(f"effx-bench result: machine has no {key!r}")
    for key in _SETTINGS:
        if key not in data["settings"]:
            raise BenchDataError(f"effx-bench result: settings has no {key!r}")
    if not data["configs"] or data["configs"][0].get("name") != "dense":
        raise BenchDataError("effx-bench result: configs must start with the dense model")
    for n, c in enumerate(data["configs"]):
        where = f"configs[{n}]"
        need(c, "name", str, where)
        need(c, "pipeline", str, where)
        need(c, "passes", list, where)
        need(c, "calibration", (dict, type(None)), where)
        need(c, "samples", list, where)
        need(c, "outputs", list, where)
        for k, sample in enumerate(c["samples"]):
            for key, types in (("prompt", int), ("seconds", _NUMBER), ("paths", dict)):
                need(sample, key, types, f"{where}.samples[{k}]")
        for k, quality in enumerate(need(c, "per_prompt", list, where)):
            need(quality, "rouge_l_dense", _NUMBER, f"{where}.per_prompt[{k}]")
            need(quality, "rouge_l_reference", (*_NUMBER, type(None)), f"{where}.per_prompt[{k}]")
        metrics = need(c, "metrics", dict, where)
        for key in ("decode_tok_s", "ttft_ms"):
            spread = need(metrics, key, dict, f"{where}.metrics")
            for part in ("median", "min", "max"):
                need(spread, part, _NUMBER, f"{where}.metrics.{key}")
        for key, types in _METRICS.items():
            need(metrics, key, types, f"{where}.metrics")
        ratios = need(c, "ratios", dict, where)
        for key in _RATIOS:
            types = (*_NUMBER, type(None)) if key == "perplexity" else _NUMBER
            need(ratios, key, types, f"{where}.ratios")


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a result file written by :func:`write_outputs`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BenchDataError(f"{path}: cannot be read as JSON: {e}") from e
    validate_result(data)
    return data
