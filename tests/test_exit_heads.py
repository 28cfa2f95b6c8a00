import pytest
import torch
from conftest import tiny_model

import effx
from effx.errors import ArtifactError, PassConfigError, PassError
from effx.exit_heads import load_exit_heads, train_exit_heads
from effx.passes import EarlyExit


class CountingTokenizer:
    """A stand-in tokenizer: one id per character (tiny models have no tokenizer of their own)."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        class Enc:
            input_ids = [3 + (ord(c) % 90) for c in text]

        return Enc()


TEXTS = ["the quick brown fox jumps over the lazy dog " * 20, "lorem ipsum dolor sit amet " * 30]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = tiny_model("llama", layers=3, seed=4)
    program = effx.transform(model)
    path = tmp_path_factory.mktemp("heads") / "heads.safetensors"
    result = train_exit_heads(
        program,
        TEXTS,
        CountingTokenizer(),
        layers=[0, 1],
        rank=8,
        seq_len=32,
        max_tokens=256,
        epochs=4,
        lr=1e-2,
        batch_size=32,
        path=path,
        progress=False,
    )
    return model, program, path, result


def test_training_lowers_the_held_out_loss_and_writes_a_file(trained):
    _, program, path, result = trained
    # 8 chunks of 32 tokens: one chunk (a tenth, rounded up to one sequence) held out
    assert result["layers"] == [0, 1] and result["tokens"] == 224 and result["heldout"] == 32
    assert result["source"] == "text" and result["loss"] == "kl"
    for e in (0, 1):
        assert result["loss_after"][e] < result["loss_before"][e]
        assert 0 <= result["agreement_before"][e] <= 1 and 0 <= result["agreement_after"][e] <= 1
    heads = load_exit_heads(path, program.info)
    assert heads[1]["down"].shape == (8, 64) and heads[1]["up"].shape == (64, 8)


def test_trained_heads_in_the_exit_graph(trained):
    model, program, path, _ = trained
    prog = EarlyExit(layers=(1,), head="trained", heads=str(path)).apply(program).program
    roles = prog.exits[1].role_counts()
    assert roles["exit.adapter"] == 3  # down, up, residual add
    hidden = torch.randn(2, 1, 64)
    logits, _ = prog.exits[1].graph(hidden, hidden)
    heads = load_exit_heads(path, program.info)
    adapted = hidden + hidden @ heads[1]["down"].T @ heads[1]["up"].T
    torch.testing.assert_close(logits, program.head.graph(adapted)[0])
    # lossless with trained heads too
    ids = torch.tensor([[5, 9, 11, 40]])
    spec = effx.transform(
        model, passes=[EarlyExit(layers=(1,), head="trained", heads=str(path), mode="self-speculative")]
    )
    dense = program.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(spec.generate(ids, max_new_tokens=8, eos_token_id=[]), dense)


def test_bad_head_files(trained, tmp_path):
    model, program, path, _ = trained
    with pytest.raises(PassError, match="no such file"):
        effx.transform(model, passes=[EarlyExit(layers=(1,), head="trained", heads=str(tmp_path / "none"))])
    only1 = tmp_path / "only1.safetensors"
    train_exit_heads(
        program,
        TEXTS,
        CountingTokenizer(),
        layers=[1],
        rank=2,
        seq_len=32,
        max_tokens=64,
        epochs=1,
        path=only1,
        progress=False,
    )
    with pytest.raises(PassError, match=r"has no trained head for exit layers \[0\] \(it has \[1\]\)"):
        effx.transform(model, passes=[EarlyExit(layers=(0, 1), head="trained", heads=str(only1))])
    other = effx.transform(tiny_model("llama", layers=3, hidden=32, heads=2, kv_heads=1))
    with pytest.raises(ArtifactError, match="hidden_size=64; this one has 32"):
        load_exit_heads(path, other.info)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="not a readable"):
        load_exit_heads(junk, program.info)
    with pytest.raises(PassConfigError, match="needs heads=<file>"):
        EarlyExit(layers=(1,), head="trained")


def test_calibration_meets_its_target(trained):
    from effx.calibrate import NEVER

    model, program, path, _ = trained
    prog = effx.transform(model, passes=[EarlyExit(layers=(0, 1), head="trained", heads=str(path))])
    calibrated, report = prog.calibrate(TEXTS, CountingTokenizer(), target=0.9, seq_len=32, max_tokens=256)
    assert report.tokens == 256 and report.agreement >= 0.9
    assert set(report.thresholds) == {0, 1}
    for e, t in report.thresholds.items():
        assert calibrated.exits[e].attrs["threshold"] == t
        assert t == NEVER or report.exit_rates[e] > 0
    expected_layers = 3 - 2 * report.exit_rates[0] - report.exit_rates[1]
    assert report.mean_layers == pytest.approx(expected_layers)
    assert prog.exits[0].attrs["threshold"] == 0.9  # the input program is unchanged
    # target 1.0 on a stricter set can only raise thresholds
    _, strict = prog.calibrate(TEXTS, CountingTokenizer(), target=1.0, seq_len=32, max_tokens=256)
    assert all(strict.thresholds[e] >= report.thresholds[e] for e in (0, 1))
    assert strict.agreement == 1.0
    assert "agreement" in report.format()


def test_calibration_needs_exits(trained):
    _, program, _, _ = trained
    with pytest.raises(PassError, match="apply EarlyExit first"):
        program.calibrate(TEXTS, CountingTokenizer())


@pytest.fixture(scope="module")
def words():
    """A word-level tokenizer over the tiny models' ids ("w5" is id 5), with an end-of-text and a pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w1"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w2", pad_token="w0")


PROMPTS = ["w5 w9 w11", "w7 w8 w9 w10 w12 w13", "w40 w41", "w60 w3 w4 w5 w6"]


def test_own_generations_are_the_programs_greedy_continuations(trained, words):
    from effx.data import encode_prompts
    from effx.exit_heads import own_generations

    _, program, _, _ = trained
    seqs = own_generations(program, words, PROMPTS, max_new_tokens=6, progress=False)
    ids, mask = encode_prompts(words, PROMPTS)
    out = program.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    stop = set(program.plan.eos_token_ids) | {program.plan.pad_token_id}
    for row, (seq, first, last) in enumerate(seqs):
        prompt = ids[row][mask[row].bool()]
        new = out[row, ids.shape[1] :].tolist()
        cut = next((j + 1 for j, t in enumerate(new) if t in stop), len(new))
        assert first == len(prompt) - 1 and last == len(seq) - 1 == len(prompt) + cut - 1
        assert seq[: len(prompt)].tolist() == prompt.tolist() and seq[len(prompt) :].tolist() == new[:cut]
    # generation stops after the batch that reaches max_tokens
    few = own_generations(
        program, words, PROMPTS, max_new_tokens=6, max_tokens=1, batch_size=2, progress=False
    )
    assert len(few) == 2
    with pytest.raises(ValueError, match="at least one prompt"):
        own_generations(program, words, [], progress=False)


def test_collected_states_are_the_programs_own(trained, words):
    from effx.exit_heads import collect_exit_states, own_generations

    _, program, _, _ = trained
    seqs = own_generations(program, words, PROMPTS, max_new_tokens=6, progress=False)
    states = collect_exit_states(program, seqs, [1, 0], top_k=5, progress=False)
    n = sum(last - first for _, first, last in seqs)
    assert states.layers == [0, 1] and states.tokens == n and states.hidden[0].shape == (n, 64)
    at = 0
    for g, (seq, first, last) in enumerate(seqs):
        rows = slice(at, at + last - first)
        at += last - first
        assert (states.group[rows] == g).all()
        logprobs = program(seq[None])[0, first:last].float().log_softmax(-1)
        values, ids = logprobs.topk(5, dim=-1)
        torch.testing.assert_close(states.top_logprobs[rows], values, atol=1e-4, rtol=1e-4)
        # a greedy generation: the final layer's top token at each kept position is the next token
        assert states.top_ids[rows, 0].tolist() == seq[first + 1 : last + 1].tolist() == ids[:, 0].tolist()
    train, held = states.split(0.25)  # one of four sequences held out, whole
    assert len(train) + len(held) == n and set(states.group[held].tolist()) == {3}
    with pytest.raises(ValueError, match=r"exit layers must be in 0..1"):
        collect_exit_states(program, seqs, [2], progress=False)


def test_fit_on_a_draft_vocabulary_scores_only_it(trained, words, tmp_path):
    import json

    from effx.exit_heads import (
        collect_exit_states,
        exit_agreement,
        fit_exit_heads,
        own_generations,
        save_exit_heads,
    )
    from effx.passes import VocabReduce

    model, program, _, _ = trained
    seqs = own_generations(program, words, PROMPTS * 2, max_new_tokens=12, progress=False)
    states = collect_exit_states(program, seqs, [0], progress=False)
    greedy = states.top_ids[:, 0]
    ranked = torch.bincount(greedy, minlength=program.info.vocab_size).argsort(descending=True)
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"ids": ranked.tolist()}))
    result = fit_exit_heads(
        program,
        states,
        rank=64,
        loss="greedy",
        vocab=str(vocab),
        vocab_k=4,
        epochs=6,
        lr=1e-2,
        batch_size=16,
        holdout=0.25,
        progress=False,
    )
    assert result["vocab_k"] == 4 and result["rank"] == 64 and set(result["seconds"]) == {0}
    _, held = states.split(0.25)
    eos = set(program.plan.eos_token_ids)
    kept = set(ranked[: 4 - len(eos)].tolist()) | eos
    reachable = sum(int(t) in kept for t in greedy[held]) / len(held)
    assert result["agreement_after"][0] <= reachable + 1e-9  # ids outside the subset are never drafted
    path = save_exit_heads(program, result, tmp_path / "heads.safetensors")
    # the file, read back, scores the held-out positions as the fit did
    subset = {"vocab": str(vocab), "vocab_k": 4, "holdout": 0.25}
    assert exit_agreement(program, states, path, **subset) == result["agreement_after"]
    assert exit_agreement(program, states, **subset) == result["agreement_before"]
    # drafting through the reduced exit with these heads stays lossless
    ids = torch.tensor([[5, 9, 11, 40]])
    spec = effx.transform(
        model,
        passes=[
            EarlyExit(layers=(0,), head="trained", heads=str(path), mode="self-speculative", thresholds=(0,)),
            VocabReduce(where="draft", vocab=str(vocab), k=4),
        ],
    )
    dense = program.generate(ids, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(spec.generate(ids, max_new_tokens=10, eos_token_id=[]), dense)


def test_fit_refuses_what_it_cannot_train(trained, words):
    from effx.exit_heads import collect_exit_states, fit_exit_heads, own_generations

    _, program, _, _ = trained
    states = collect_exit_states(
        program,
        own_generations(program, words, PROMPTS[:1], max_new_tokens=4, progress=False),
        [0],
        progress=False,
    )
    for kwargs, message in [
        ({"rank": 0}, r"rank must be in 1..64"),
        ({"rank": 65}, r"rank must be in 1..64"),
        ({"loss": "mse"}, "loss must be one of kl, greedy"),
        ({"layers": [1]}, r"the states hold layers \[0\], not \[1\]"),
        ({"vocab_k": 8}, "vocab_k needs vocab="),
        ({"vocab": "ranking.json"}, "needs vocab_k"),
    ]:
        with pytest.raises(ValueError, match=message):
            fit_exit_heads(program, states, progress=False, **kwargs)


def _heads_file(path, info, tensors, layers=(1,)):
    """A heads file as ``save_exit_heads`` writes it, with the given tensors (to plant what a hostile or
    hand-edited file holds)."""
    import json

    from safetensors.torch import save_file

    from effx.formats import EXIT_HEADS_KIND

    meta = {"kind": EXIT_HEADS_KIND, "layers": list(layers)}
    meta.update({k: getattr(info, k) for k in ("architecture", "hidden_size", "num_layers", "vocab_size")})
    save_file(tensors, str(path), metadata={"effx": json.dumps(meta)})
    return str(path)


def _good(rank=4, d=64, dtype=torch.float32):
    return {"exit.1.down": torch.randn(rank, d).to(dtype), "exit.1.up": torch.randn(d, rank).to(dtype)}


@pytest.mark.parametrize(
    ("tensors", "layers", "words"),
    [
        (_good(dtype=torch.float64), (1,), "exit.1.down is float64; exit heads are float32"),
        (_good(dtype=torch.int32), (1,), "exit.1.down is int32"),
        (
            {**_good(), "exit.1.up": torch.full((64, 4), float("nan"))},
            (1,),
            "exit.1.up holds NaN or infinite",
        ),
        ({**_good(), "exit.1.down": torch.full((4, 64), float("inf"))}, (1,), "NaN or infinite"),
        ({**_good(), "exit.1.up": torch.randn(4, 64)}, (1,), r"down \[4, 64\] and up \[4, 64\]; expected"),
        ({**_good(), "exit.1.down": torch.randn(4, 32)}, (1,), "hidden_size 64"),
        ({**_good(), "exit.1.down": torch.randn(64)}, (1,), r"down \[64\]"),
        (_good(rank=65), (1,), "rank 65; expected 1..64"),
        (
            {"exit.5.down": torch.randn(4, 64), "exit.5.up": torch.randn(64, 4)},
            (5,),
            r"exit layer 5 is not in 0..1",
        ),
        (_good(), (), "lists no exit layers"),
    ],
)
def test_a_bad_heads_file_is_refused_before_capture(monkeypatch, tmp_path, tensors, layers, words):
    import importlib

    capture = importlib.import_module("effx.capture")
    model = tiny_model("llama", layers=3)
    path = _heads_file(
        tmp_path / "heads.safetensors", capture.info_from_config(model.config), tensors, layers
    )
    monkeypatch.setattr(capture, "capture", lambda *a, **k: pytest.fail("capture started"))
    with pytest.raises(PassConfigError, match=words) as err:
        effx.transform(model, passes=[EarlyExit(layers=(1,), head="trained", heads=path)])
    assert "early-exit heads" in str(err.value) and path in str(err.value) and "\n" not in str(err.value)


def test_half_precision_heads_are_widened_exactly(tmp_path):
    model = tiny_model("llama", layers=3)
    program = effx.transform(model)
    half = _good(dtype=torch.bfloat16)
    path = _heads_file(tmp_path / "heads.safetensors", program.info, half)
    heads = load_exit_heads(path, program.info)
    assert heads[1]["down"].dtype == torch.float32 and torch.equal(
        heads[1]["down"], half["exit.1.down"].float()
    )
    prog = EarlyExit(layers=(1,), head="trained", heads=path).apply(program).program
    hidden = torch.randn(1, 1, 64)
    adapted = hidden + hidden @ heads[1]["down"].T @ heads[1]["up"].T
    torch.testing.assert_close(prog.exits[1].graph(hidden, hidden)[0], program.head.graph(adapted)[0])
