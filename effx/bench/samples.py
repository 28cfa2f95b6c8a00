"""The data ``effx bench`` generates from: named sets (:func:`data_choices`) or a file, read into
:class:`Sample` objects (a prompt and an optional reference) by :func:`load_samples`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import data as effx_data  # pydoc_texts looked up when called: tests replace it on effx.data
from ..data import PROMPTS, REFERENCES, aclsum
from .errors import BenchDataError


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
        samples = [Sample(p, REFERENCES.get(p)) for p in PROMPTS]
    elif data == "pydoc":
        samples = [
            Sample(f"Summarize in two sentences:\n{t.strip()[:600]}")
            for t in effx_data.pydoc_texts("heldout")
            if len(t) > 200
        ]
    elif data == "aclsum":
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


def as_sample(item) -> Sample:
    """A :class:`Sample` from a Sample, a prompt string, or a dict with "prompt" and optional "reference"."""
    if isinstance(item, Sample):
        return item
    if isinstance(item, str):
        return Sample(item)
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        ref = item.get("reference")
        return Sample(item["prompt"], None if ref is None else str(ref))
    raise BenchDataError(f"a sample is a prompt string, a Sample or a dict with 'prompt'; got {item!r:.80}")
