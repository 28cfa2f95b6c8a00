"""Quality of a transformed model's output against the dense model's: ROUGE-L and BLEU of generated text,
and perplexity of held-out text under the distribution the Program decodes with (one definition, from one
teacher-forced scorer: :func:`perplexity`, :func:`teacher_forced`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .data import token_chunks
from .runtime.score import score_tokens
from .runtime.torch_backend import torch_backend

__all__ = ["TeacherForced", "bleu", "perplexity", "perplexity_of", "rouge_l", "teacher_forced"]


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 of ``predictions`` against ``references``.

    Computed with ``rouge_score``, the scorer that ``evaluate``'s "rouge" metric wraps: ``evaluate.load``
    fetches that metric's script from the Hugging Face hub, which effx must not need.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)
    ]
    return sum(scores) / len(scores)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU of ``predictions`` against ``references`` (one reference each), on a 0-1 scale.

    Computed with ``sacrebleu`` (its defaults: 13a tokenization, 4-grams, exponential smoothing), the
    reference implementation that ``evaluate``'s "sacrebleu" metric wraps; ``evaluate.load`` fetches metric
    scripts from the Hugging Face hub, which effx must not need. BLEU is a corpus metric: n-gram counts are
    pooled over all pairs before the precisions are taken. Identical corpora score exactly 1.0, also when
    the texts are too short to hold 4-grams (where BLEU itself is 0).
    """
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    if list(predictions) == list(references):
        return 1.0
    return min(1.0, sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100)


def perplexity(
    program, texts, tokenizer, *, seq_len: int = 256, max_tokens: int = 4096, progress: bool = False
) -> float:
    """Perplexity of the second half of each ``seq_len``-token chunk of ``texts``, given the first half, under
    the distribution the Program decodes with (effx's one definition; ``effx bench`` reports this number):

        perplexity = exp(-1/N * sum_t log p_t(x_t))

    over the N tokens ``x_t`` of the second halves, where ``p_t`` is the distribution the Program would
    produce token ``t`` from, teacher-forced (:func:`teacher_forced`): the first half is prefilled as a
    prompt (the plan's own prefill: core neurons and dropped tokens are chosen on it), and every later token
    is scored by the head that would emit it, an exit's where the exit's confidence passes its threshold,
    else the final head (a reduced head with its fallback). It is infinite where some token gets
    probability 0 (a reduced head without fallback, or a pruned exit, whose subset lacks it). A lossless
    Program (dense, drafting) has the dense model's perplexity. Use held-out text.
    """
    import torch
    from tqdm.auto import tqdm

    chunks = token_chunks(tokenizer, texts, seq_len, max_tokens)
    with torch.inference_mode():
        scores = [
            teacher_forced(program, c)
            for c in tqdm(chunks, desc="perplexity", unit="chunk", disable=not progress)
        ]
    return perplexity_of(scores)


@dataclass(frozen=True)
class TeacherForced:
    """One chunk's second half scored by :func:`teacher_forced`: the log-probability of each true token
    ``logp [m]`` (float32, ``-inf`` where the Program gives it probability 0) and the Program's greedy token
    at each position ``tokens [m]`` (int64)."""

    logp: Any
    tokens: Any

    @property
    def nll(self) -> float:
        """The summed negative log-likelihood of the true tokens (``inf`` where one has probability 0)."""
        return -float(self.logp.double().sum())

    @property
    def impossible(self) -> int:
        """How many true tokens have probability 0."""
        import torch

        return int(torch.isneginf(self.logp).sum())


def teacher_forced(program, chunk) -> TeacherForced:
    """The second half of ``chunk [1, n]`` scored given the first half, the way the Program decodes it:
    the first ``n // 2`` tokens are prefilled as a prompt, then every true token's log-probability and the
    greedy token at its position come from the head the Program would decode that position with
    (:func:`effx.runtime.score.score_tokens`: lossy exits run the decode loop forced along the chunk, with
    their deferred KV; other plans score the rest in multi-token steps). The one teacher-forced scorer that
    :func:`perplexity`, ``effx bench``'s agreement and perplexity, and the lm-eval model use."""
    import torch

    half = chunk.shape[1] // 2
    context = chunk[:, :half]
    logp, tokens = score_tokens(torch_backend(program), context, torch.ones_like(context), chunk[:, half:])
    return TeacherForced(logp[0], tokens[0])


def perplexity_of(scores: Sequence[TeacherForced]) -> float:
    """``exp`` of the mean negative log-likelihood over every token of ``scores`` (see :func:`perplexity`);
    ``inf`` where some token has probability 0."""
    count = sum(int(s.logp.numel()) for s in scores)
    if count == 0:
        raise ValueError("no scored tokens")
    nll = sum(s.nll for s in scores) / count
    return math.inf if math.isinf(nll) else math.exp(nll)
