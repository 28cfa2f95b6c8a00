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
        path=path,
        progress=False,
    )
    return model, program, path, result


def test_training_lowers_kl_and_writes_a_file(trained):
    _, program, path, result = trained
    assert result["layers"] == [0, 1] and result["tokens"] == 256
    for e in (0, 1):
        assert result["kl_after"][e] < result["kl_before"][e]
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
    with pytest.raises(PassError, match="does not exist"):
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
