"""effx.frontend: a source (known name, HF directory, artifact) and a pipeline string to something runnable,
with one tokenizer and one chat-template renderer; the command line's exit statuses over it."""

import io
import json

import pytest
from conftest import tiny_model

import effx
from effx import frontend
from effx.cli import main
from effx.errors import ArtifactError, PassConfigError
from effx.testing import tiny_tokenizer

MESSAGES = [
    {"role": "user", "content": "w5 w6"},
    {"role": "assistant", "content": "w7"},
    {"role": "user", "content": "w8"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tiny_model("llama", layers=2).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)  # with a small chat template
    return path


@pytest.fixture(scope="module")
def artifact(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "art"
    assert main(["export", "--model", str(model_dir), str(out)]) == 0
    return out


# -- sources -------------------------------------------------------------------------------------------------


def test_each_source_kind_resolves_and_loads(model_dir, artifact):
    named = frontend.resolve("smollm2-135m")  # checked by name; nothing converted or loaded
    assert (named.kind, named.path) == ("name", "smollm2-135m")
    assert frontend.resolve().path == frontend.DEFAULT_MODEL

    hf = frontend.resolve(str(model_dir), "early-exit{layers=0 thresholds=0.5}", kernels="reference")
    assert hf.kind == "hf" and [p.name for p in hf.passes] == ["early-exit"] and hf.kernels == "reference"
    run = frontend.load(hf)
    assert run.program is not None and run.model is not None and run.tokenizer.hf is not None
    assert run.passes == "early-exit{layers=0 thresholds=0.5}" and run.num_layers == 2

    for source in (frontend.resolve(artifact=str(artifact)), frontend.resolve(str(artifact))):
        assert source.kind == "artifact" and source.passes == ()
        run = frontend.load(source)
        assert run.program is None and run.tokenizer.hf is None and run.num_layers == 2
        out = run.generate(run.batch(run.tokenizer.encode_chat("w5 w6")), max_new_tokens=3)
        assert out.shape[1] == len(run.tokenizer.encode_chat("w5 w6")) + 3


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"model": "no-such-model"}, "unknown model 'no-such-model'"),
        ({"artifact": "/no/such/artifact"}, "no such directory, so no plan.json"),
        ({"artifact": "MODEL_DIR"}, "has no plan.json"),
        ({"model": "EMPTY_DIR"}, "neither config.json"),
        ({"model": "ARTIFACT", "passes": "early-exit{layers=0}"}, "it runs the artifact's own model"),
        ({"artifact": "ARTIFACT", "model": "smollm2-135m"}, "--artifact runs the artifact's own model"),
        ({"artifact": "ARTIFACT", "kernels": "fast"}, "--artifact runs the artifact's own model"),
        ({"model": "ARTIFACT", "program": True}, "this command needs a model"),
    ],
)
def test_a_bad_source_is_a_usage_error_before_any_work(
    kwargs, words, model_dir, artifact, tmp_path, monkeypatch
):
    def loaded(*args, **kwargs):
        raise AssertionError("something was loaded")

    monkeypatch.setattr(effx.models, "load", loaded)
    monkeypatch.setattr(effx.models, "config", loaded)
    places = {"MODEL_DIR": str(model_dir), "EMPTY_DIR": str(tmp_path), "ARTIFACT": str(artifact)}
    kwargs = {k: places.get(v, v) for k, v in kwargs.items()}
    with pytest.raises(frontend.UsageError, match=words) as e:
        frontend.resolve(**kwargs)
    assert "\n" not in str(e.value)


def test_a_bad_pipeline_fails_before_the_model_loads(model_dir, monkeypatch):
    monkeypatch.setattr(effx.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(PassConfigError, match="unknown pass"):
        frontend.resolve(str(model_dir), "no-such-pass")
    with pytest.raises(frontend.UsageError, match="out of range"):  # refuted by the config alone
        frontend.resolve(str(model_dir), "early-exit{layers=40}")


def test_an_artifact_without_its_tokenizer_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="tokenizer.json is missing"):
        frontend.Tokenizer(directory=tmp_path)


# -- one chat template, rendered one way ----------------------------------------------------------------------


def test_the_sandbox_renders_as_transformers_does(model_dir, tmp_path):
    """A Hugging Face tokenizer's template renders in effx's bounded sandbox to what transformers'
    apply_chat_template gives, special tokens, break/continue and all; a saved tokenizer the same."""
    hf = tiny_tokenizer()
    hf.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert frontend.Tokenizer(hf).template.render(MESSAGES) == expected
    hf.save_pretrained(tmp_path)
    assert frontend.ChatTemplate.from_dir(tmp_path).render(MESSAGES) == expected
    assert frontend.chat_prompt(tmp_path, "w5") == hf.apply_chat_template(
        [{"role": "user", "content": "w5"}], tokenize=False, add_generation_prompt=True
    )


def test_a_template_that_refuses_or_breaks_is_one_effx_error(tmp_path):
    from effx.chat import TemplateError

    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system turns') }}")
    with pytest.raises(TemplateError, match="refused the prompt: no system turns"):
        frontend.chat_prompt(tmp_path, "hi")
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content | no_such_filter }}")
    with pytest.raises(TemplateError, match="chat_template.jinja failed") as e:
        frontend.chat_prompt(tmp_path, "hi")
    assert "\n" not in str(e.value)


def test_encode_chat_adds_special_tokens_only_without_a_template(model_dir):
    run = frontend.Tokenizer(tiny_tokenizer())
    templated = run.encode_chat("w6 w7")
    assert templated == run.encode(run.template.render([{"role": "user", "content": "w6 w7"}]))
    assert run.encode_chat("w6 w7", chat=False) == run.encode("w6 w7", special=True)
    base = frontend.Tokenizer(tiny_tokenizer(chat_template=False))
    assert base.template is None and base.encode_chat(MESSAGES) == base.encode("w5 w6\nw7\nw8", special=True)


def test_eval_and_chat_on_an_artifact_render_the_same_template(artifact, tmp_path, monkeypatch, capsys):
    """`effx chat --artifact` and `effx eval --artifact` (lm-eval's --apply_chat_template) render a
    conversation in the artifact's own template, in the same renderer."""
    from effx.harness import EffxLM

    rendered = []
    render = frontend.ChatTemplate.render

    def recording(self, messages, **kwargs):
        rendered.append(render(self, messages, **kwargs))
        return rendered[-1]

    monkeypatch.setattr(frontend.ChatTemplate, "render", recording)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6\n")
    assert (
        main(["chat", "--artifact", str(artifact), "--prompts", str(prompts), "--max-new-tokens", "2"]) == 0
    )
    capsys.readouterr()
    chat_text = rendered[-1]
    assert chat_text == "w3 w5 w6 w4 w5"  # tiny_tokenizer's template
    lm = EffxLM(artifact=str(artifact))
    assert lm.apply_chat_template([{"role": "user", "content": "w5 w6"}]) == chat_text
    assert lm.chat_template(True) == frontend.chat_template(artifact / "tokenizer")


# -- the command line's exit statuses ------------------------------------------------------------------------


def test_usage_errors_exit_2(model_dir, artifact, capsys):
    for argv in (
        ["generate", "--model", "no-such-model", "x"],
        ["inspect", "--model", str(model_dir), "--passes", "early-exit{layers="],
        ["generate", "--model", str(artifact), "x"],
        ["eval", "--artifact", str(artifact), "--passes", "early-exit{layers=1}", "--tasks", "effx_pydoc"],
        ["train-heads", "--model", str(model_dir), "--layers", "ten", "--out", "x.safetensors"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("effx: error:") and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # argparse's own
        main(["generate", "--max-new-tokens", "many", "x"])
    assert e.value.code == 2


def test_runtime_errors_exit_1_and_interrupts_130(tmp_path, monkeypatch, capsys):
    from effx.cli import commands

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "plan.json").write_text(json.dumps({"format": "nothing"}))
    assert main(["run", str(broken), "w5"]) == 1  # an artifact that fails its checks: the work failed
    assert capsys.readouterr().err.startswith("effx: error:")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "passes", interrupted)
    assert main(["passes"]) == 130
    assert capsys.readouterr().err == "effx: interrupted\n"

    def fails(args):
        raise ArtifactError("the disk went away")

    monkeypatch.setattr(commands, "passes", fails)
    assert main(["passes"]) == 1
    assert capsys.readouterr().err == "effx: error: the disk went away\n"


def test_no_command_prints_the_help_and_exits_2(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    assert main([]) == 2 and "usage: effx" in out.getvalue()
