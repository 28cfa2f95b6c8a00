import json
import subprocess
import sys

import pytest
from conftest import tiny_model

from effx.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(path)
    vocab = {f"w{i}": i for i in range(96)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w2", pad_token="w0").save_pretrained(path)
    return path


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "inspect" in out and "smollm2-135m" in out


@pytest.mark.parametrize("cmd", ["generate", "inspect"])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert "--model" in out and "--passes" in out


def test_generate_on_a_local_model(model_dir, capsys):
    assert (
        main(["generate", "--model", str(model_dir), "--max-new-tokens", "5", "--no-stream", "w5 w6 w7"]) == 0
    )
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and "MFLOPs/token" in captured.err


def test_inspect_prints_stages_and_plan(model_dir, capsys):
    assert main(["inspect", "--model", str(model_dir), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "layer.1" in out and "decode FLOPs/token" in out and '"schema_version": 1' in out


def test_errors_are_one_line_not_tracebacks(model_dir, capsys):
    assert main(["inspect", "--model", str(model_dir), "--passes", "no-such-pass"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("effx: error: unknown pass 'no-such-pass'") and "Traceback" not in err
    )  # before loading
    assert main(["generate", "--model", "/no/such/dir", "x"]) == 1
    assert "unknown model" in capsys.readouterr().err


def test_export_then_run(model_dir, tmp_path, capsys):
    """effx export writes an artifact with the tokenizer; effx run generates from it with ONNX Runtime and
    says which provider ran; asking for CUDA where onnxruntime has none is a one-line error."""
    import onnxruntime as ort

    out = tmp_path / "art"
    assert (
        main(
            ["export", "--model", str(model_dir), "--passes", "neuron-mask{keep=0.5 score=random}", str(out)]
        )
        == 0
    )
    assert (out / "plan.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    assert "wrote" in capsys.readouterr().err
    assert main(["run", str(out), "w5 w6 w7", "--max-new-tokens", "4", "--provider", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "tokens/s (ONNX Runtime, CPUExecutionProvider)" in captured.err and captured.out.strip()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert main(["run", str(out), "w5", "--provider", "cuda"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("effx: error: --provider cuda") and "onnxruntime-gpu" in err
    assert main(["run", str(tmp_path / "nothing"), "w5"]) == 1
    assert "no plan.json" in capsys.readouterr().err


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "effx.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: effx" in result.stdout


def test_run_applies_the_tokenizers_own_chat_template(tmp_path):
    """``effx run`` renders the chat template that the exported tokenizer carries (transformers 5 writes it
    to chat_template.jinja), as ``apply_chat_template`` would, instead of guessing ChatML from a substring."""
    from effx.cli import chat_prompt

    assert chat_prompt(tmp_path, "hi") == "hi"  # no template: the raw prompt
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<s>"}, "chat_template": "{{ bos_token }}[{{ messages[0]['content'] }}]"})
    )
    assert chat_prompt(tmp_path, "hi") == "<s>[hi]"
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert chat_prompt(tmp_path, "hi") == "<user>hi<assistant>"
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no user turns') }}")
    with pytest.raises(ValueError, match="refused the prompt: no user turns"):
        chat_prompt(tmp_path, "hi")
