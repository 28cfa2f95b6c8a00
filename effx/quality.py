"""Quality of a transformed model's output against the dense model's."""

from __future__ import annotations

__all__ = ["bleu", "perplexity", "rouge_l", "second_half_logits"]


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
    """Perplexity of the second half of each ``seq_len``-token chunk of ``texts``, given the first half.

    The first half is a prompt (prefilled as in generation: per-prompt choices such as core neurons or
    dropped tokens are made on it), the second half is scored teacher-forced with the Program as it decodes, so every pass is
    measured the way it generates. Use held-out text.
    """
    import math

    import torch
    from tqdm.auto import tqdm

    from .data import token_chunks

    chunks = token_chunks(tokenizer, texts, seq_len, max_tokens)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for chunk in tqdm(chunks, desc="perplexity", unit="chunk", disable=not progress):
            half = chunk.shape[1] // 2
            logits = second_half_logits(program, chunk)
            nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, half:], reduction="sum"))
            count += chunk.shape[1] - half
    return math.exp(nll / count)


def second_half_logits(program, chunk):
    """Logits ``[n - n // 2, V]`` for the second half of ``chunk`` ``[1, n]``, given the first half: the first
    half is prefilled as a prompt (core neurons and dropped tokens are chosen on it), the second half is
    scored teacher-forced with the Program as it decodes, from the final head."""
    import torch

    from .runtime.forward import run_step
    from .runtime.loop import prefill
    from .runtime.torch_backend import torch_backend

    n = chunk.shape[1]
    half = n // 2
    backend = torch_backend(program)
    cache = backend.new_cache(1, n)
    pos = torch.arange(n)[None]
    valid = torch.ones(1, n, dtype=torch.bool)
    # the plan's own prefill (TokenDrop, core neurons) on the first half; core neurons decode sliced
    last, backend = prefill(backend, cache, chunk[:, :half], pos[:, :half], valid[:, :half], None)
    rest = run_step(backend, cache, chunk[:, half:-1], pos[:, half:-1], valid[:, : n - 1], last_only=False)
    return torch.cat([last[:, None], rest], 1)[0].float()
