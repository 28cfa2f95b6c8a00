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
    assert main(["inspect", "--model", str(model_dir), "--passes", "no-such-pass"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("effx: error: unknown pass 'no-such-pass'") and "Traceback" not in err
    )  # before loading
    assert main(["generate", "--model", "/no/such/dir", "x"]) == 2
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
    assert main(["run", str(tmp_path / "nothing"), "w5"]) == 2
    assert "no plan.json" in capsys.readouterr().err


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "effx.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: effx" in result.stdout


def test_run_applies_the_tokenizers_own_chat_template(tmp_path):
    """``effx run`` renders the chat template that the exported tokenizer carries (transformers 5 writes it
    to chat_template.jinja), as ``apply_chat_template`` would, instead of guessing ChatML from a substring."""
    from effx.cli import chat_prompt, chat_template

    assert chat_prompt(tmp_path, "hi") == "hi"  # no template: the raw prompt
    assert chat_template(tmp_path) is None  # (tokenized with the tokenizer's own special tokens)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>"},
                "chat_template": "{{ bos_token }}[{{ messages[0]['content'] }}]",
            }
        )
    )
    assert chat_prompt(tmp_path, "hi") == "<s>[hi]"
    assert chat_template(tmp_path).startswith("{{ bos_token }}")
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert chat_prompt(tmp_path, "hi") == "<user>hi<assistant>"
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no user turns') }}")
    with pytest.raises(ValueError, match="refused the prompt: no user turns"):
        chat_prompt(tmp_path, "hi")


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("{{ 'x' * 10**9 }}", r"'\*' asks for 1 x 1000000000 items"),
        ("{{ [1, 2] * 10**8 }}", r"'\*' asks for 2 x 100000000"),
        ("{{ 10**(10**8) }}", r"'\*\*' asks for 10\*\*100000000"),
        ("{{ '%1000000000s' % 'x' }}", "a width of 1000000000"),
        ("{{ 'x'|center(10**9) }}", "the filter center asks for 1000000000"),
        ("{{ 'x'.ljust(10**9) }}", "a call's argument asks for 1000000000"),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            "the attribute 's' is 2097152 long",
        ),
        ("{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}", "its output passed the limit of 1048576"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deep"),
    ],
)
def test_chat_templates_are_bounded(tmp_path, template, words):
    """A chat template that asks for more than a prompt needs (memory or time) is stopped with one line naming
    its file, before the memory is spent; an ordinary template as long as its messages still renders."""
    from effx.cli import chat_prompt

    (tmp_path / "chat_template.jinja").write_text(template)
    with pytest.raises(ValueError, match=words) as err:
        chat_prompt(tmp_path, "hi")
    assert str(tmp_path / "chat_template.jinja") in str(err.value) and "\n" not in str(err.value)


def test_a_slow_chat_template_is_stopped_at_its_deadline(tmp_path, monkeypatch):
    import effx.chat
    from effx.cli import chat_prompt

    monkeypatch.setattr(effx.chat, "TEMPLATE_SECONDS", 0.2)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="ran for more than 0.2 s"):
        chat_prompt(tmp_path, "hi")
    # long messages are not refused: the limit grows with them
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    long = "z" * (2 << 20)
    assert chat_prompt(tmp_path, long) == f"[{long}]"


# -- effx chat ------------------------------------------------------------------------------------------------


def _session(replies, seen=None):
    """A ChatSession over a fake engine: each reply is a list of token ids; ``seen`` records the messages
    each turn was rendered from."""
    import io

    from effx.chat import ChatSession

    out = io.StringIO()
    queue = list(replies)

    def render(messages):
        if seen is not None:
            seen.append([dict(m) for m in messages])
        return messages

    def generate(ids, on_token, stats):
        for token in queue.pop(0):
            if token is KeyboardInterrupt:
                raise KeyboardInterrupt
            on_token(token)
        stats["drafted"], stats["accepted"] = 4, 3

    return ChatSession(
        render, generate, lambda ids: "".join(f"<{i}>" for i in ids), passes="p{x=1}", out=out
    ), out


def test_chat_keeps_the_history_and_resets_it():
    seen = []
    session, out = _session([[5, 6], [7], [8]], seen)
    session.run(iter(["hello", "again", "/reset", "fresh", "/quit", "never asked"]))
    assert seen[0] == [{"role": "user", "content": "hello"}]
    assert seen[1] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "<5><6>"},
        {"role": "user", "content": "again"},
    ]
    assert seen[2] == [{"role": "user", "content": "fresh"}]  # /reset forgot the first two turns
    assert len(seen) == 3 and "[conversation cleared]" in out.getvalue()
    assert "<5><6>\n" in out.getvalue()  # streamed as the tokens came


def test_chat_commands_and_stats():
    session, out = _session([[5, 6, 7]])
    session.run(iter(["/stats", "hi", "/stats", "/passes", "/frob", "/help"]))
    text = out.getvalue()
    assert "[stats] no reply yet" in text
    assert "[stats] 3 tokens in" in text and "drafts accepted 3/4 (75%)" in text
    assert "[passes] p{x=1}" in text and "[unknown command /frob]" in text and "/reset" in text


def test_ctrl_c_stops_a_reply_and_keeps_the_session():
    session, out = _session([[5, 6, KeyboardInterrupt, 9], [7]])
    session.run(iter(["long answer please", "next"]))
    assert session.messages[1] == {"role": "assistant", "content": "<5><6>"}  # what was said so far
    assert session.messages[3] == {"role": "assistant", "content": "<7>"}  # the session went on
    assert "[interrupted]" in out.getvalue() and session.last.tokens == 1


def test_chat_cli_interactive_and_predefined_prompts(model_dir, tmp_path, monkeypatch, capsys):
    """Driven through stdin: a reply, /stats with the exits' decisions, /passes, then end of input; and the
    predefined-prompt mode, which exits 0 after the last prompt, on torch and on an exported artifact."""
    import io

    passes = "early-exit{layers=0 thresholds=0.5}"
    monkeypatch.setattr("sys.stdin", io.StringIO("w5 w6 w7\n/stats\n/passes\n"))
    assert main(["chat", "--model", str(model_dir), "--passes", passes, "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "[stats]" in text and "tokens/s" in text and "mean exit depth" in text
    assert "[passes] early-exit{layers=0 thresholds=0.5}" in text

    assert main(["chat", "--model", str(model_dir), "--prompts", "builtin", "--max-new-tokens", "2"]) == 0
    text = capsys.readouterr().out
    from effx.data import PROMPTS

    assert text.count("[stats]") == len(PROMPTS) and f"> {PROMPTS[-1]}" in text

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6\n\nw7 w8 w9\n")
    art = tmp_path / "art"
    assert main(["export", "--model", str(model_dir), str(art)]) == 0
    capsys.readouterr()
    assert main(["chat", "--artifact", str(art), "--prompts", str(prompts), "--max-new-tokens", "3"]) == 0
    text = capsys.readouterr().out
    assert text.count("[stats]") == 2 and "> w7 w8 w9" in text


def test_chat_bad_input_is_one_line(model_dir, tmp_path, capsys):
    assert main(["chat", "--model", str(model_dir), "--prompts", str(tmp_path / "none.txt")]) == 2
    assert capsys.readouterr().err.startswith("effx: error: --prompts")
    assert main(["chat", "--model", str(model_dir), "--passes", "nope{"]) == 2
    assert capsys.readouterr().err.startswith("effx: error:")
    assert main(["chat", "--artifact", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("effx: error:") and "no plan.json" in err and "Traceback" not in err


def test_train_draft_writes_a_branch_the_pass_loads(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6 w7\nw8 w9\n\nw10 w11 w12 w13\nw14 w15\n")
    branch = tmp_path / "branch.safetensors"
    args = ["train-draft", "--model", str(model_dir), "--prompts", str(prompts)]
    small = ["--tokens", "40", "--new-tokens", "10", "--epochs", "1", "--text-tokens", "0"]
    assert main([*args, *small, "--vocab-k", "0", "--precision", "float32", "--out", str(branch)]) == 0
    out = capsys.readouterr().out
    assert "held-out acceptance" in out and f"weights={branch}" in out and "own generations" in out
    passes = f"draft-branch{{weights={branch} draft=3}}"
    assert (
        main(["generate", "--model", str(model_dir), "--passes", passes, "--max-new-tokens", "4", "w5"]) == 0
    )
    # bad arguments: a clean error before any work, no file
    bad = tmp_path / "bad.safetensors"
    assert main([*args, *small, "--ffn", "100000", "--out", str(bad)]) == 2
    assert "--ffn must be in 1.." in capsys.readouterr().err and not bad.exists()
    assert main([*args, *small, "--vocab-k", "-1", "--out", str(bad)]) == 2
    assert not bad.exists()
    with pytest.raises(SystemExit):  # argparse: an unknown precision is a usage error
        main([*args, *small, "--precision", "fp8", "--out", str(bad)])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err and not bad.exists()


def test_train_heads_writes_heads_the_exit_pass_loads(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6 w7\nw8 w9\n\nw10 w11 w12 w13\nw14 w15\n")
    heads = tmp_path / "heads.safetensors"
    args = ["train-heads", "--model", str(model_dir), "--layers", "0", "--prompts", str(prompts)]
    assert main([*args, "--tokens", "40", "--new-tokens", "10", "--rank", "8", "--out", str(heads)]) == 0
    out = capsys.readouterr().out
    assert "agreement before" in out and f"heads={heads}" in out and "own generations" in out
    passes = f"early-exit{{layers=0 mode=self-speculative head=trained heads={heads}}}"
    assert (
        main(["generate", "--model", str(model_dir), "--passes", passes, "--max-new-tokens", "4", "w5"]) == 0
    )
    # bad arguments: a clean error, no file
    bad = tmp_path / "bad.safetensors"
    assert main([*args[:3], "--layers", "ten", "--out", str(bad)]) == 2
    assert main([*args[:3], "--layers", "7", "--tokens", "20", "--out", str(bad)]) == 2
    assert "exit layers must be in 0..0" in capsys.readouterr().err and not bad.exists()
