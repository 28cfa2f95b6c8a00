"""One input contract for every generate front end (effx.runtime.inputs): the same bad value gives the same
GenerationInputError on torch, ONNX, seq2seq, Mamba and cascades; neutral values of generation fields pass."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import related_models, tiny_model
from test_recurrent import tiny_mamba
from test_seq2seq import tiny_bart

import effx
from effx.errors import GenerationInputError
from effx.runtime.inputs import GENERATION_FIELDS, check_arguments, check_ids, token_id

V = 96  # the tiny models' vocabulary


@functools.cache
def front_ends():
    """name -> generate(input_ids, attention_mask=None, **kwargs) of each front end, on tiny models."""
    from effx.exporters import onnx as exporter
    from effx.runtime import onnx as ort_runtime

    program = effx.transform(tiny_model("llama", layers=2, seed=3))
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="effx-inputs-"))
    onnx_gen = ort_runtime.load(exporter.export(program, root / "tiny"))
    small, large = related_models("llama", 0.2)
    cascade = effx.cascade(effx.transform(small), effx.transform(large), mode="verified")
    return {
        "torch": program.generate,
        "onnx": onnx_gen.generate,
        "seq2seq": effx.capture_seq2seq(tiny_bart(enc=1, dec=1)).generate,
        "mamba": effx.capture_mamba(tiny_mamba(layers=2)).generate,
        "cascade": cascade.generate,
    }


FRONT_ENDS = ["torch", "onnx", "seq2seq", "mamba", "cascade"]
IDS = [[5, 6, 7]]

# (what, input_ids, keywords, the error's words): the same for every front end
BAD = [
    ("negative id", [[5, -1, 7]], {}, "token id -1, outside the vocabulary"),
    ("id >= vocab", [[5, V, 7]], {}, f"token id {V}, outside the vocabulary"),
    ("float ids", [[5.0, 6.0, 7.0]], {}, "integer token ids"),
    ("bool ids", [[True, False, True]], {}, "integer token ids"),
    ("1-D ids", [5, 6, 7], {}, "2-D"),
    ("empty", [[]], {}, "empty prompt"),
    ("mask -1", IDS, {"attention_mask": [[-1, 1, 1]]}, "only 0"),
    ("mask 2", IDS, {"attention_mask": [[1, 2, 1]]}, "only 0"),
    ("mask shape", IDS, {"attention_mask": [[1, 1]]}, "does not match"),
    ("float eos", IDS, {"eos_token_id": 2.0}, "eos_token_id must be an integer"),
    ("eos >= vocab", IDS, {"eos_token_id": [3, V]}, "outside the vocabulary"),
    ("negative pad", IDS, {"pad_token_id": -1}, "pad_token_id=-1 is outside"),
    ("float pad", IDS, {"pad_token_id": 1.5}, "pad_token_id must be an integer"),
    ("max_new 0", IDS, {"max_new_tokens": 0}, r"max_new_tokens must be >= 1 \(an integer\)"),
    ("max_new float", IDS, {"max_new_tokens": 2.5}, r"max_new_tokens must be >= 1 \(an integer\)"),
    ("num_beams", IDS, {"num_beams": 4}, r"does not implement the generation argument\(s\) \['num_beams'\]"),
    ("penalty", IDS, {"repetition_penalty": 2.0}, r"\['repetition_penalty'\]"),
    ("stop_strings", IDS, {"stop_strings": ["x"]}, r"\['stop_strings'\]"),
    ("unknown", IDS, {"beams": 4}, r"unknown generation argument\(s\) \['beams'\]"),
]


def _as(front: str, ids):
    return np.asarray(ids) if front == "onnx" else torch.tensor(ids)


@pytest.mark.parametrize("front", FRONT_ENDS)
@pytest.mark.parametrize(("what", "ids", "kwargs", "words"), BAD, ids=[b[0] for b in BAD])
def test_same_error_for_the_same_bad_value(front, what, ids, kwargs, words):
    generate = front_ends()[front]
    kwargs = {"max_new_tokens": 2, **kwargs}
    if "attention_mask" in kwargs:
        kwargs["attention_mask"] = _as(front, kwargs["attention_mask"])
    with pytest.raises(GenerationInputError, match=words):
        generate(_as(front, ids), **kwargs)


@pytest.mark.parametrize("front", FRONT_ENDS)
def test_neutral_generation_fields_are_accepted(front):
    """Fields at the values that ask for nothing change nothing, on every front end."""
    generate = front_ends()[front]
    ids = _as(front, [[5, 6, 7]])
    plain = generate(ids, max_new_tokens=3)
    neutral = generate(
        ids,
        max_new_tokens=3,
        num_beams=1,
        repetition_penalty=1.0,
        num_return_sequences=1,
        output_scores=False,
        use_cache=True,
        do_sample=False,
        stop_strings=None,
        pad_token_id=np.int64(0),  # numpy and 0-d tensor integers are ids too
        eos_token_id=torch.tensor(1),
    )
    plain_again = generate(ids, max_new_tokens=3, pad_token_id=0, eos_token_id=1)
    assert np.array_equal(np.asarray(neutral), np.asarray(plain_again))
    assert np.asarray(plain).shape[0] == 1


@pytest.mark.parametrize("front", ["torch", "onnx"])
def test_stop_must_answer_every_row(front):
    generate = front_ends()[front]
    ids = _as(front, [[5, 6, 7], [8, 9, 10]])
    with pytest.raises(GenerationInputError, match="returned 1 values for a batch of 2 rows"):
        generate(ids, max_new_tokens=2, stop=lambda tokens: [False])
    out = generate(ids, max_new_tokens=2, stop=lambda tokens: [True, False])
    assert np.asarray(out).shape == (2, 5)


def test_sampling_is_refused_by_greedy_front_ends():
    for front in ("seq2seq", "mamba", "cascade"):
        with pytest.raises(GenerationInputError, match="do_sample"):
            front_ends()[front](torch.tensor(IDS), max_new_tokens=2, do_sample=True)


def test_helpers():
    import array_api_compat.numpy as xp

    assert "num_beams" in GENERATION_FIELDS and "stop" not in GENERATION_FIELDS
    assert check_arguments({"top_k": 5, "num_beams": 1}, implemented={"top_k"}, front_end="x") == {"top_k": 5}
    with pytest.raises(GenerationInputError, match="unknown"):
        check_arguments({"nope": None}, front_end="x")
    ids, mask = check_ids(xp, [[1, 2]], np.array([[True, True]]), 5)
    assert ids.dtype == np.int64 and mask.tolist() == [[1, 1]]
    assert token_id("pad_token_id", np.int32(4), 5) == 4
    with pytest.raises(GenerationInputError, match="integer"):
        token_id("pad_token_id", True, 5)
    with pytest.raises(GenerationInputError, match="integer"):
        token_id("pad_token_id", torch.tensor(1.0), 5)
    # no vocabulary size known: a negative id is still a clear input error, not a TypeError
    with pytest.raises(GenerationInputError, match=r"pad_token_id=-2 is outside the vocabulary \(ids >= 0\)"):
        token_id("pad_token_id", -2, None)
    with pytest.raises(GenerationInputError, match="token id -1"):
        check_ids(xp, [[1, -1]], None, None)
