"""Exit threshold calibration (CALM-style): pick thresholds for a target agreement with the full model.

On calibration text, teacher-forced, every exit's confidence and greedy token are computed for every
position alongside the full model's greedy token (with exact KV, a token's confidence at an exit depends
only on the text before it, so these are the values the runtime will see). Exits are then visited
shallowest first: each gets the lowest threshold at which the tokens that would leave there (the ones not
already taken by a shallower exit) agree with the full model at least ``target`` of the time. Every exit
meeting the target on its own tokens makes the overall agreement meet it too. An exit that cannot reach the
target never fires (threshold 2, above every measure's range).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import token_chunks
from .errors import PassError
from .exit_heads import backbone_states
from .flops import program_flops
from .runtime.vocab import exit_logits, head_logits, select_vocab

__all__ = ["CalibrationReport", "agreement", "calibrate", "exit_statistics", "teacher_forced_exits"]

NEVER = 2.0  # above every confidence measure's range


@dataclass
class CalibrationReport:
    target: float
    thresholds: dict[int, float]
    agreement: float  # share of calibration tokens whose exit token equals the full model's
    exit_rates: dict[int, float]  # share of tokens leaving at each exit (the rest reach the head)
    mean_layers: float  # mean number of decoder layers a token runs
    flops_ratio: float  # dense FLOPs per token / expected FLOPs per token with these exits
    tokens: int

    def format(self) -> str:
        rates = ", ".join(
            f"exit.{e}: {r:.1%} (t={self.thresholds[e]:.3f})" for e, r in self.exit_rates.items()
        )
        return (
            f"calibrated on {self.tokens} tokens for agreement >= {self.target}: agreement {self.agreement:.3f}, "
            f"mean layers {self.mean_layers:.1f}, estimated speed-up {self.flops_ratio:.2f}x (FLOPs); {rates}"
        )


def teacher_forced_exits(program, chunk):
    """Every exit of ``program`` on ``chunk [1, n]`` read teacher-forced: the final head's logits
    ``[1, n, V]`` and, per exit in depth order, ``(layer, logits, confidence)`` at every position. Pruned
    exits (VocabReduce where="exits") score, at each position, the subset the runtime would give them
    there."""

    prev, hiddens, last = backbone_states(program, chunk, set(program.exits))
    teacher = head_logits(program, last).float().log_softmax(-1)
    out = []
    ids = prev_logits = None
    for e in sorted(program.exits):
        ex = program.exits[e]
        ids = select_vocab(prev_logits, ex, ids) if ex.attrs.get("vocab") == "pruned" else None
        logits, conf = exit_logits(program, ex, hiddens[e], prev, ids)
        prev, prev_logits = hiddens[e], logits
        out.append((e, logits, conf))
    return teacher, out


# Calibration reads each exit's confidence and whether its greedy token is the final head's: statistics for
# choosing thresholds, not a perplexity. Perplexity has one definition, effx.quality.perplexity (every token
# scored by the head that decodes it, through effx.runtime.score); nothing here computes another.
def exit_statistics(
    program, texts, tokenizer, *, seq_len: int = 128, max_tokens: int = 2048, progress: bool = False
):
    """Per exit: confidence and whether its greedy token equals the full model's, for every calibration token.

    Returns ``({layer: (confidence [N], agrees [N])}, N)``.
    """

    chunks = token_chunks(tokenizer, texts, seq_len, max_tokens)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="calibrate exits", unit="chunk")
    conf: dict[int, list] = {e: [] for e in program.exits}
    agree: dict[int, list] = {e: [] for e in program.exits}
    n = 0
    with torch.inference_mode():
        for chunk in chunks:
            teacher, exits = teacher_forced_exits(program, chunk)
            final = teacher.argmax(-1)[0]
            for e, logits, c in exits:
                conf[e].append(c[0].float())
                agree[e].append(logits.argmax(-1)[0] == final)
            n += chunk.shape[1]
    return {e: (torch.cat(conf[e]), torch.cat(agree[e])) for e in program.exits}, n


def _lowest_threshold(conf: torch.Tensor, agree: torch.Tensor, target: float, min_tokens: int) -> float:
    if conf.numel() == 0:
        return NEVER
    order = torch.argsort(conf, descending=True)
    hits = agree[order].double().cumsum(0)
    counts = torch.arange(1, conf.numel() + 1, dtype=torch.float64)
    ok = ((hits / counts) >= target) & (counts >= min_tokens)
    # tokens with equal confidence leave together: only thresholds at the last of a run of equal values
    sorted_conf = conf[order]
    last_of_run = torch.ones_like(ok)
    last_of_run[:-1] = sorted_conf[1:] != sorted_conf[:-1]
    ok &= last_of_run
    idx = torch.nonzero(ok).flatten()
    if idx.numel() == 0:
        return NEVER
    return float(sorted_conf[idx.max()])


def calibrate(program, texts, tokenizer, *, target: float = 0.95, min_tokens: int = 8, **kwargs):
    """A new Program whose exit thresholds meet ``target`` agreement with the full model on ``texts``,
    and a :class:`CalibrationReport`. ``kwargs`` go to :func:`exit_statistics` (seq_len, max_tokens,
    progress)."""

    if not program.exits:
        raise PassError("calibrate needs exits: apply EarlyExit first")
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    stats, n = exit_statistics(program, texts, tokenizer, **kwargs)
    remaining = torch.ones(n, dtype=torch.bool)
    thresholds, rates = {}, {}
    agreed = torch.zeros(n, dtype=torch.bool)
    layers_run = torch.full((n,), float(program.info.num_layers))
    evaluated: dict[int, float] = {}  # share of tokens that reach each exit
    for e in sorted(program.exits):
        conf, agree = stats[e]
        evaluated[e] = float(remaining.double().mean())
        t = _lowest_threshold(conf[remaining], agree[remaining], target, min_tokens)
        leave = remaining & (conf >= t)
        thresholds[e] = t
        rates[e] = float(leave.double().mean())
        agreed |= leave & agree
        layers_run[leave] = e + 1
        remaining &= ~leave
    agreed |= remaining  # tokens that reach the head are the full model's
    stages = [s.with_attrs(threshold=thresholds[s.layer]) if s.kind == "exit" else s for s in program.stages]
    new = program.with_stages(stages)
    flops = program_flops(program, context=256)
    layer_cost = sum(flops[s.name] for s in program.layers) / program.info.num_layers
    exit_cost = {e: flops[program.exits[e].name] for e in program.exits}
    dense = flops["embed"] + layer_cost * program.info.num_layers + flops["head"]
    expected = (
        flops["embed"]
        + layer_cost * float(layers_run.mean())
        + sum(exit_cost[e] * evaluated[e] for e in exit_cost)
        + flops["head"] * float(remaining.double().mean())
    )
    report = CalibrationReport(
        target=target,
        thresholds=thresholds,
        agreement=float(agreed.double().mean()),
        exit_rates=rates,
        mean_layers=float(layers_run.mean()),
        flops_ratio=dense / expected,
        tokens=n,
    )
    return new, report


def agreement(program, texts, tokenizer, **kwargs) -> tuple[float, float]:
    """Teacher-forced agreement with the full model and mean decoder layers per token, at the program's
    current thresholds, on ``texts`` (use held-out text, not the calibration text)."""
    stats, n = exit_statistics(program, texts, tokenizer, **kwargs)
    remaining = torch.ones(n, dtype=torch.bool)
    agreed = torch.zeros(n, dtype=torch.bool)
    layers_run = torch.full((n,), float(program.info.num_layers))
    for e in sorted(program.exits):
        conf, agree = stats[e]
        leave = remaining & (conf >= program.exits[e].attrs["threshold"])
        agreed |= leave & agree
        layers_run[leave] = e + 1
        remaining &= ~leave
    agreed |= remaining
    return float(agreed.double().mean()), float(layers_run.mean())
