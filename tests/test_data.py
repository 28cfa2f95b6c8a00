"""Offline data: the ACLSum loader (skipped where the `aclsum` wheel is not installed) and its errors."""

import importlib.util
import sys

import pytest

import effx.data
from effx.data import ACLSUM_ASPECTS, _detokenize, aclsum
from effx.errors import DataLoadError

ACLSUM_INSTALLED = importlib.util.find_spec("aclsum") is not None
needs_aclsum = pytest.mark.skipif(not ACLSUM_INSTALLED, reason="`pip install --no-deps aclsum` not installed")


@needs_aclsum
def test_aclsum_splits_hold_papers_with_references():
    sizes = {split: len(aclsum(split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 100, "val": 50, "test": 100}
    ids = [p["id"] for split in ("train", "val", "test") for p in aclsum(split)]
    assert len(set(ids)) == 250  # the splits share no paper
    for paper in aclsum("test"):
        assert paper["title"] and paper["abstract"] and paper["introduction"] and paper["conclusion"]
        assert set(paper["summaries"]) == set(ACLSUM_ASPECTS) and all(paper["summaries"].values())
        assert paper["summary"] == " ".join(paper["summaries"][a] for a in ACLSUM_ASPECTS)


@needs_aclsum
def test_aclsum_first_n_and_readable_text():
    first = aclsum("test", n=3)
    assert [p["id"] for p in first] == [p["id"] for p in aclsum("test")[:3]]
    assert aclsum("val", n=0) == []
    text = first[0]["abstract"]
    assert text.startswith("Handling terminology is an important matter in a translation workflow. However")
    assert " ." not in text and "( " not in text
    assert "aclsum" not in sys.modules  # located, never imported (it would pull in `sienna`)


def test_detokenize_undoes_word_tokenization():
    assert _detokenize(["We use BERT ( Devlin et al. , 2019 ) .", " It 's fast ; it is n't slow ! "]) == (
        "We use BERT (Devlin et al., 2019). It's fast; it isn't slow!"
    )


def test_aclsum_bad_arguments():
    with pytest.raises(
        DataLoadError, match=r"unknown ACLSum split 'dev'; choose one of \('train', 'val', 'test'\)"
    ):
        aclsum("dev")
    with pytest.raises(DataLoadError, match="n must be a non-negative integer"):
        aclsum("test", n=-1)


def test_aclsum_missing_wheel_says_which_pip_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        effx.data.importlib.util, "find_spec", lambda name, *a: None if name == "aclsum" else real(name, *a)
    )
    with pytest.raises(DataLoadError, match=r"`pip install --no-deps aclsum`"):
        aclsum("test")


def test_aclsum_malformed_record_names_the_line(monkeypatch, tmp_path):
    (tmp_path / "test.jsonl").write_text('{"id": "a"}\n')
    monkeypatch.setattr(effx.data, "_aclsum_dir", lambda: tmp_path)
    with pytest.raises(DataLoadError, match=r"test.jsonl, line 1: not an ACLSum record \(KeyError"):
        aclsum("test")


class _Tokenizer:
    """Records how encode_prompts tokenizes; ``chat_template`` as a real tokenizer has it (None: a base model)."""

    def __init__(self, chat_template):
        self.chat_template, self.padding_side, self.calls = chat_template, "right", []

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return f"<turn>{messages[0]['content']}<model>"

    def __call__(self, texts, **kwargs):
        import torch

        self.calls.append((texts, kwargs["add_special_tokens"], self.padding_side))
        return {
            "input_ids": torch.ones(len(texts), 2, dtype=torch.long),
            "attention_mask": torch.ones(len(texts), 2),
        }


def test_encode_prompts_adds_special_tokens_unless_a_template_wrote_them():
    from effx.data import encode_prompts

    chat = _Tokenizer("{{ messages }}")
    encode_prompts(chat, ["hi"])
    assert chat.calls == [(["<turn>hi<model>"], False, "left")] and chat.padding_side == "right"
    base = _Tokenizer(None)  # a base model (Gemma 3 270M): plain text, with its <bos>
    encode_prompts(base, ["hi"])
    encode_prompts(base, ["hi"], chat=False)
    assert base.calls == [(["hi"], True, "left"), (["hi"], True, "left")]
