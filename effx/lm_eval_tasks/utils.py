"""Documents and metrics of effx's local lm-eval tasks (referenced from the YAML files as ``!function``).

lm-eval calls a ``custom_dataset`` function with the task's metadata (and the run's model arguments) as
keywords and takes the dict of splits it returns.
"""

from __future__ import annotations

import datasets

from effx.data import aclsum, pydoc_texts
from effx.quality import rouge_l

# distractor titles for paper i: papers i + offset of the same split (never i itself in a split of > 73)
_OFFSETS = (17, 41, 73)


def _titles(split: str) -> list[dict]:
    papers = aclsum(split)
    n = len(papers)
    docs = []
    for i, p in enumerate(papers):
        choices = [papers[(i + o) % n]["title"] for o in _OFFSETS]
        gold = i % 4
        choices.insert(gold, p["title"])
        docs.append({"id": p["id"], "abstract": p["abstract"], "choices": choices, "gold": gold})
    return docs


def aclsum_titles(**kwargs) -> dict:
    """ACLSum abstracts with their paper's title among four (three from other papers of the split)."""
    return {split: datasets.Dataset.from_list(_titles(split)) for split in ("train", "test")}


def aclsum_challenges(**kwargs) -> dict:
    """ACLSum abstracts with the human one-sentence summary of the problem each paper addresses."""
    return {
        split: datasets.Dataset.from_list(
            [{"id": p["id"], "abstract": p["abstract"], "challenge": p["summaries"]["challenge"]} for p in aclsum(split)]
        )
        for split in ("train", "test")
    }


def rouge_l_result(doc: dict, results: list[str]) -> dict:
    """ROUGE-L F1 of the generated sentence against the reference (``effx.quality.rouge_l``)."""
    return {"rougeL": rouge_l([results[0].strip()], [doc["challenge"]])}


def _opening(text: str, limit: int = 1500) -> str:
    """The paragraphs of ``text`` that fit in ``limit`` characters (the first one always)."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    out = paragraphs[0]
    for p in paragraphs[1:]:
        if len(out) + 2 + len(p) > limit:
            break
        out += "\n\n" + p
    return out


def pydoc_pages(**kwargs) -> dict:
    """The opening (up to 1,500 characters) of each held-out Python help page: the pages effx's
    calibration never reads (``effx.data.pydoc_texts("heldout")``)."""
    return {"test": datasets.Dataset.from_list([{"text": _opening(t)} for t in pydoc_texts("heldout")])}
