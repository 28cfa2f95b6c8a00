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
prefill; quality against the dense model on held-out text: teacher-forced token agreement (the share of
positions where the program's greedy token, as it decodes, including early exits at their thresholds,
equals the dense one's) and perplexity (as :func:`effx.quality.perplexity` defines it, from the same
forward pass; it scores the final head, so for lossy exits agreement is the measure); on the generated
texts, ROUGE-L (mean over prompts) and corpus BLEU (:func:`effx.quality.bleu`, sacrebleu) against the dense
texts always and against references where the data has them, and the share of generated positions with
the dense token. A configuration identical to dense reports agreement, ROUGE-L and BLEU of exactly 1.0.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

from .errors import BenchConfigError, BenchDataError
from .memory import memory_method, peak_rss_mb, rss_mb, rss_reset
from .metrics import mean_paths, pass_stats, paths, rouge, spread, teacher_forced
from .samples import Sample, as_sample
from .schema import SCHEMA, VERSION
from .sweep import BenchConfig
from .timing import interleave, timed


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


def _machine() -> dict[str, Any]:
    import torch
    import transformers

    from .. import kernels
    from .._about import __version__

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

    from ..capture import capture
    from ..data import encode_prompts, pydoc_texts, token_chunks
    from ..flops import decode_flops, prefill_flops, weight_bytes
    from ..passes import PassManager
    from ..quality import bleu

    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise BenchConfigError(
            f"new_tokens must be an integer >= 2 (TTFT and decode speed), got {new_tokens!r}"
        )
    if not isinstance(repeats, int) or repeats < 1:
        raise BenchConfigError(f"repeats must be an integer >= 1, got {repeats!r}")
    samples = [as_sample(s) for s in samples]
    if not samples:
        raise BenchDataError("no prompts to benchmark")
    names = [c.name for c in configs]
    if "dense" in names or len(set(names)) != len(names):
        raise BenchConfigError(f"configuration names must be unique and not 'dense': {names}")
    began = time.perf_counter()
    heldout = list(pydoc_texts("heldout") if heldout is None else heldout)
    calib = list(pydoc_texts("calib") if calib_texts is None else calib_texts)

    try:
        chunks = token_chunks(tokenizer, heldout, seq_len, heldout_tokens)
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
    rewrites = [p["name"] for p in dense.plan.passes if p["name"] != "lower"]
    if rewrites:
        raise BenchConfigError(f"dense must be a Program without passes (lower aside), it has {rewrites}")
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
    reset_rss = rss_reset()
    memory = memory_method()
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
                            "paths": paths(
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
                tokens, chunk_nll, chunk_impossible = teacher_forced(prog, c)
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
            "decode_tok_s": spread([s["decode_tok_s"] for s in samples_out[i]]),
            "ttft_ms": spread([s["ttft_ms"] for s in samples_out[i]]),
            "peak_rss_mb": max(s["peak_rss_mb"] for s in samples_out[i]),
            "peak_rss_delta_mb": max(s["peak_rss_delta_mb"] for s in samples_out[i]),
            "weights_mb": weight_bytes(prog) / 1e6,
            "decode_mflops": decode_flops(prog, context=context) / 1e6,
            "prefill_mflops": prefill_flops(prog, prompt_mean) / 1e6,
            "agreement": agreements[i],
            "same_tokens": same_tokens,
            "rouge_l_dense": rouge(texts[i], texts[0]),
            "rouge_l_reference": rouge([texts[i][k] for k, _ in refs], [r for _, r in refs])
            if refs
            else None,
            "bleu_dense": bleu(texts[i], texts[0]),
            "bleu_reference": bleu([texts[i][k] for k, _ in refs], [r for _, r in refs]) if refs else None,
            "perplexity": perplexities[i][0],
            "zero_prob_share": perplexities[i][1],
            "stats": pass_stats(stats_out[i], prompt_lengths),
            "paths": mean_paths([s["paths"] for s in samples_out[i]]),
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
                        "rouge_l_dense": rouge([texts[i][k]], [texts[0][k]]),
                        "rouge_l_reference": None
                        if samples[k].reference is None
                        else rouge([texts[i][k]], [samples[k].reference]),
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
