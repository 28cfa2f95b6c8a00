"""Quality of a transformed model's output against the dense model's."""

from __future__ import annotations

__all__ = ["rouge_l"]


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
