"""``effx bench``: speed, FLOPs and quality of pass pipelines against the dense model, in one run.

Every technique in effx trades quality for speed; this module measures that trade on a model and data the
user chooses, the same way for every pass:

    configs = expand_configs("neuron-mask{keep=0.5 profile=p.safetensors layers=3,27}",
                             ["neuron-mask.keep=0.3:0.9:0.2"])
    result = run_bench(model, tokenizer, configs, load_samples("suite", 4), new_tokens=32)
    write_outputs(result, "results/")      # bench-<run>.json, bench-<run>.md, bench-<run>-pareto.png

**Sweeps.** ``parse_sweep("early-exit.thresholds=0.5:0.95:0.05")`` is ``<pass>.<field>=<values>``: a range
``start:stop:step`` (``stop`` included when the steps land on it) or a comma list ``0.3,0.5,0.7``. A field
that holds a tuple takes a tuple per value with ``/`` inside it (``token-drop.keep=0.75/0.5,0.5/0.3``); a
single number gives a 1-tuple (one threshold for every exit). A singular field name reaches its plural
field when only that exists (``early-exit.threshold`` sets ``thresholds``). Several sweeps form a grid.
Each configuration is the base pipeline with the swept fields set; a swept pass the pipeline lacks is
added with its defaults. Bad sweeps raise :class:`BenchConfigError` (a ``PassConfigError``) naming the
sweep and what is wrong: unknown pass or field, a malformed range, ``step <= 0``, an empty range, more
configurations than ``max_configs``, or a value the pass rejects.

**Measurement.** The dense Program and every configuration run in one process, interleaved: for every
repeat and prompt, all programs generate back to back (the order rotates from prompt to prompt), so
machine noise hits them alike; speed ratios are the median of these paired ratios. Per generation
(batch 1, greedy, exactly ``new_tokens`` tokens: end-of-sequence ids do not stop it, so every program
decodes the same number of tokens; texts are cut at the first end-of-sequence token for ROUGE):

* time to first token (prefill + the first token, timed with ``on_token``) and decode tokens/s (the
  remaining ``new_tokens - 1`` tokens over the time after the first);
* peak memory: the process's peak resident set size during the call (Linux ``VmHWM``, reset before each
  call through ``/proc/self/clear_refs``; where that is unavailable, ``ru_maxrss``, the peak over the
  process's life, and ``settings.memory`` says so), and ``peak_rss_delta_mb``, how far that peak rose
  above the resident size just before the call (activations and the KV cache; the allocator reuses freed
  memory, so this is a lower bound). Every program is resident at once, so the peaks differ little
  between programs; ``weights_mb`` (:func:`effx.flops.weight_bytes`) is what each Program itself holds.
  Python's ``tracemalloc`` is not used: it does not see torch's tensor allocations.

Per configuration, once: FLOPs per decoded token at the mean prompt length plus half the new tokens
(:func:`effx.flops.decode_flops`: every exit stage counted, a reduced head's fallback not) and of the
prefill; quality against the dense model on held-out text: teacher-forced token agreement (the share of
positions where the program's greedy token, as it decodes, including early exits at their thresholds,
equals the dense one's) and perplexity (as :func:`effx.quality.perplexity` defines it, from the same
forward pass; it scores the final head, so for lossy exits agreement is the measure); on the generated
texts, ROUGE-L (mean over prompts) and corpus BLEU (:func:`effx.quality.bleu`, sacrebleu) against the dense
texts always and against references where the data has them, and the share of generated positions with
the dense token. A configuration identical to dense reports agreement, ROUGE-L and BLEU of exactly 1.0.

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
                              without references), "perplexity" (null when infinite: some held-out token gets
                              probability 0), "zero_prob_share", "stats": {pass-specific: "mean_layers",
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
:func:`format_path_table` prints the seed's per-prompt table from them (time, ROUGE-L, shares).

``configs[0]`` is always the dense model (``"name": "dense"``, every ratio 1).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import json
import logging
import math
import os
import platform
import re
import resource
import statistics
import sys
import textwrap
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EffxError, PassConfigError

__all__ = [
    "MAX_CONFIGS",
    "SCHEMA",
    "VERSION",
    "BenchConfig",
    "BenchConfigError",
    "BenchDataError",
    "Sample",
    "Sweep",
    "Timed",
    "data_choices",
    "default_configs",
    "expand_configs",
    "first_outputs",
    "exit_heads",
    "format_path_table",
    "format_table",
    "interleave",
    "load_result",
    "load_samples",
    "neuron_profile",
    "parse_sweep",
    "pareto_front",
    "pipeline_string",
    "plot_pareto",
    "run_bench",
    "timed",
    "total_seconds",
    "validate_result",
    "vocab_file",
    "write_outputs",
]

SCHEMA = "effx-bench"
VERSION = 1
MAX_CONFIGS = 64

logger = logging.getLogger(__name__)


class BenchConfigError(PassConfigError):
    """A sweep or a bench setting is malformed (the message names the sweep and what is wrong)."""


class BenchDataError(EffxError, ValueError):
    """Benchmark data cannot be loaded (missing file, no "prompt" field, no rows), or a result file does not
    follow the effx-bench schema."""


# -- sweeps and configurations --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """One swept field: ``values`` are already parsed (numbers, strings, tuples)."""

    pass_name: str
    field: str
    values: tuple[Any, ...]
    text: str


@dataclass(frozen=True)
class BenchConfig:
    """A configuration to measure: a name, its passes, and optionally an exit calibration target (the
    Program is calibrated with :meth:`effx.Program.calibrate` before it is measured)."""

    name: str
    passes: tuple = ()
    calibrate: float | None = None

    @property
    def pipeline(self) -> str:
        return pipeline_string(self.passes)


_SWEEP = re.compile(r"\s*([A-Za-z][\w-]*)\.([A-Za-z_]\w*)\s*=\s*(.*?)\s*$", re.S)


def _pass_fields(pass_name: str, sweep_text: str):
    from .passes import get_pass

    try:
        klass = get_pass(pass_name)
    except PassConfigError as e:
        raise BenchConfigError(f"sweep {sweep_text!r}: {e}") from None
    return klass, {f.name: f for f in dataclasses.fields(klass)}


def _number(text: str, what: str, sweep_text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise BenchConfigError(f"sweep {sweep_text!r}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise BenchConfigError(f"sweep {sweep_text!r}: {what} {text!r} is not a finite number")
    return value


def _range_values(spec: str, sweep_text: str, max_values: int) -> tuple:
    parts = [p.strip() for p in spec.split(":")]
    if len(parts) != 3 or not all(parts):
        raise BenchConfigError(
            f"sweep {sweep_text!r}: a range is start:stop:step with three numbers, e.g. 0.5:0.95:0.05; "
            f"got {spec!r}"
        )
    start, stop, step = (
        _number(p, w, sweep_text) for p, w in zip(parts, ("start", "stop", "step"), strict=True)
    )
    if step <= 0:
        raise BenchConfigError(f"sweep {sweep_text!r}: step must be > 0, got {step}")
    if stop < start:
        raise BenchConfigError(
            f"sweep {sweep_text!r}: the range is empty: stop {stop} is below start {start}"
        )
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > max_values:
        raise BenchConfigError(
            f"sweep {sweep_text!r}: {count} values, more than the {max_values} configurations allowed; "
            "use a larger step"
        )
    if all(isinstance(v, int) for v in (start, stop, step)):
        return tuple(start + i * step for i in range(count))
    return tuple(round(start + i * step, 10) for i in range(count))


def _list_value(item: str, sweep_text: str, is_tuple: bool):
    from .passes.base import _parse_scalar

    if not item.strip():
        raise BenchConfigError(f"sweep {sweep_text!r}: an empty value in the list")
    if "/" in item and is_tuple:
        parts = item.split("/")
        if not all(p.strip() for p in parts):
            raise BenchConfigError(f"sweep {sweep_text!r}: an empty element in the tuple {item!r}")
        return tuple(_parse_scalar(p) for p in parts)
    return _parse_scalar(item)


def _is_tuple_field(klass, field: str) -> bool:
    hint = typing.get_type_hints(klass).get(field)
    return typing.get_origin(hint) is tuple or any(
        typing.get_origin(a) is tuple for a in typing.get_args(hint)
    )


def parse_sweep(text: str, *, max_configs: int = MAX_CONFIGS) -> Sweep:
    """Parse ``"<pass>.<field>=<start:stop:step | v1,v2,...>"`` into a :class:`Sweep`.

    >>> parse_sweep("neuron-mask.keep=0.3,0.5,0.7").values
    (0.3, 0.5, 0.7)
    """
    if not isinstance(text, str):
        raise BenchConfigError(f"a sweep is a string, got {type(text).__name__}")
    m = _SWEEP.fullmatch(text)
    if not m:
        raise BenchConfigError(
            f"sweep {text!r} is not of the form <pass>.<field>=<values>, "
            "e.g. early-exit.thresholds=0.5:0.95:0.05 or neuron-mask.keep=0.3,0.5,0.7"
        )
    pass_name, field, spec = m.groups()
    klass, fields = _pass_fields(pass_name, text)
    if field not in fields:
        if field + "s" in fields:  # early-exit.threshold -> thresholds
            field += "s"
        else:
            raise BenchConfigError(
                f"sweep {text!r}: pass {pass_name!r} has no field {field!r}; its fields are {sorted(fields)}"
            )
    if not spec:
        raise BenchConfigError(f"sweep {text!r}: no values after '='")
    if ":" in spec:
        values = _range_values(spec, text, max_configs)
    else:
        values = tuple(_list_value(v, text, _is_tuple_field(klass, field)) for v in spec.split(","))
        if len(values) > max_configs:
            raise BenchConfigError(
                f"sweep {text!r}: {len(values)} values, more than the {max_configs} configurations allowed"
            )
    if len(set(map(repr, values))) != len(values):
        raise BenchConfigError(f"sweep {text!r}: values repeat: {list(values)}")
    return Sweep(pass_name, field, values, text)


def _format_value(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_format_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return str(value)


def pipeline_string(passes: Sequence) -> str:
    """The pipeline string of ``passes`` (fields at their default left out); :func:`effx.parse_pipeline`
    reads it back to equal passes."""
    parts = []
    for p in passes:
        args = []
        for f in dataclasses.fields(p):
            value = getattr(p, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if value != default:
                args.append(f"{f.name}={_format_value(value)}")
        parts.append(f"{p.name}{{{' '.join(args)}}}" if args else p.name)
    return ", ".join(parts)


def _with_fields(passes: list, assigned: list[tuple[Sweep, Any]]) -> list:
    """``passes`` with the swept fields set: all fields of one pass at once, so a configuration is
    validated as a whole (``neuron-mask.keep`` with ``neuron-mask.score=random`` needs no profile)."""
    from .passes.base import _construct

    out = list(passes)
    by_pass: dict[str, list[tuple[Sweep, Any]]] = {}
    for sweep, value in assigned:
        by_pass.setdefault(sweep.pass_name, []).append((sweep, value))
    for pass_name, items in by_pass.items():
        klass, _ = _pass_fields(pass_name, items[0][0].text)
        index = next((i for i, p in enumerate(out) if p.name == pass_name), None)
        base = {} if index is None else out[index].config()
        try:
            new = _construct(klass, {**base, **{sw.field: v for sw, v in items}})
        except PassConfigError as e:
            texts = ", ".join(repr(sw.text) for sw, _ in items)
            shown = " ".join(f"{pass_name}.{sw.field}={_format_value(v)}" for sw, v in items)
            hint = (
                f" ({pass_name} is not in the pipeline, so it was added with its defaults: give it in "
                "--passes with the arguments it needs)"
                if index is None
                else ""
            )
            raise BenchConfigError(f"sweep {texts}: {shown}: {e}{hint}") from None
        if index is None:
            out.append(new)
        else:
            out[index] = new
    return out


def expand_configs(
    base: str | Sequence = "",
    sweeps: Sequence[str | Sweep] = (),
    *,
    calibrate: float | None = None,
    max_configs: int = MAX_CONFIGS,
) -> list[BenchConfig]:
    """The configurations of ``base`` (a pipeline string or passes) under ``sweeps`` (their grid). Without
    sweeps, one configuration: the base pipeline itself. ``calibrate`` is the exit calibration target of
    every configuration with an ``early-exit`` pass (its thresholds are then chosen by calibration, so
    sweeping them as well is an error)."""
    from .passes import parse_pipeline

    if calibrate is not None and (
        isinstance(calibrate, bool) or not isinstance(calibrate, (int, float)) or not 0 < calibrate <= 1
    ):
        raise BenchConfigError(f"the calibration target is an agreement in (0, 1], got {calibrate!r}")
    passes = parse_pipeline(base) if isinstance(base, str) else list(base)
    parsed = [s if isinstance(s, Sweep) else parse_sweep(s, max_configs=max_configs) for s in sweeps]
    seen = set()
    for s in parsed:
        if (s.pass_name, s.field) in seen:
            raise BenchConfigError(f"sweep {s.text!r}: {s.pass_name}.{s.field} is swept twice")
        seen.add((s.pass_name, s.field))
        if calibrate is not None and (s.pass_name, s.field) == ("early-exit", "thresholds"):
            raise BenchConfigError(
                f"sweep {s.text!r}: calibration (target {calibrate}) chooses the exit thresholds; "
                "sweep them or calibrate, not both"
            )
    total = math.prod(len(s.values) for s in parsed)
    if total > max_configs:
        sizes = " x ".join(str(len(s.values)) for s in parsed)
        raise BenchConfigError(
            f"the sweeps make {total} configurations ({sizes}), more than max_configs={max_configs}"
        )
    if not parsed:
        grid = [("", passes)]
    else:
        grid = []
        for combo in itertools.product(*(s.values for s in parsed)):
            name = " ".join(
                f"{s.pass_name}.{s.field}={_format_value(v)}" for s, v in zip(parsed, combo, strict=True)
            )
            grid.append((name, _with_fields(passes, list(zip(parsed, combo, strict=True)))))
    configs = []
    for name, current in grid:
        exits = any(p.name == "early-exit" for p in current)
        target = calibrate if exits else None
        name = name or pipeline_string(current) or "dense (pipeline)"
        configs.append(
            BenchConfig(name if target is None else f"{name}, calibrated {target}", tuple(current), target)
        )
    if calibrate is not None and all(c.calibrate is None for c in configs):
        raise BenchConfigError(
            f"a calibration target ({calibrate}) needs an early-exit pass in the pipeline or a sweep"
        )
    return configs


# -- cached artifacts that configurations need ----------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", str(name)).strip("_") or "model"


def exit_heads(model_name: str, dense, tokenizer, layers, tokens: int, *, progress: bool = True) -> Path:
    """Path of trained exit heads for ``layers``: trained once on pydoc calibration text, then cached under
    :func:`effx.models.cache_dir`."""
    from .data import pydoc_texts
    from .exit_heads import train_exit_heads
    from .models import cache_dir

    path = (
        cache_dir() / "exit_heads" / f"{_safe(model_name)}-{'-'.join(map(str, layers))}-{tokens}.safetensors"
    )
    if not path.is_file():
        start = time.perf_counter()
        result = train_exit_heads(
            dense,
            pydoc_texts("calib"),
            tokenizer,
            layers=list(layers),
            max_tokens=tokens,
            path=path,
            progress=progress,
        )
        kl = ", ".join(f"{e}: {result['kl_before'][e]:.2f}->{result['kl_after'][e]:.2f}" for e in layers)
        logger.info("trained exit heads in %.0f s (KL per token %s)", time.perf_counter() - start, kl)
    return path


def vocab_file(model_name: str, dense, tokenizer, prompts: int, *, progress: bool = True) -> str:
    """A vocabulary ranking from the model's own generations on ``prompts`` pydoc-based prompts plus pydoc
    calibration text, made once and cached."""
    from .data import pydoc_texts
    from .models import cache_dir
    from .vocab import calibrate_vocab

    path = cache_dir() / "vocab" / f"{_safe(model_name)}-gen{prompts}.safetensors"
    if not path.is_file():
        asks = [f"Explain this in simple words:\n{t[:400]}" for t in pydoc_texts("calib")[:prompts]]
        generated = calibrate_vocab(tokenizer, asks, program=dense, max_new_tokens=48, progress=progress)
        text = calibrate_vocab(tokenizer, pydoc_texts("calib"))
        (generated + text).save(path, dense.info)
    return str(path)


def neuron_profile(model_name: str, dense, tokenizer, tokens: int, *, progress: bool = True) -> str:
    """A neuron profile of ``dense`` on ``tokens`` tokens of pydoc calibration text, made once and cached."""
    from .data import pydoc_texts
    from .models import cache_dir
    from .neurons import profile_neurons

    path = cache_dir() / "neurons" / f"{_safe(model_name)}-pydoc-{tokens}.safetensors"
    if not path.is_file():
        start = time.perf_counter()
        profile_neurons(
            dense,
            pydoc_texts("calib"),
            tokenizer,
            path=path,
            data="pydoc calib",
            max_tokens=tokens,
            progress=progress,
        )
        logger.info("profiled neurons in %.0f s", time.perf_counter() - start)
    return str(path)


def default_configs(model_name: str, dense, tokenizer, *, progress: bool = True) -> list[BenchConfig]:
    """Every pass at the setting its README section measured on SmolLM2, placed by depth so that other
    models get the same shape (on a 30-layer model: exactly the documented layers):

    * ``neuron-mask`` static keep 0.5 in layers 10%..90% (3..27), profiled on 16k pydoc tokens;
    * ``vocab-reduce`` head, k = V/6 (8192), fallback 0.9, ranked from 16 of the model's generations;
    * ``token-drop`` before layers 4/30 and 12/30 of the depth, keep 0.75 then 0.5;
    * ``early-exit`` lossy after 1/3, 1/2, 2/3, 5/6 of the layers (10, 15, 20, 25) with trained heads
      (4k pydoc tokens), calibrated to 0.95 agreement;
    * the same exits with ``vocab-reduce`` exits k = V/24 (2048), adaptive, calibrated to 0.95.

    Profiles, vocabularies and heads are made once and cached (about 40 s, 60 s and 90 s on SmolLM2).
    """
    from .passes import EarlyExit, NeuronMask, TokenDrop, VocabReduce

    n, vocab = dense.info.num_layers, dense.info.vocab_size
    if n < 4:
        raise BenchConfigError(f"the default configurations need a model with at least 4 layers, it has {n}")

    def at(share: float, lo: int, hi: int) -> int:
        return min(hi, max(lo, round(n * share)))

    profile = neuron_profile(model_name, dense, tokenizer, 16384, progress=progress)
    ranking = vocab_file(model_name, dense, tokenizer, 16, progress=progress)
    exits = sorted({at(s, 0, n - 2) for s in (1 / 3, 1 / 2, 2 / 3, 5 / 6)})
    heads = str(exit_heads(model_name, dense, tokenizer, exits, 4096, progress=progress))
    drops = sorted({at(4 / 30, 1, n - 1), at(12 / 30, 1, n - 1)})
    keeps = (0.75, 0.5)[: len(drops)]
    mask_layers = (at(0.1, 0, n - 1), at(0.9, 0, n - 1))
    k_head, k_exit = max(1, vocab // 6), max(1, vocab // 24)
    early = EarlyExit(layers=tuple(exits), head="trained", heads=heads)
    exit_names = "/".join(map(str, exits))
    return [
        BenchConfig(
            f"neuron-mask static keep 0.5, layers {mask_layers[0]}..{mask_layers[1]}",
            (NeuronMask(keep=0.5, profile=profile, layers=mask_layers),),
        ),
        BenchConfig(
            f"vocab-reduce head k={k_head}, fallback 0.9",
            (VocabReduce(k=k_head, where="head", vocab=ranking, fallback=0.9),),
        ),
        BenchConfig(
            f"token-drop keep {'/'.join(map(str, keeps))} at layers {','.join(map(str, drops))}",
            (TokenDrop(at_layers=tuple(drops), keep=keeps),),
        ),
        BenchConfig(f"early-exit {exit_names} trained heads, calibrated 0.95", (early,), calibrate=0.95),
        BenchConfig(
            f"early-exit {exit_names} + vocab-reduce exits k={k_exit} adaptive, calibrated 0.95",
            (early, VocabReduce(k=k_exit, where="exits", schedule="adaptive")),
            calibrate=0.95,
        ),
    ]


# -- data ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """A prompt and, where the data has one, a reference answer."""

    prompt: str
    reference: str | None = None


def _load_file(path: Path) -> list[Sample]:
    suffix = path.suffix.lower()
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}.get(suffix)
    if builder is None:
        raise BenchDataError(f"{path}: unknown data format {suffix!r}; use .jsonl, .json, .csv or .txt")
    if not path.is_file():
        raise BenchDataError(f"{path}: no such file")
    from datasets import load_dataset

    try:
        rows = load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise BenchDataError(f"{path}: cannot be read as {builder}: {type(e).__name__}: {e}") from e
    if builder == "text":
        return [Sample(r["text"]) for r in rows if r["text"].strip()]
    columns = set(rows.column_names)
    if "prompt" not in columns:
        raise BenchDataError(
            f"{path}: needs a 'prompt' field (and optionally 'reference'); it has {sorted(columns)}"
        )
    has_ref = "reference" in columns
    return [
        Sample(str(r["prompt"]), (str(r["reference"]) if has_ref and r["reference"] is not None else None))
        for r in rows
        if r["prompt"] is not None and str(r["prompt"]).strip()
    ]


ACLSUM_PROMPT = (
    "Summarize this paper in three sentences: the challenge it addresses, its approach, and its outcome.\n\n"
    "Title: {title}\n\nAbstract: {abstract}"
)


def data_choices() -> list[str]:
    """The named data sets this install offers (a path to a .jsonl/.csv/.txt file works too)."""
    return ["suite", "pydoc", "aclsum"]


def load_samples(data: str, n: int) -> list[Sample]:
    """The first ``n`` samples of ``data``: ``"suite"`` (:data:`effx.data.PROMPTS`, chat instructions, with
    :data:`effx.data.REFERENCES` where a prompt has one honest answer), ``"pydoc"`` (summarize a held-out
    Python help topic, no references), ``"aclsum"`` (summarize an ACL paper of the test split from its
    title and abstract; the reference is its challenge, approach and outcome summaries), or a path: JSONL
    or CSV with a ``prompt`` field and an optional ``reference`` field, or a text file with one prompt per
    line, read through ``datasets.load_dataset``."""
    if not isinstance(n, int) or n < 1:
        raise BenchDataError(f"the number of prompts must be an integer >= 1, got {n!r}")
    if data == "suite":
        from .data import PROMPTS, REFERENCES

        samples = [Sample(p, REFERENCES.get(p)) for p in PROMPTS]
    elif data == "pydoc":
        from .data import pydoc_texts

        samples = [
            Sample(f"Summarize in two sentences:\n{t.strip()[:600]}")
            for t in pydoc_texts("heldout")
            if len(t) > 200
        ]
    elif data == "aclsum":
        from .data import aclsum

        # the test split; the prompt is the title and abstract, the reference the three aspect summaries
        samples = [
            Sample(ACLSUM_PROMPT.format(title=p["title"], abstract=p["abstract"]), p["summary"])
            for p in aclsum("test", n)
        ]
    else:
        path = Path(data)
        if path.suffix.lower() not in (".jsonl", ".json", ".csv", ".txt"):
            raise BenchDataError(
                f"unknown data {data!r}: use {', '.join(data_choices())} or a .jsonl/.csv/.txt file"
            )
        samples = _load_file(path)
    if not samples:
        raise BenchDataError(f"data {data!r} has no prompts")
    return samples[:n]


def _as_sample(item) -> Sample:
    """A :class:`Sample` from a Sample, a prompt string, or a dict with "prompt" and optional "reference"."""
    if isinstance(item, Sample):
        return item
    if isinstance(item, str):
        return Sample(item)
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        ref = item.get("reference")
        return Sample(item["prompt"], None if ref is None else str(ref))
    raise BenchDataError(f"a sample is a prompt string, a Sample or a dict with 'prompt'; got {item!r:.80}")


# -- measurement -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timed:
    """One timed call: what it returned, its wall time, and, when it was given an ``on_token`` callback,
    the time to the callback's first call (time to first token)."""

    output: Any
    seconds: float
    first_token_s: float | None = None


def timed(fn: Callable[..., Any], *args, on_token: bool = False, **kwargs) -> Timed:
    """``fn(*args, **kwargs)`` timed with ``time.perf_counter``. With ``on_token=True`` it also gets an
    ``on_token`` keyword (effx ``generate`` calls it for every token) and ``first_token_s`` is set."""
    stamps: list[float] = []
    if on_token:
        kwargs["on_token"] = lambda _tok: stamps.append(time.perf_counter())
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    end = time.perf_counter()
    return Timed(out, end - start, stamps[0] - start if stamps else None)


def interleave(
    runners: dict[str, Callable[..., Any]],
    inputs: Sequence[tuple],
    *,
    repeats: int = 1,
    on_token: bool = False,
    warmup: tuple | None = None,
    progress: bool = True,
    bar=None,
    desc: str = "timing",
) -> dict[str, list[list[Timed]]]:
    """Time every runner on every input the way ``effx bench`` does: for each repeat and input, all runners
    back to back (the order rotates from input to input and repeat to repeat, so no runner always goes
    first), so that machine noise hits them alike. ``runner(*input)`` is called; ``on_token`` as in
    :func:`timed`. ``warmup``: an input every runner is called on once, untimed, first (first calls allocate
    and pick kernels). Returns ``{name: [[Timed per repeat] per input]}``; see :func:`total_seconds` and
    :func:`first_outputs`. A progress bar counts the calls (``bar``: update this tqdm instead)."""
    if not isinstance(repeats, int) or repeats < 1:
        raise BenchConfigError(f"repeats must be an integer >= 1, got {repeats!r}")
    names = list(runners)
    m = len(names)
    own_bar = bar is None
    if own_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=m * len(inputs) * repeats, desc=desc, unit="call", disable=not progress)
    if warmup is not None:
        for name in names:
            runners[name](*warmup)
    out: dict[str, list[list[Timed]]] = {name: [[] for _ in inputs] for name in names}
    for r in range(repeats):
        for p, args in enumerate(inputs):
            for j in range(m):
                name = names[(p + r + j) % m]
                bar.set_postfix_str(f"repeat {r + 1}, input {p + 1}: {name[:40]}")
                out[name][p].append(timed(runners[name], *args, on_token=on_token))
                bar.update()
    if own_bar:
        bar.close()
    return out


def total_seconds(runs: list[list[Timed]]) -> float:
    """Seconds over all inputs, each input's median over its repeats."""
    return sum(statistics.median(t.seconds for t in per_input) for per_input in runs)


def first_outputs(runs: list[list[Timed]]) -> list[Any]:
    """What the runner returned for each input, first repeat."""
    return [per_input[0].output for per_input in runs]


def _rss_reset() -> bool:
    """Reset the peak-RSS counter (Linux); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"{field}:\s+(\d+)\s+kB", f.read())
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def _peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _rss_mb() -> float:
    rss = _status_mb("VmRSS")
    return _peak_rss_mb() if rss is None else rss


def _memory_method() -> str:
    if _rss_reset() and os.path.exists("/proc/self/status"):
        return "peak RSS per generate call (Linux VmHWM, reset through /proc/self/clear_refs)"
    return "ru_maxrss: the peak RSS over the process's life (no per-call reset on this platform)"


def _timed_generate(program, ids, mask, new_tokens: int, reset_rss: bool):
    """One generation: (new tokens [n], ttft seconds, decode seconds, peak RSS MB, its growth over the RSS
    before the call in MB, stats)."""
    stats: dict = {}
    if reset_rss:
        _rss_reset()
    before = _rss_mb()
    call = timed(
        program.generate,
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        eos_token_id=[],
        stats=stats,
        on_token=True,
    )
    peak = _peak_rss_mb()
    first = call.first_token_s
    return call.output[0, ids.shape[1] :], first, call.seconds - first, peak, peak - before, stats


def _pass_stats(stats_list: list[dict], prompt_lengths: list[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    depths = [d[0] for st in stats_list for d in st.get("exit_layers", [])]
    if depths:
        out["mean_layers"] = statistics.mean(depths)
    positions = sum(st.get("head_positions", 0) for st in stats_list)
    if positions:
        out["head_fallback_share"] = sum(st.get("head_fallbacks", 0) for st in stats_list) / positions
    drafted = sum(st.get("drafted", 0) for st in stats_list)
    if drafted:
        out["draft_acceptance"] = sum(st.get("accepted", 0) for st in stats_list) / drafted
    shares = []
    for st, n in zip(stats_list, prompt_lengths, strict=True):
        kept = st.get("kept_tokens")
        if kept:
            shares.append(kept[max(kept)][0] / n)
    if shares:
        out["kept_share"] = statistics.mean(shares)
    return out


def _paths(stats: dict, new_tokens: int, num_layers: int, reduced_head: bool = False) -> dict[str, float]:
    """Share of one generation's tokens each path produced, the cascade seed's "share of tokens per path":
    self-speculative decoding's accepted drafts against the tokens the full model gave; lossy exits' tokens
    by the layer they left after (0-based; the first token, from the prefill, goes through all of them); a
    reduced head's positions against those that fell back to the full head (``reduced_head`` without a
    fallback: all of them). Each group sums to 1; a program without any of these has one path,
    ``all N layers``."""
    paths: dict[str, float] = {}
    if "drafted" in stats:
        accepted = min(stats.get("accepted", 0), new_tokens) / new_tokens
        paths.update({"accepted draft": accepted, "full model": 1 - accepted})
    elif stats.get("exit_layers"):
        depths = [row[0] for row in stats["exit_layers"]]
        depths += [num_layers] * max(0, new_tokens - len(depths))
        for d in sorted(set(depths)):
            key = f"all {num_layers} layers" if d == num_layers else f"exit at layer {d - 1}"
            paths[key] = depths.count(d) / len(depths)
    else:
        paths[f"all {num_layers} layers"] = 1.0
    if stats.get("head_positions"):
        fallback = stats.get("head_fallbacks", 0) / stats["head_positions"]
        paths.update({"reduced head": 1 - fallback, "full head (fallback)": fallback})
    elif reduced_head:
        paths["reduced head"] = 1.0
    return paths


def _path_order(key: str) -> tuple:
    """Exits by depth, then the full depth, then the rest (heads, drafts) as they came."""
    if key.startswith("exit at layer "):
        return (0, int(key.rsplit(" ", 1)[1]))
    return (1, 0) if key.startswith("all ") else (2, 0)


def _mean_paths(per_sample: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted(dict.fromkeys(k for p in per_sample for k in p), key=_path_order)
    return {k: statistics.mean(p.get(k, 0.0) for p in per_sample) for k in keys}


def _teacher_forced(program, chunk):
    """For the second half of ``chunk``, teacher-forced, the way the program decodes: its greedy next token
    at each position, the summed negative log-likelihood of the true tokens, and how many true tokens it
    gives probability 0 (a reduced head that did not fall back scores ``-inf`` outside its subset).

    The first half is prefilled as a prompt (core neurons and dropped tokens are chosen on it), as in
    :func:`effx.quality.perplexity`, whose value ``exp(nll / tokens)`` this reproduces from the same
    forward pass (``tests/test_bench.py`` checks that), so agreement and perplexity cost one pass. Lossy
    exits give a position's token from the first exit whose confidence passes its threshold (the
    likelihood stays the final head's, as in ``perplexity``); such programs run over the whole chunk at once
    (their exits are decode-time decisions), so a TokenDrop in the same program is not applied there.
    """
    import torch

    from .calibrate import teacher_forced_exits
    from .quality import second_half_logits

    n = chunk.shape[1]
    half = n // 2
    target = chunk[0, half:]
    lossy = program.exits and program.plan.policy.get("early_exit", {}).get("mode", "lossy") == "lossy"
    if lossy:
        teacher, exits = teacher_forced_exits(program, chunk)
        true_logp = teacher[0, half - 1 : n - 1].gather(-1, target[:, None])[:, 0]
        tokens = teacher.argmax(-1)[0]
        decided = torch.zeros(n, dtype=torch.bool)
        for e, logits, conf in exits:
            leave = ~decided & (conf[0].float() >= program.exits[e].attrs["threshold"])
            tokens = torch.where(leave, logits.argmax(-1)[0], tokens)
            decided |= leave
        return tokens[half - 1 : n - 1], -float(true_logp.sum()), int(torch.isneginf(true_logp).sum())
    logits = second_half_logits(program, chunk)
    nll = float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
    impossible = int(torch.isneginf(logits.gather(-1, target[:, None])).sum())
    return logits.argmax(-1), nll, impossible


def _rouge(preds: list[str], refs: list[str]) -> float:
    """Mean ROUGE-L F1; identical texts score exactly 1.0 (also two empty ones, which the scorer gives 0)."""
    from .quality import rouge_l

    scores = [1.0 if p == r else rouge_l([p], [r]) for p, r in zip(preds, refs, strict=True)]
    return statistics.mean(scores)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _machine() -> dict[str, Any]:
    import torch
    import transformers

    from . import __version__

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "effx": __version__,
    }


def run_bench(
    model,
    tokenizer,
    configs: Sequence[BenchConfig],
    samples: Sequence[Sample | str],
    *,
    model_name: str = "",
    data: str = "",
    new_tokens: int = 32,
    repeats: int = 1,
    chat: bool = True,
    heldout: Sequence[str] | None = None,
    heldout_tokens: int = 2048,
    seq_len: int = 256,
    calib_texts: Sequence[str] | None = None,
    dense=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure the dense model and every configuration (see the module docstring); returns the result as a
    JSON-serializable dict of the effx-bench schema.

    ``heldout`` is the text for agreement and perplexity (default: held-out pydoc topics), ``calib_texts``
    the text for configurations with a calibration target (default: pydoc calibration topics). ``dense``
    is ``model``'s dense Program where the caller already captured it (capture is then not repeated);
    every configuration's passes run on it.
    """
    import torch
    from tqdm.auto import tqdm

    from .capture import capture
    from .data import encode_prompts, pydoc_texts
    from .exit_heads import _token_chunks
    from .flops import decode_flops, prefill_flops, weight_bytes
    from .passes import PassManager
    from .quality import bleu

    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise BenchConfigError(
            f"new_tokens must be an integer >= 2 (TTFT and decode speed), got {new_tokens!r}"
        )
    if not isinstance(repeats, int) or repeats < 1:
        raise BenchConfigError(f"repeats must be an integer >= 1, got {repeats!r}")
    samples = [_as_sample(s) for s in samples]
    if not samples:
        raise BenchDataError("no prompts to benchmark")
    names = [c.name for c in configs]
    if "dense" in names or len(set(names)) != len(names):
        raise BenchConfigError(f"configuration names must be unique and not 'dense': {names}")
    began = time.perf_counter()
    heldout = list(pydoc_texts("heldout") if heldout is None else heldout)
    calib = list(pydoc_texts("calib") if calib_texts is None else calib_texts)

    try:
        chunks = _token_chunks(tokenizer, heldout, seq_len, heldout_tokens)
    except ValueError as e:
        raise BenchDataError(
            f"the held-out text is too short for chunks of {seq_len} tokens "
            f"(heldout_tokens={heldout_tokens}): {e}"
        ) from e

    m = len(configs) + 1
    bar = tqdm(
        total=len(configs) + m + repeats * len(samples) * m + m,
        desc="effx bench",
        unit="step",
        disable=not progress,
    )
    dense = capture(model) if dense is None else dense
    if dense.plan.passes:
        raise BenchConfigError(f"dense must be a Program without passes, it has {len(dense.plan.passes)}")
    programs = [dense]
    calibrations: list[dict | None] = [None]
    for c in configs:
        bar.set_postfix_str(f"prepare: {c.name[:40]}")
        prog = PassManager(list(c.passes)).run(dense)
        cal = None
        if c.calibrate is not None:
            if not prog.exits:
                raise BenchConfigError(f"configuration {c.name!r} has a calibration target but no exits")
            prog, report = prog.calibrate(calib, tokenizer, target=c.calibrate)
            cal = {
                "target": c.calibrate,
                "agreement": report.agreement,
                "thresholds": {str(e): t for e, t in report.thresholds.items()},
            }
        programs.append(prog)
        calibrations.append(cal)
        bar.update()
    entries = [("dense", "", ())] + [(c.name, c.pipeline, c.passes) for c in configs]

    prepared = time.perf_counter()
    encoded = [encode_prompts(tokenizer, s.prompt, chat=chat) for s in samples]
    prompt_lengths = [int(ids.shape[1]) for ids, _ in encoded]
    reset_rss = _rss_reset()
    memory = _memory_method()
    samples_out: list[list[dict]] = [[] for _ in range(m)]
    outputs: list[list] = [[None] * len(samples) for _ in range(m)]
    stats_out: list[list[dict]] = [[] for _ in range(m)]
    with torch.inference_mode():
        ids0, mask0 = encoded[0]
        for prog in programs:  # warm-up: first-call costs are not what a configuration costs
            bar.set_postfix_str("warm-up")
            prog.generate(ids0, attention_mask=mask0, max_new_tokens=2, eos_token_id=[])
            bar.update()
        runs = interleave(
            {
                str(i): functools.partial(_timed_generate, prog, new_tokens=new_tokens, reset_rss=reset_rss)
                for i, prog in enumerate(programs)
            },
            encoded,
            repeats=repeats,
            bar=bar,
        )
        for i in range(m):
            for p, per_repeat in enumerate(runs[str(i)]):
                for r, call in enumerate(per_repeat):
                    tokens, ttft, decode, peak, grew, st = call.output
                    samples_out[i].append(
                        {
                            "prompt": p,
                            "repeat": r,
                            "ttft_ms": ttft * 1e3,
                            "decode_tok_s": (new_tokens - 1) / decode,
                            "seconds": ttft + decode,
                            "peak_rss_mb": peak,
                            "peak_rss_delta_mb": grew,
                            "paths": _paths(
                                st,
                                new_tokens,
                                dense.info.num_layers,
                                bool(programs[i].head.attrs.get("vocab")),
                            ),
                        }
                    )
                    if r == 0:
                        outputs[i][p] = tokens
                        stats_out[i].append(st)
        generated = time.perf_counter()
        dense_preds = None
        agreements, perplexities = [], []
        scored = sum(c.shape[1] - c.shape[1] // 2 for c in chunks)
        for i, prog in enumerate(programs):
            bar.set_postfix_str(f"agreement, perplexity: {entries[i][0][:40]}")
            preds, nll, impossible = [], 0.0, 0
            for c in chunks:
                tokens, chunk_nll, chunk_impossible = _teacher_forced(prog, c)
                preds.append(tokens)
                nll += chunk_nll
                impossible += chunk_impossible
            if dense_preds is None:
                dense_preds = preds
            same = sum(int((a == b).sum()) for a, b in zip(preds, dense_preds, strict=True))
            agreements.append(same / scored)
            # infinite where some true token had probability 0: JSON has no infinity, so null
            perplexities.append((math.exp(nll / scored) if impossible == 0 else None, impossible / scored))
            bar.update()
    bar.close()
    measured = time.perf_counter()

    eos = {int(e) for e in dense.plan.eos_token_ids}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(int(tokenizer.eos_token_id))

    def text(tokens) -> str:
        ids = tokens.tolist()
        cut = next((k for k, t in enumerate(ids) if t in eos), len(ids))
        return tokenizer.decode(ids[:cut], skip_special_tokens=True)

    texts = [[text(t) for t in outs] for outs in outputs]
    refs = [(k, s.reference) for k, s in enumerate(samples) if s.reference is not None]
    context = round(statistics.mean(prompt_lengths) + new_tokens / 2)
    prompt_mean = round(statistics.mean(prompt_lengths))
    result_configs = []
    dense_samples = {(s["prompt"], s["repeat"]): s for s in samples_out[0]}
    for i, prog in enumerate(programs):
        name, pipeline, passes = entries[i]
        same_tokens = sum(int((a == b).sum()) for a, b in zip(outputs[i], outputs[0], strict=True)) / sum(
            int(b.numel()) for b in outputs[0]
        )
        metrics = {
            "decode_tok_s": _spread([s["decode_tok_s"] for s in samples_out[i]]),
            "ttft_ms": _spread([s["ttft_ms"] for s in samples_out[i]]),
            "peak_rss_mb": max(s["peak_rss_mb"] for s in samples_out[i]),
            "peak_rss_delta_mb": max(s["peak_rss_delta_mb"] for s in samples_out[i]),
            "weights_mb": weight_bytes(prog) / 1e6,
            "decode_mflops": decode_flops(prog, context=context) / 1e6,
            "prefill_mflops": prefill_flops(prog, prompt_mean) / 1e6,
            "agreement": agreements[i],
            "same_tokens": same_tokens,
            "rouge_l_dense": _rouge(texts[i], texts[0]),
            "rouge_l_reference": _rouge([texts[i][k] for k, _ in refs], [r for _, r in refs])
            if refs
            else None,
            "bleu_dense": bleu(texts[i], texts[0]),
            "bleu_reference": bleu([texts[i][k] for k, _ in refs], [r for _, r in refs]) if refs else None,
            "perplexity": perplexities[i][0],
            "zero_prob_share": perplexities[i][1],
            "stats": _pass_stats(stats_out[i], prompt_lengths),
            "paths": _mean_paths([s["paths"] for s in samples_out[i]]),
        }
        paired = [(s, dense_samples[(s["prompt"], s["repeat"])]) for s in samples_out[i]]
        d = result_configs[0]["metrics"] if result_configs else metrics
        ratios = {
            "speedup": statistics.median(s["decode_tok_s"] / ds["decode_tok_s"] for s, ds in paired),
            "ttft_speedup": statistics.median(ds["ttft_ms"] / s["ttft_ms"] for s, ds in paired),
            "flops": metrics["decode_mflops"] / d["decode_mflops"],
            "weights": metrics["weights_mb"] / d["weights_mb"],
            "peak_rss": metrics["peak_rss_mb"] / d["peak_rss_mb"],
            "perplexity": None if metrics["perplexity"] is None else metrics["perplexity"] / d["perplexity"],
        }
        result_configs.append(
            {
                "name": name,
                "pipeline": pipeline,
                "passes": [p.to_json() for p in passes],
                "calibration": calibrations[i],
                "metrics": metrics,
                "ratios": ratios,
                "samples": samples_out[i],
                "outputs": texts[i],
                "per_prompt": [
                    {
                        "rouge_l_dense": _rouge([texts[i][k]], [texts[0][k]]),
                        "rouge_l_reference": None
                        if samples[k].reference is None
                        else _rouge([texts[i][k]], [samples[k].reference]),
                    }
                    for k in range(len(samples))
                ],
            }
        )
    info = dense.info
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "model": {
            "name": model_name or info.architecture,
            "architecture": info.architecture,
            "num_layers": info.num_layers,
            "hidden_size": info.hidden_size,
            "vocab_size": info.vocab_size,
            "dtype": info.dtype,
        },
        "settings": {
            "data": data,
            "prompts": len(samples),
            "new_tokens": new_tokens,
            "repeats": repeats,
            "chat": chat,
            "heldout_tokens": sum(int(c.numel()) for c in chunks),
            "seq_len": seq_len,
            "flops_context": context,
            "memory": memory,
            "timing": "batch 1, greedy, interleaved per prompt; TTFT = prefill + first token; decode tok/s "
            "over "
            "the remaining tokens; ratios are medians of per-prompt ratios to dense",
            "seconds": time.perf_counter() - began,
            "phases": {
                "prepare": prepared - began,  # capture, passes, calibration
                "generate": generated - prepared,
                "quality": measured - generated,  # agreement and perplexity
            },
        },
        "configs": result_configs,
    }


# -- schema ----------------------------------------------------------------------------------------------

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


# -- report ----------------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _perplexity_cell(metrics: dict, ratios: dict) -> str:
    if metrics["perplexity"] is None:
        return f"inf ({metrics['zero_prob_share']:.1%} of tokens get p=0)"
    return f"{metrics['perplexity']:.2f} ({ratios['perplexity']:.2f}x)"


def format_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table: one row per configuration, dense first."""
    s = result["settings"]
    lines = [
        f"{result['model']['name']}: {s['prompts']} prompts x {s['new_tokens']} new tokens, {s['repeats']} "
        f"repeat(s), batch 1, greedy, interleaved; agreement and perplexity on {s['heldout_tokens']} "
        "held-out "
        f"tokens; {result['machine']['cpu_count']} CPUs, {s['seconds']:.0f} s",
        "",
        "| config | tok/s | speed-up | TTFT ms | TTFT x | MFLOPs/token | weights MB | peak RSS MB (+in call) "
        "| agreement "
        "| ROUGE-L (dense) | ROUGE-L (ref) | BLEU (dense) | BLEU (ref) | perplexity (x dense) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["configs"]:
        m, r = c["metrics"], c["ratios"]
        lines.append(
            f"| {c['name']} | {m['decode_tok_s']['median']:.2f} | {r['speedup']:.2f}x | "
            f"{m['ttft_ms']['median']:.0f} | {r['ttft_speedup']:.2f}x | {m['decode_mflops']:.1f} | "
            f"{m['weights_mb']:.1f} | {m['peak_rss_mb']:.0f} (+{m['peak_rss_delta_mb']:.0f}) | "
            f"{m['agreement']:.3f} | {m['rouge_l_dense']:.3f} | "
            f"{_fmt(m['rouge_l_reference'], '.3f')} | {m['bleu_dense']:.3f} | "
            f"{_fmt(m['bleu_reference'], '.3f')} | {_perplexity_cell(m, r)} |"
        )
    return "\n".join(lines) + "\n"


def format_path_table(result: dict[str, Any]) -> str:
    """The cascade seed's table as Markdown: per prompt and over all prompts, each configuration's generation
    time (median over repeats) and its ratio to dense, ROUGE-L against the references (where the data has
    them) and against dense, and the share of tokens each path produced (see ``metrics.paths``)."""
    configs = result["configs"]
    prompts = result["settings"]["prompts"]

    def seconds(c, p=None) -> float:
        per_prompt = [
            statistics.median(s["seconds"] for s in c["samples"] if s["prompt"] == k) for k in range(prompts)
        ]
        return per_prompt[p] if p is not None else sum(per_prompt)

    def shares(paths: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.0%}" for k, v in paths.items())

    lines = [
        "| prompt | config | time s | x dense | ROUGE-L (ref) | ROUGE-L (dense) | share of tokens per path |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in range(prompts):
        for c in configs:
            q = c["per_prompt"][p]
            paths = _mean_paths([s["paths"] for s in c["samples"] if s["prompt"] == p])
            lines.append(
                f"| {p + 1} | {c['name']} | {seconds(c, p):.2f} | {seconds(configs[0], p) / seconds(c, p):.2f}x "
                f"| {_fmt(q['rouge_l_reference'], '.3f')} | {q['rouge_l_dense']:.3f} | {shares(paths)} |"
            )
    for c in configs:
        m = c["metrics"]
        lines.append(
            f"| all | {c['name']} | {seconds(c):.2f} | {seconds(configs[0]) / seconds(c):.2f}x "
            f"| {_fmt(m['rouge_l_reference'], '.3f')} | {m['rouge_l_dense']:.3f} | {shares(m['paths'])} |"
        )
    return "\n".join(lines) + "\n"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better on both), sorted by
    the first coordinate."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _family(config: dict[str, Any]) -> str:
    """What a configuration combines, for the plot's colours: its pass names joined by "+", or "dense"."""
    names = list(dict.fromkeys(p.get("name", "?") for p in config["passes"] if isinstance(p, dict)))
    return " + ".join(names) if names else "dense"


def plot_pareto(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """A PNG with three panels: decode speed-up against teacher-forced agreement and against ROUGE-L vs
    dense, and time-to-first-token speed-up against agreement (token drop pays at the prefill). Every
    configuration is a point coloured by the passes it combines (one colour per pass and per combination),
    the Pareto front a line through its points (larger, outlined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["configs"]
    families = list(dict.fromkeys(_family(c) for c in configs))
    palette = plt.get_cmap("tab10")
    colour = {
        f: ("tab:red" if f == "dense" else palette((k % 9) + (k % 9 >= 3))) for k, f in enumerate(families)
    }
    fig, axes = plt.subplots(1, 3, figsize=(19, 6), constrained_layout=True)
    panels = (
        (axes[0], "agreement", "teacher-forced agreement with dense", "speedup", "decode speed-up vs dense"),
        (axes[1], "rouge_l_dense", "ROUGE-L against the dense output", "speedup", "decode speed-up vs dense"),
        (
            axes[2],
            "agreement",
            "teacher-forced agreement with dense",
            "ttft_speedup",
            "TTFT speed-up vs dense",
        ),
    )
    for ax, key, xlabel, ratio, ylabel in panels:
        quality = [c["metrics"][key] for c in configs]
        speed = [c["ratios"][ratio] for c in configs]
        front = pareto_front(list(zip(quality, speed, strict=True)))
        on_front = set(front)
        ax.plot([quality[i] for i in front], [speed[i] for i in front], "-", c="0.35", lw=1.2, zorder=2)
        for i, c in enumerate(configs):
            ax.scatter(
                quality[i],
                speed[i],
                s=80 if i in on_front else 35,
                color=colour[_family(c)],
                edgecolors="black" if i in on_front else "none",
                zorder=3,
            )
            right = quality[i] > 0.5 * (min(quality) + max(quality))  # label inward, not off the axes
            ax.annotate(
                textwrap.shorten(c["name"], 70, placeholder="..."),
                (quality[i], speed[i]),
                fontsize=7,
                xytext=(-6 if right else 6, 5),
                textcoords="offset points",
                ha="right" if right else "left",
            )
        ax.axhline(1.0, c="tab:red", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{ylabel} (median of paired ratios)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker="o", color=colour[f], label=f) for f in families] + [
        plt.Line2D([], [], c="0.35", lw=1.2, label="Pareto front (outlined points)"),
        plt.Line2D([], [], c="tab:red", lw=0.8, ls="--", label="dense speed"),
    ]
    axes[0].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle(
        f"effx bench: {result['model']['name']}, {result['settings']['prompts']} prompts x "
        f"{result['settings']['new_tokens']} tokens, {result['settings']['repeats']} repeat(s)"
    )
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_outputs(
    result: dict[str, Any], out_dir: str | os.PathLike, *, plot: bool = True
) -> dict[str, Path]:
    """Write ``bench-<run>.json``, ``bench-<run>.md`` and (``plot``) ``bench-<run>-pareto.png`` into
    ``out_dir`` (created if needed); ``<run>`` is the result's creation time. Returns the paths by kind."""
    validate_result(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = re.sub(r"[^0-9T]", "", result["created"].split("+")[0])
    base = out / f"bench-{stamp}"
    paths = {"json": base.with_suffix(".json"), "markdown": base.with_suffix(".md")}
    paths["json"].write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(
        format_table(result)
        + "\nPer prompt (generation time = TTFT + decode):\n\n"
        + format_path_table(result)
    )
    if plot:
        paths["plot"] = plot_pareto(result, f"{base}-pareto.png")
    return paths
