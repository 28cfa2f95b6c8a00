"""The default configurations of ``effx bench`` (:func:`default_configs`) and the artifacts they need,
made once per model and cached under :func:`effx.models.cache_dir`: trained exit heads
(:func:`exit_heads`), a vocabulary ranking (:func:`vocab_file`) and a neuron profile
(:func:`neuron_profile`)."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import torch

from .. import data as effx_data  # pydoc_texts looked up when called: tests replace it on effx.data
from ..data import training_prompts
from ..draft_branch import train_draft_branch
from ..exit_heads import (
    ExitStates,
    collect_exit_states,
    fit_exit_heads,
    own_generations,
    save_exit_heads,
    train_exit_heads,
)
from ..models import cache_dir, gguf_file
from ..neurons import profile_neurons
from ..passes import DraftBranch, EarlyExit, NeuronMask, PromptLookup, TokenDrop, VocabReduce, parse_pipeline
from ..vocab import VocabProfile, calibrate_vocab
from .errors import BenchConfigError
from .sweep import BenchConfig

# the package's name, as when this lived in effx/bench.py: log lines keep their logger name
logger = logging.getLogger(__package__)


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", str(name)).strip("_") or "model"


def own_states(model_name: str, dense, tokenizer, layers, tokens: int, *, progress: bool = True):
    """:class:`effx.exit_heads.ExitStates` at ``layers`` over ``tokens`` tokens of ``dense``'s own greedy
    generations (128 new tokens per prompt of :func:`effx.data.training_prompts`), collected once and cached;
    a cached file with more layers serves too."""

    folder = cache_dir() / "exit_states"
    want = set(layers)
    for cached in sorted(folder.glob(f"{_safe(model_name)}-own{tokens}-*.safetensors")):
        have = {int(x) for x in cached.stem.rsplit("-", 1)[1].split("_")}
        if want <= have:
            return ExitStates.load(cached)
    start = time.perf_counter()
    sequences = own_generations(
        dense, tokenizer, training_prompts(), max_new_tokens=128, max_tokens=tokens, progress=progress
    )
    states = collect_exit_states(
        dense,
        sequences,
        sorted(want),
        progress=progress,
        source="own generations (128 new tokens per prompt)",
    )
    states.save(folder / f"{_safe(model_name)}-own{tokens}-{'_'.join(map(str, sorted(want)))}.safetensors")
    logger.info("generated and collected %d tokens in %.0f s", states.tokens, time.perf_counter() - start)
    return states


def draft_vocab(model_name: str, dense, tokenizer, tokens: int, states=None) -> str:
    """A vocabulary ranking for drafting exits: the final layer's greedy tokens on the training positions of
    the own-generation states (:func:`own_states`), ties broken by pydoc text counts; made once and cached."""

    path = cache_dir() / "vocab" / f"{_safe(model_name)}-own{tokens}.safetensors"
    if not path.is_file():
        if states is None:
            raise BenchConfigError("draft_vocab needs the states the first time (own_states)")
        train, _ = states.split(0.1)
        counts = torch.bincount(states.top_ids[train, 0], minlength=dense.info.vocab_size)
        generated = VocabProfile(counts, "generations", int(counts.sum()))
        (generated + calibrate_vocab(tokenizer, effx_data.pydoc_texts("calib"))).save(path, dense.info)
    return str(path)


def exit_heads(
    model_name: str,
    dense,
    tokenizer,
    layers,
    tokens: int,
    *,
    source: str = "pydoc",
    rank: int = 64,
    vocab_k: int | None = None,
    progress: bool = True,
) -> Path:
    """Path of trained exit heads for ``layers``, trained once and cached under
    :func:`effx.models.cache_dir`: ``source="pydoc"`` on ``tokens`` tokens of pydoc calibration text (the
    rank-64 heads of the first measurements), ``"own"`` on ``tokens`` tokens of the model's own generations
    (:func:`own_states`), scoring the top ``vocab_k`` ids of :func:`draft_vocab` if given."""

    if source not in ("pydoc", "own"):
        raise BenchConfigError(f"exit heads source must be 'pydoc' or 'own', got {source!r}")
    name = f"{_safe(model_name)}-{'-'.join(map(str, layers))}-{tokens}"
    if source == "own":
        name += f"-own-r{rank}" + (f"-k{vocab_k}" if vocab_k else "")
    path = cache_dir() / "exit_heads" / f"{name}.safetensors"
    if path.is_file():
        return path
    start = time.perf_counter()
    if source == "pydoc":
        result = train_exit_heads(
            dense,
            effx_data.pydoc_texts("calib"),
            tokenizer,
            layers=list(layers),
            max_tokens=tokens,
            path=path,
            progress=progress,
        )
    else:
        states = own_states(model_name, dense, tokenizer, layers, tokens, progress=progress)
        vocab = draft_vocab(model_name, dense, tokenizer, tokens, states) if vocab_k else None
        result = fit_exit_heads(
            dense, states, layers=list(layers), rank=rank, vocab=vocab, vocab_k=vocab_k, progress=progress
        )
        save_exit_heads(dense, result, path, source=states.source)
    agree = ", ".join(
        f"{e}: {result['agreement_before'][e]:.2f}->{result['agreement_after'][e]:.2f}" for e in layers
    )
    logger.info(
        "trained exit heads in %.0f s (held-out agreement with the last layer %s)",
        time.perf_counter() - start,
        agree,
    )
    return path


def draft_branch(
    model_name: str, dense, tokenizer, tokens: int, *, text_tokens: int = 262144, progress: bool = True, **fit
) -> tuple[Path, dict]:
    """Path of a draft branch trained on ``tokens`` tokens of ``dense``'s own generations and ``text_tokens``
    tokens of :func:`effx.data.offline_texts` (:func:`effx.train_draft_branch` with ``fit``'s settings),
    trained once and cached, and what its training reported (held-out acceptance per draft position,
    seconds)."""
    settings = "".join(f"-{k}{v}" for k, v in sorted(fit.items()))
    name = f"{_safe(model_name)}-own{tokens}-text{text_tokens}{settings}.safetensors"
    path = cache_dir() / "draft_branch" / name
    report = path.with_suffix(".json")
    if path.is_file() and report.is_file():
        return path, json.loads(report.read_text())
    result = train_draft_branch(
        dense, training_prompts(), tokenizer, max_tokens=tokens, texts=effx_data.offline_texts(),
        text_tokens=text_tokens, path=path, progress=progress, **fit,
    )  # fmt: skip
    summary = {
        "before": result.before,
        "after": result.after,
        "tokens": result.tokens,
        "heldout": result.heldout,
        "collect_seconds": result.collect_seconds,
        "fit_seconds": result.seconds,
    }
    report.write_text(json.dumps(summary))
    logger.info(
        "trained a draft branch in %.0f s (held-out acceptance per position %s)",
        result.collect_seconds + result.seconds,
        ", ".join(f"{a:.2f}" for a in result.after),
    )
    return path, summary


def vocab_file(model_name: str, dense, tokenizer, prompts: int, *, progress: bool = True) -> str:
    """A vocabulary ranking from the model's own generations on ``prompts`` pydoc-based prompts plus pydoc
    calibration text, made once and cached."""

    path = cache_dir() / "vocab" / f"{_safe(model_name)}-gen{prompts}.safetensors"
    if not path.is_file():
        asks = [f"Explain this in simple words:\n{t[:400]}" for t in effx_data.pydoc_texts("calib")[:prompts]]
        generated = calibrate_vocab(tokenizer, asks, program=dense, max_new_tokens=48, progress=progress)
        text = calibrate_vocab(tokenizer, effx_data.pydoc_texts("calib"))
        (generated + text).save(path, dense.info)
    return str(path)


def neuron_profile(model_name: str, dense, tokenizer, tokens: int, *, progress: bool = True) -> str:
    """A neuron profile of ``dense`` on ``tokens`` tokens of pydoc calibration text, made once and cached."""

    path = cache_dir() / "neurons" / f"{_safe(model_name)}-pydoc-{tokens}.safetensors"
    if not path.is_file():
        start = time.perf_counter()
        profile_neurons(
            dense,
            effx_data.pydoc_texts("calib"),
            tokenizer,
            path=path,
            data="pydoc calib",
            max_tokens=tokens,
            progress=progress,
        )
        logger.info("profiled neurons in %.0f s", time.perf_counter() - start)
    return str(path)


def default_quantize(dense) -> str:
    """The quantize step of the default configurations: the GGUF file's own values for a model effx loaded
    from one, round-to-nearest int8 otherwise."""

    try:
        gguf_file(dense.info.source)
    except Exception:  # ModelLoadError: not loaded from a GGUF file
        return "quantize{bits=8 symmetric=true}"
    return "quantize{source=gguf}"


def default_configs(
    model_name: str,
    dense,
    tokenizer,
    *,
    progress: bool = True,
    quantize: str | None = None,
    branch: str | None = None,
) -> list[BenchConfig]:
    """Every pass at the setting its README section measured on SmolLM2, placed by depth so that other
    models get the same shape (on a 30-layer model: exactly the documented layers):

    * ``neuron-mask`` static keep 0.5 in layers 10%..90% (3..27), profiled on 16k pydoc tokens;
    * ``vocab-reduce`` head, k = V/6 (8192), fallback 0.9, ranked from 16 of the model's generations;
    * ``token-drop`` before layers 4/30 and 12/30 of the depth, keep 0.75 then 0.5;
    * ``early-exit`` lossy after 1/3, 1/2, 2/3, 5/6 of the layers (10, 15, 20, 25) with trained heads
      (4k pydoc tokens), calibrated to 0.95 agreement;
    * the same exits with ``vocab-reduce`` exits k = V/24 (2048), adaptive, calibrated to 0.95;
    * ``prompt-lookup`` at its defaults (lossless drafts from the prompt; its acceptance in the table);
    * with ``branch`` (a trained draft branch's file: ``effx train-draft``, 20 to 40 minutes, so never made
      here), ``draft-branch`` at its defaults, alone and with ``prompt-lookup`` (lossless).

    * the quantize step alone (:func:`default_quantize`: ``quantize{source=gguf}`` for a model loaded from
      a GGUF file, else int8).

    ``quantize`` (a ``quantize{...}`` pipeline string) adds every configuration above combined with it (and
    the step alone, where it is not the default one): :func:`effx.bench.stacked_rows` compares each pass's
    speed-up on the quantized Program with its float32 one.
    Profiles, vocabularies and heads are made once and cached (about 40 s, 60 s and a few minutes on SmolLM2).
    """

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
    configs = [
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
        BenchConfig("prompt-lookup (lossless)", (PromptLookup(),)),
    ]
    if branch:
        drafts = DraftBranch(weights=branch)
        configs += [
            BenchConfig("draft-branch (lossless)", (drafts,)),
            BenchConfig("draft-branch + prompt-lookup (lossless)", (drafts, PromptLookup())),
        ]
    alone = default_quantize(dense)
    out = configs + [BenchConfig(alone, tuple(parse_pipeline(alone)))]
    if quantize:
        steps = tuple(parse_pipeline(quantize))
        if [p.name for p in steps] != ["quantize"]:
            raise BenchConfigError(f"--quantize takes one quantize{{...}} step, got {quantize!r}")
        if quantize != alone:  # the base the stacked rows are compared with (effx.bench.stacked_rows)
            out.append(BenchConfig(quantize, steps))
        out += [
            BenchConfig(f"{c.name} + {quantize}", c.passes + steps, calibrate=c.calibrate) for c in configs
        ]
    return out
