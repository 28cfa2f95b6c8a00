"""``effx bench``'s measurement: :func:`run_bench` prepares the dense Program and every configuration,
times their generations, scores their quality, and returns an effx-bench result
(:mod:`effx.bench.schema`).

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
prefill; quality against the dense model on held-out text, from one teacher-forced pass
(:func:`effx.quality.teacher_forced`; the first half of each chunk is the prompt): token agreement (the
share of positions where the program's greedy token, as it decodes, including early exits at their
thresholds, equals the dense one's) and perplexity (as :func:`effx.quality.perplexity` defines it: every
token scored by the head that would decode it, so an exit's where the exit fires); on the generated
texts, ROUGE-L (mean over prompts) and corpus BLEU (:func:`effx.quality.bleu`, sacrebleu) against the dense
texts always and against references where the data has them, and the share of generated positions with
the dense token. A configuration identical to dense reports agreement, ROUGE-L and BLEU of exactly 1.0.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import data as effx_data  # pydoc_texts looked up when called: tests replace it on effx.data
from .._about import __version__
from ..capture import capture
from ..data import encode_prompts, token_chunks
from ..flops import decode_flops, prefill_flops, weight_bytes
from ..passes import PassManager
from ..quality import bleu, perplexity_of, teacher_forced
from .errors import BenchConfigError, BenchDataError
from .memory import memory_method, peak_rss_mb, rss_mb, rss_reset
from .metrics import mean_paths, pass_stats, paths, rouge, spread
from .samples import Sample, as_sample
from .schema import SCHEMA, VERSION
from .sweep import BenchConfig
from .timing import interleave, timed

# run_bench's steps: check_settings, heldout_chunks, prepare (-> Entry), time_programs (-> Timings),
# score_heldout (-> HeldOut), then output_texts, assemble (config_metrics, config_ratios), run_settings, result.

TIMING = (
    "batch 1, greedy, interleaved per prompt; TTFT = prefill + first token; decode tok/s over the remaining "
    "tokens; ratios are medians of per-prompt ratios to dense"
)


@dataclass(frozen=True)
class Entry:
    """One row of the result: dense or a configuration, with the Program it runs."""

    name: str
    pipeline: str
    passes: tuple
    program: Any
    calibration: dict | None = None


@dataclass(frozen=True)
class Timings:
    """What the interleaved generations gave, per entry: one record per prompt and repeat (``samples``), and
    the new tokens and stats of each prompt's first repeat (``outputs``, ``stats``)."""

    samples: list[list[dict]]
    outputs: list[list]
    stats: list[list[dict]]


@dataclass(frozen=True)
class HeldOut:
    """Teacher-forced quality per entry: agreement with dense, perplexity (None when infinite) and the share
    of held-out tokens given probability 0."""

    agreement: list[float]
    perplexity: list[float | None]
    zero_prob_share: list[float]


def check_settings(configs: Sequence[BenchConfig], samples, new_tokens, repeats) -> list[Sample]:
    """The samples as :class:`Sample` objects, after checking ``run_bench``'s settings (typed errors)."""
    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise BenchConfigError(
            f"new_tokens must be an integer >= 2 (TTFT and decode speed), got {new_tokens!r}"
        )
    if not isinstance(repeats, int) or repeats < 1:
        raise BenchConfigError(f"repeats must be an integer >= 1, got {repeats!r}")
    out = [as_sample(s) for s in samples]
    if not out:
        raise BenchDataError("no prompts to benchmark")
    names = [c.name for c in configs]
    if "dense" in names or len(set(names)) != len(names):
        raise BenchConfigError(f"configuration names must be unique and not 'dense': {names}")
    return out


def heldout_chunks(tokenizer, heldout: Sequence[str], seq_len: int, heldout_tokens: int) -> list:
    """The held-out text as ``seq_len``-token chunks (:func:`effx.data.token_chunks`), or a BenchDataError."""

    try:
        return token_chunks(tokenizer, heldout, seq_len, heldout_tokens)
    except ValueError as e:
        raise BenchDataError(
            f"the held-out text is too short for chunks of {seq_len} tokens "
            f"(heldout_tokens={heldout_tokens}): {e}"
        ) from e


def prepare(dense, configs: Sequence[BenchConfig], tokenizer, calib: list[str], bar) -> list[Entry]:
    """Dense and every configuration's Program (its passes run on ``dense``, then its calibration)."""

    rewrites = [p["name"] for p in dense.plan.passes if p["name"] != "lower"]
    if rewrites:
        raise BenchConfigError(f"dense must be a Program without passes (lower aside), it has {rewrites}")
    entries = [Entry("dense", "", (), dense)]
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
        entries.append(Entry(c.name, c.pipeline, c.passes, prog, cal))
        bar.update()
    return entries


def _timed_generate(program, ids, mask, new_tokens: int, reset_rss: bool):
    """One generation: (new tokens [n], ttft seconds, decode seconds, peak RSS MB, its growth over the RSS
    before the call in MB, stats)."""
    stats: dict = {}
    if reset_rss:
        rss_reset()
    before = rss_mb()
    call = timed(
        program.generate,
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        eos_token_id=[],
        stats=stats,
        on_token=True,
    )
    peak = peak_rss_mb()
    first = call.first_token_s
    return call.output[0, ids.shape[1] :], first, call.seconds - first, peak, peak - before, stats


def time_programs(
    entries: list[Entry], encoded: list, new_tokens: int, repeats: int, reset_rss: bool, bar
) -> Timings:
    """Warm every Program up, then time their generations interleaved (:func:`effx.bench.interleave`)."""
    ids0, mask0 = encoded[0]
    for e in entries:  # warm-up: first-call costs are not what a configuration costs
        bar.set_postfix_str("warm-up")
        e.program.generate(ids0, attention_mask=mask0, max_new_tokens=2, eos_token_id=[])
        bar.update()
    runs = interleave(
        {
            str(i): functools.partial(_timed_generate, e.program, new_tokens=new_tokens, reset_rss=reset_rss)
            for i, e in enumerate(entries)
        },
        encoded,
        repeats=repeats,
        bar=bar,
    )
    num_layers = entries[0].program.info.num_layers
    timings = Timings([[] for _ in entries], [[None] * len(encoded) for _ in entries], [[] for _ in entries])
    for i, e in enumerate(entries):
        reduced_head = bool(e.program.head.attrs.get("vocab"))
        for p, per_repeat in enumerate(runs[str(i)]):
            for r, call in enumerate(per_repeat):
                tokens, ttft, decode, peak, grew, st = call.output
                timings.samples[i].append(
                    {
                        "prompt": p,
                        "repeat": r,
                        "ttft_ms": ttft * 1e3,
                        "decode_tok_s": (new_tokens - 1) / decode,
                        "seconds": ttft + decode,
                        "peak_rss_mb": peak,
                        "peak_rss_delta_mb": grew,
                        "paths": paths(st, new_tokens, num_layers, reduced_head),
                    }
                )
                if r == 0:
                    timings.outputs[i][p] = tokens
                    timings.stats[i].append(st)
    return timings


def score_heldout(entries: list[Entry], chunks: list, bar) -> HeldOut:
    """Agreement with dense and perplexity of every entry on the held-out chunks, from one teacher-forced
    pass each (:func:`effx.quality.teacher_forced`, the scorer :func:`effx.quality.perplexity` defines
    perplexity with): agreement is the share of positions whose greedy token, as the Program decodes,
    equals dense's."""

    dense_preds = None
    out = HeldOut([], [], [])
    scored = sum(c.shape[1] - c.shape[1] // 2 for c in chunks)
    for e in entries:
        bar.set_postfix_str(f"agreement, perplexity: {e.name[:40]}")
        scores = [teacher_forced(e.program, c) for c in chunks]
        if dense_preds is None:
            dense_preds = [s.tokens for s in scores]
        same = sum(int((s.tokens == d).sum()) for s, d in zip(scores, dense_preds, strict=True))
        impossible = sum(s.impossible for s in scores)
        out.agreement.append(same / scored)
        # infinite where some true token had probability 0: JSON has no infinity, so null
        out.perplexity.append(perplexity_of(scores) if impossible == 0 else None)
        out.zero_prob_share.append(impossible / scored)
        bar.update()
    return out


def _machine() -> dict[str, Any]:
    import torch
    import transformers

    from .. import kernels

    return {
        "kernels": kernels.describe(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "effx": __version__,
    }


def output_texts(tokenizer, dense, outputs: list[list]) -> list[list[str]]:
    """Every entry's generated texts, each cut at its first end-of-sequence token (the plan's or the
    tokenizer's)."""
    eos = {int(e) for e in dense.plan.eos_token_ids}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(int(tokenizer.eos_token_id))

    def text(tokens) -> str:
        ids = tokens.tolist()
        cut = next((k for k, t in enumerate(ids) if t in eos), len(ids))
        return tokenizer.decode(ids[:cut], skip_special_tokens=True)

    return [[text(t) for t in outs] for outs in outputs]


@dataclass(frozen=True)
class Measured:
    """Everything :func:`assemble` reads: the entries, the samples, what was timed and scored."""

    entries: list[Entry]
    samples: list[Sample]
    timings: Timings
    heldout: HeldOut
    texts: list[list[str]]
    prompt_lengths: list[int]
    new_tokens: int

    @property
    def context(self) -> int:
        """The context FLOPs per decoded token are counted at: mean prompt length + half the new tokens."""
        return round(statistics.mean(self.prompt_lengths) + self.new_tokens / 2)


def config_metrics(m: Measured, i: int) -> dict[str, Any]:
    """Entry ``i``'s ``metrics`` (see :mod:`effx.bench.schema`): speed, memory, FLOPs, quality, stats."""

    program, runs, outputs, texts = m.entries[i].program, m.timings.samples[i], m.timings.outputs, m.texts
    refs = [(k, s.reference) for k, s in enumerate(m.samples) if s.reference is not None]
    ref_texts, references = [texts[i][k] for k, _ in refs], [r for _, r in refs]
    same_tokens = sum(int((a == b).sum()) for a, b in zip(outputs[i], outputs[0], strict=True)) / sum(
        int(b.numel()) for b in outputs[0]
    )
    return {
        "decode_tok_s": spread([s["decode_tok_s"] for s in runs]),
        "ttft_ms": spread([s["ttft_ms"] for s in runs]),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in runs),
        "peak_rss_delta_mb": max(s["peak_rss_delta_mb"] for s in runs),
        "weights_mb": weight_bytes(program) / 1e6,
        "decode_mflops": decode_flops(program, context=m.context) / 1e6,
        "prefill_mflops": prefill_flops(program, round(statistics.mean(m.prompt_lengths))) / 1e6,
        "agreement": m.heldout.agreement[i],
        "same_tokens": same_tokens,
        "rouge_l_dense": rouge(texts[i], texts[0]),
        "rouge_l_reference": rouge(ref_texts, references) if refs else None,
        "bleu_dense": bleu(texts[i], texts[0]),
        "bleu_reference": bleu(ref_texts, references) if refs else None,
        "perplexity": m.heldout.perplexity[i],
        "zero_prob_share": m.heldout.zero_prob_share[i],
        "stats": pass_stats(m.timings.stats[i], m.prompt_lengths),
        "paths": mean_paths([s["paths"] for s in runs]),
    }


def config_ratios(m: Measured, i: int, metrics: dict, dense: dict) -> dict[str, float | None]:
    """Entry ``i``'s ``ratios`` to dense (``dense``: dense's metrics): speed-ups are medians of the ratios
    paired by prompt and repeat, the rest ratios of the metrics."""
    by_key = {(s["prompt"], s["repeat"]): s for s in m.timings.samples[0]}
    paired = [(s, by_key[(s["prompt"], s["repeat"])]) for s in m.timings.samples[i]]
    return {
        "speedup": statistics.median(s["decode_tok_s"] / ds["decode_tok_s"] for s, ds in paired),
        "ttft_speedup": statistics.median(ds["ttft_ms"] / s["ttft_ms"] for s, ds in paired),
        "flops": metrics["decode_mflops"] / dense["decode_mflops"],
        "weights": metrics["weights_mb"] / dense["weights_mb"],
        "peak_rss": metrics["peak_rss_mb"] / dense["peak_rss_mb"],
        "perplexity": None if metrics["perplexity"] is None else metrics["perplexity"] / dense["perplexity"],
    }


def assemble(m: Measured) -> list[dict[str, Any]]:
    """The result's ``configs``: per entry its name, pipeline, passes, calibration, metrics, ratios to dense,
    timed samples, texts and per-prompt ROUGE-L."""
    out: list[dict[str, Any]] = []
    for i, e in enumerate(m.entries):
        metrics = config_metrics(m, i)
        texts = m.texts[i]
        per_prompt = [
            {
                "rouge_l_dense": rouge([texts[k]], [m.texts[0][k]]),
                "rouge_l_reference": None if s.reference is None else rouge([texts[k]], [s.reference]),
            }
            for k, s in enumerate(m.samples)
        ]
        out.append(
            {
                "name": e.name,
                "pipeline": e.pipeline,
                "passes": [p.to_json() for p in e.passes],
                "calibration": e.calibration,
                "metrics": metrics,
                "ratios": config_ratios(m, i, metrics, out[0]["metrics"] if out else metrics),
                "samples": m.timings.samples[i],
                "outputs": texts,
                "per_prompt": per_prompt,
            }
        )
    return out


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

    The steps: :func:`prepare` the Programs, :func:`time_programs`, :func:`score_heldout`, then
    :func:`assemble` the result.
    """
    import torch
    from tqdm.auto import tqdm

    samples = check_settings(configs, samples, new_tokens, repeats)
    began = time.perf_counter()
    heldout = list(effx_data.pydoc_texts("heldout") if heldout is None else heldout)
    calib = list(effx_data.pydoc_texts("calib") if calib_texts is None else calib_texts)
    chunks = heldout_chunks(tokenizer, heldout, seq_len, heldout_tokens)
    n = len(configs) + 1
    steps = len(configs) + n + repeats * len(samples) * n + n
    bar = tqdm(total=steps, desc="effx bench", unit="step", disable=not progress)
    dense = capture(model) if dense is None else dense
    entries = prepare(dense, configs, tokenizer, calib, bar)
    prepared = time.perf_counter()
    encoded = [encode_prompts(tokenizer, s.prompt, chat=chat) for s in samples]
    reset_rss = rss_reset()
    memory = memory_method()
    with torch.inference_mode():
        timings = time_programs(entries, encoded, new_tokens, repeats, reset_rss, bar)
        generated = time.perf_counter()
        quality = score_heldout(entries, chunks, bar)
    bar.close()
    measured = time.perf_counter()
    m = Measured(
        entries,
        samples,
        timings,
        quality,
        output_texts(tokenizer, dense, timings.outputs),
        [int(ids.shape[1]) for ids, _ in encoded],
        new_tokens,
    )
    given = {
        "data": data,
        "prompts": len(samples),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "chat": chat,
    }
    phases = {"prepare": prepared - began, "generate": generated - prepared, "quality": measured - generated}
    settings = run_settings(m, given, chunks, seq_len, memory, phases)
    return result(dense, model_name, settings, assemble(m), began)


def run_settings(
    m: Measured, given: dict[str, Any], chunks: list, seq_len: int, memory: str, phases: dict[str, float]
) -> dict[str, Any]:
    """The result's ``settings`` but its total ``seconds``: ``given`` (data, prompts, new tokens, repeats,
    chat), the held-out text, the FLOPs context, how memory and time were measured, and the ``phases``
    (prepare: capture, passes, calibration; generate; quality: agreement and perplexity)."""
    return {
        **given,
        "heldout_tokens": sum(int(c.numel()) for c in chunks),
        "seq_len": seq_len,
        "flops_context": m.context,
        "memory": memory,
        "timing": TIMING,
        "phases": phases,
    }


def result(dense, model_name: str, settings: dict[str, Any], configs: list[dict], began: float) -> dict:
    """The effx-bench result around ``configs``: schema, machine, model and ``settings`` (with the run's
    total seconds since ``began``)."""
    info = dense.info
    phases = settings.pop("phases")
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
        "settings": {**settings, "seconds": time.perf_counter() - began, "phases": phases},
        "configs": configs,
    }
