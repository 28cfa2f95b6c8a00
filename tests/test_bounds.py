"""Bounds from the model, not the setting: every size a setting derives is checked against the model's own
limits, and every refusal that needs no weights comes before capture (Pass.check_model, check_after)."""

from __future__ import annotations

import importlib

import pytest
from conftest import tiny_model

import effx
from effx.errors import PassConfigError, PassError, PassPreconditionError
from effx.passes import PassManager

capture_module = importlib.import_module("effx.capture")


@pytest.fixture()
def no_capture(monkeypatch):
    """Capture fails the test: the refusal must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("capture started")

    monkeypatch.setattr(capture_module, "capture", refuse)


@pytest.mark.parametrize(
    ("pipeline", "error", "words"),
    [
        ("early-exit{layers=1 mode=self-speculative draft=10000000}", PassConfigError, "draft=10000000 exceeds the model's max_positions"),
        ("prompt-lookup{draft=1000000}", PassConfigError, "draft=1000000 exceeds the model's max_positions"),
        (f"quantize{{group={2**40}}}", PassConfigError, f"group={2**40} exceeds the model's hidden_size"),
        ("token-drop{at_layers=1 keep=0.5 queries=1000000}", PassConfigError, "queries=1000000 exceeds the model's max_positions"),
        ("early-exit{layers=40}", PassError, "out of range"),
        ("token-drop{at_layers=40 keep=0.5}", PassConfigError, "out of range"),
        ("neuron-mask{layers=0,40 mode=static score=random}", PassError, "out of range"),
        ("early-exit{layers=1 head=trained heads=/nonexistent/heads.safetensors}", PassConfigError, "no such file"),
        ("neuron-mask{mode=threshold profile=/nonexistent/profile.safetensors}", PassConfigError, "no such file"),
        ("early-exit{layers=0,1}, vocab-reduce{k=100000 where=exits}", PassConfigError, "exceeds the model's vocab_size"),
        ("early-exit{layers=1}, prompt-lookup", PassPreconditionError, "lossy early exits"),
        ("early-exit{layers=1}, early-exit{layers=2}", PassPreconditionError, "already placed exits"),
        ("neuron-mask{mode=core}, token-drop{at_layers=1 keep=0.5}", PassPreconditionError, "own the prefill"),
        ("vocab-reduce{k=8 where=exits}", PassPreconditionError, "has none"),
    ],
)
def test_refused_before_capture(no_capture, pipeline, error, words):
    with pytest.raises(error, match=words):
        effx.transform(tiny_model("llama", layers=4), pipeline)


def test_errors_name_the_pass():
    info = capture_module.info_from_config(tiny_model("llama", layers=4).config)
    with pytest.raises(PassConfigError, match=r"pass 'prompt-lookup' \(#1; after: none\).*draft=10000"):
        PassManager("prompt-lookup{draft=10000}").check_model(info)
    PassManager("early-exit{layers=1 mode=self-speculative}, prompt-lookup").check_model(info)  # allowed


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_thresholds_must_be_finite(value):
    with pytest.raises(PassConfigError, match="finite"):
        effx.parse_pipeline(f"early-exit{{layers=1 thresholds={value}}}")


def test_draft_within_bounds_still_runs():
    import torch

    program = effx.transform(tiny_model("llama", layers=4), "early-exit{layers=1 mode=self-speculative draft=4}")
    out = program.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3)
    assert out.shape == (1, 6)


# -- the command line: refusals before the model loads, usage errors exit 2 --------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m")
    tiny_model("llama", layers=4).save_pretrained(path)
    return path


def test_cli_refuses_from_the_config_before_loading(model_dir, monkeypatch, capsys):
    from effx.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(effx.models, "load", refuse)
    assert main(["inspect", "--model", str(model_dir), "--passes", "early-exit{layers=40}"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["inspect", "--model", str(model_dir), "--passes", "prompt-lookup{draft=1000000}"]) == 2
    assert "exceeds the model's max_positions" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "--context", "-5"],
        ["train-heads", "--tokens", "-1", "--layers", "1"],
        ["generate", "--max-new-tokens", "0", "x"],
        ["chat", "--max-new-tokens", "abc"],
    ],
)
def test_cli_usage_errors_exit_2(argv, capsys):
    from effx.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "expected an integer >= 1" in capsys.readouterr().err


def test_chat_artifact_refuses_model_and_passes(tmp_path, capsys):
    from effx.cli import main

    for extra in (["--passes", "early-exit{layers=1}"], ["--model", "smollm2-135m"], ["--kernels", "fast"]):
        assert main(["chat", "--artifact", str(tmp_path), *extra]) == 2
        assert "--artifact runs the artifact's own model" in capsys.readouterr().err
