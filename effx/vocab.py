"""Frequency-ranked vocabularies for reduced LM heads (FR-Spec, VocabTrim).

``calibrate_vocab`` counts how often each token id occurs, either in text (``texts`` tokenized as they are)
or in the model's own greedy continuations of prompts (``program=...``: what the model actually says, which
is what a draft head has to predict), and writes the counts to a safetensors file with JSON metadata.
``VocabReduce(where="head" | "draft", k=..., vocab=path)`` keeps the ``k`` most frequent ids.

A vocabulary file is either that safetensors file or a JSON file ``{"ids": [...]}`` (or a bare list) that
ranks token ids most useful first, for users who build their subset by other means.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import encode_prompts
from .errors import ArtifactError

__all__ = ["VocabProfile", "calibrate_vocab", "load_vocab", "subset_ids"]

_KIND = "effx-vocab"


@dataclass
class VocabProfile:
    counts: torch.Tensor  # [V] int64, occurrences of each token id
    source: str  # "text" or "generations"
    tokens: int  # tokens counted

    def __add__(self, other: VocabProfile) -> VocabProfile:
        """Counts of both (e.g. the model's generations plus a text corpus, so that ids the generations never
        show still rank by how common they are)."""
        if self.counts.shape != other.counts.shape:
            raise ValueError(f"vocabulary sizes differ: {self.counts.numel()} vs {other.counts.numel()}")
        sources = "+".join(dict.fromkeys([*self.source.split("+"), *other.source.split("+")]))
        return VocabProfile(self.counts + other.counts, sources, self.tokens + other.tokens)

    def ranked(self) -> torch.Tensor:
        """All token ids, most frequent first; ties (and unseen ids) in id order."""
        return torch.sort(-self.counts, stable=True).indices

    def coverage(self, k: int) -> float:
        """Share of the counted tokens that the ``k`` most frequent ids cover."""
        top = torch.sort(self.counts, descending=True, stable=True).values[:k]
        return float(top.sum()) / max(self.tokens, 1)

    def save(self, path: str | os.PathLike, info=None) -> Path:
        from safetensors.torch import save_file

        meta = {
            "kind": _KIND,
            "vocab_size": int(self.counts.numel()),
            "source": self.source,
            "tokens": self.tokens,
        }
        if info is not None:
            meta["architecture"] = info.architecture
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"counts": self.counts.contiguous()}, str(tmp), metadata={"effx": json.dumps(meta)})
        tmp.replace(path)
        return path


def calibrate_vocab(
    tokenizer,
    texts,
    *,
    path: str | os.PathLike | None = None,
    program=None,
    max_new_tokens: int = 64,
    batch_size: int = 4,
    max_tokens: int = 200_000,
    progress: bool = False,
) -> VocabProfile:
    """Count token frequencies for a frequency-ranked vocabulary and optionally save them to ``path``.

    Without ``program`` the tokens of ``texts`` are counted (up to ``max_tokens``). With a ``program``,
    ``texts`` are prompts (chat-formatted where the tokenizer has a template): the program continues each
    greedily for ``max_new_tokens`` and only the generated tokens are counted.
    """
    from tqdm.auto import tqdm

    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("calibrate_vocab needs at least one text")
    vocab_size = program.info.vocab_size if program is not None else len(tokenizer)
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    if program is None:
        n = 0
        for text in tqdm(texts, desc="count tokens", unit="text", disable=not progress):
            ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.int64)
            ids = ids[: max_tokens - n]
            counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
            n += ids.numel()
            if n >= max_tokens:
                break
        source = "text"
    else:
        n = 0
        batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
        for batch in tqdm(batches, desc="generate for vocab", unit="batch", disable=not progress):
            ids, mask = encode_prompts(tokenizer, batch)
            out = program.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, ids.shape[1] :]
            pad = program.plan.pad_token_id
            eos = set(program.plan.eos_token_ids)
            for row in new.tolist():  # stop at the first end-of-sequence; padding after it is not speech
                for t in row:
                    counts[t] += 1
                    n += 1
                    if t in eos or t == pad:
                        break
        source = "generations"
    if n == 0:
        raise ValueError("calibrate_vocab counted no tokens: the texts are empty")
    profile = VocabProfile(counts, source, n)
    if path is not None:
        profile.save(path, program.info if program is not None else None)
    return profile


def load_vocab(path: str | os.PathLike, vocab_size: int) -> torch.Tensor:
    """Ranked token ids (most useful first) from a vocabulary file, checked against ``vocab_size``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(
            f"vocabulary file {path} does not exist; write one with effx.calibrate_vocab(..., path=...)"
        )
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (ValueError, OSError) as e:
            raise ArtifactError(f"{path} is not valid JSON: {e}") from e
        ids = data.get("ids") if isinstance(data, dict) else data
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ArtifactError(f'{path} must hold a list of token ids, or {{"ids": [...]}}')
        ranked = torch.tensor(ids, dtype=torch.int64)
    else:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("effx", "{}"))
                counts = f.get_tensor("counts") if "counts" in f.keys() else None  # noqa: SIM118
        except (SafetensorError, ValueError, OSError) as e:
            raise ArtifactError(f"{path} is not a readable vocabulary file: {e}") from e
        if meta.get("kind") != _KIND or counts is None:
            raise ArtifactError(f"{path} was not written by effx.calibrate_vocab (no '{_KIND}' metadata)")
        if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
            raise ArtifactError(
                f"{path}: counts are {str(counts.dtype).removeprefix('torch.')}; token counts are integers (int64)"
            )
        if counts.dim() != 1:
            raise ArtifactError(f"{path}: counts have shape {list(counts.shape)}; expected [{vocab_size}]")
        if (counts < 0).any():
            raise ArtifactError(f"{path}: some token counts are negative")
        if counts.numel() != vocab_size:
            raise ArtifactError(
                f"{path} counts {counts.numel()} token ids; this model's vocabulary has {vocab_size}"
            )
        if int(counts.sum()) == 0:
            raise ArtifactError(f"{path} is empty: it counted no tokens")
        ranked = VocabProfile(counts, meta.get("source", "?"), int(counts.sum())).ranked()
    if ranked.numel() == 0:
        raise ArtifactError(f"{path} lists no token ids")
    bad = ranked[(ranked < 0) | (ranked >= vocab_size)]
    if bad.numel():
        raise ArtifactError(
            f"{path} lists token ids outside the vocabulary 0..{vocab_size - 1}: {bad[:5].tolist()}"
        )
    if torch.unique(ranked).numel() != ranked.numel():
        raise ArtifactError(f"{path} lists some token ids more than once")
    return ranked


def subset_ids(ranked: torch.Tensor, k: int, always=()) -> torch.Tensor:
    """The ``k`` ids to keep, sorted: the ids in ``always`` (end-of-sequence tokens: without them generation
    could never stop) and then the highest-ranked others."""
    always = [int(a) for a in dict.fromkeys(always)]
    if k < len(always):
        raise ValueError(f"k={k} cannot hold the {len(always)} ids that are always kept ({always})")
    rest = ranked[~torch.isin(ranked, torch.tensor(always, dtype=torch.int64))]
    if rest.numel() < k - len(always):
        raise ValueError(f"the vocabulary file ranks {ranked.numel()} ids; k={k} asks for more")
    return torch.sort(torch.cat([torch.tensor(always, dtype=torch.int64), rest[: k - len(always)]])).values
