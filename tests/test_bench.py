"""effx bench: sweep parsing, configuration expansion, the result schema, dense-identical configurations,
the Markdown table, the plot and the CLI, on tiny random models with a word-level tokenizer."""

import importlib.util
import json
import math

import pytest
import torch
from conftest import tiny_model

import effx
from effx import bench
from effx.bench import BenchConfig, BenchConfigError, BenchDataError, Sample
from effx.cli import main
from effx.errors import PassConfigError
from effx.passes import EarlyExit, NeuronMask, TokenDrop, VocabReduce, parse_pipeline

V = 96


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and on a shared machine two threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w1"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w2", pad_token="w0")


def _words(seed: int, n: int) -> str:
    return " ".join(f"w{3 + (seed * 7 + i * 13) % (V - 3)}" for i in range(n))


HELDOUT = [_words(s, 80) for s in range(4)]


# -- sweeps ----------------------------------------------------------------------------------------------


def test_range_sweep_includes_stop_and_has_clean_values():
    s = bench.parse_sweep("early-exit.thresholds=0.5:0.95:0.05")
    assert (s.pass_name, s.field) == ("early-exit", "thresholds")
    assert len(s.values) == 10 and s.values[0] == 0.5 and s.values[-1] == 0.95
    assert s.values[3] == 0.65  # no 0.6500000000000001 in names and JSON
    assert bench.parse_sweep("token-drop.protect_last=1:7:2").values == (1, 3, 5, 7)


def test_list_sweep_singular_alias_and_tuples():
    assert bench.parse_sweep("neuron-mask.keep=0.3,0.5,0.7").values == (0.3, 0.5, 0.7)
    assert bench.parse_sweep("early-exit.threshold=0.9").field == "thresholds"
    assert bench.parse_sweep("token-drop.keep=0.75/0.5,0.5/0.3").values == ((0.75, 0.5), (0.5, 0.3))
    assert bench.parse_sweep("early-exit.measure=entropy,top2-gap").values == ("entropy", "top2-gap")


@pytest.mark.parametrize(
    "text, message",
    [
        ("early-exit.thresholds", "not of the form"),
        ("thresholds=0.5", "not of the form"),
        ("no-such-pass.keep=0.5", "unknown pass 'no-such-pass'"),
        ("neuron-mask.kep=0.5", "has no field 'kep'"),
        ("neuron-mask.keep=0.5:0.9", "three numbers"),
        ("neuron-mask.keep=a:0.9:0.1", "start 'a' is not a number"),
        ("neuron-mask.keep=0.5:0.9:0", "step must be > 0"),
        ("neuron-mask.keep=0.5:0.9:-0.1", "step must be > 0"),
        ("neuron-mask.keep=0.9:0.5:0.1", "range is empty"),
        ("neuron-mask.keep=0:1:0.001", "more than the 64 configurations"),
        ("neuron-mask.keep=0.5,,0.7", "empty value"),
        ("neuron-mask.keep=0.5,0.5", "values repeat"),
        ("neuron-mask.keep=", "no values"),
    ],
)
def test_bad_sweeps_are_typed_errors_naming_the_sweep(text, message):
    with pytest.raises(BenchConfigError, match=message) as e:
        bench.parse_sweep(text)
    assert isinstance(e.value, PassConfigError) and repr(text) in str(e.value)


def test_expand_sets_fields_adds_missing_passes_and_makes_a_grid():
    configs = bench.expand_configs(
        "early-exit{layers=0,1 thresholds=0.9}", ["early-exit.thresholds=0.5,0.9", "token-drop.at_layers=1"]
    )
    assert [c.name for c in configs] == [
        "early-exit.thresholds=0.5 token-drop.at_layers=1",
        "early-exit.thresholds=0.9 token-drop.at_layers=1",
    ]
    first = configs[0].passes
    assert first[0] == EarlyExit(layers=(0, 1), thresholds=(0.5,)) and first[1] == TokenDrop(at_layers=(1,))
    assert parse_pipeline(configs[0].pipeline) == list(first)  # the pipeline string reads back
    # a swept pass's fields are set together: keep alone would need a profile, with score=random it does not
    grid = bench.expand_configs(
        "", ["neuron-mask.keep=0.3,0.5,0.7", "neuron-mask.score=random", "neuron-mask.seed=1,2"]
    )
    assert len(grid) == 6 and grid[5].passes == (NeuronMask(keep=0.7, score="random", seed=2),)
    assert bench.expand_configs("token-drop{at_layers=2}")[0].passes == (TokenDrop(at_layers=(2,)),)


def test_expand_errors():
    with pytest.raises(BenchConfigError, match="more than max_configs=5"):
        bench.expand_configs("", ["neuron-mask.keep=0.1,0.2,0.3", "neuron-mask.seed=1,2"], max_configs=5)
    with pytest.raises(BenchConfigError, match=r"keep=1.5: neuron-mask keep must be a fraction"):
        bench.expand_configs("neuron-mask{score=random}", ["neuron-mask.keep=0.5,1.5"])
    with pytest.raises(BenchConfigError, match="early-exit needs exactly one of.*added with its defaults"):
        bench.expand_configs("", ["early-exit.thresholds=0.5"])
    with pytest.raises(BenchConfigError, match="sweep them or calibrate, not both"):
        bench.expand_configs("early-exit{layers=1}", ["early-exit.thresholds=0.5,0.9"], calibrate=0.9)
    with pytest.raises(BenchConfigError, match="needs an early-exit pass"):
        bench.expand_configs("token-drop{at_layers=1}", calibrate=0.9)
    with pytest.raises(BenchConfigError, match=r"agreement in \(0, 1\], got 1.5"):
        bench.expand_configs("early-exit{layers=1}", calibrate=1.5)
    calibrated = bench.expand_configs("", ["early-exit.layers=1,2"], calibrate=0.9)
    assert [c.calibrate for c in calibrated] == [0.9, 0.9] and calibrated[0].name.endswith("calibrated 0.9")
    with pytest.raises(BenchConfigError, match="swept twice"):
        bench.expand_configs("", ["neuron-mask.keep=0.5", "neuron-mask.keep=0.7"])


# -- data ------------------------------------------------------------------------------------------------


def test_load_samples_from_files(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        json.dumps({"prompt": "w5 w6", "reference": "w7"}) + "\n" + json.dumps({"prompt": "w8"}) + "\n"
    )
    assert bench.load_samples(str(jsonl), 5) == [Sample("w5 w6", "w7"), Sample("w8", None)]
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,reference\nw5 w6,w9\nw3,w4\n")
    assert bench.load_samples(str(csv), 1) == [Sample("w5 w6", "w9")]
    txt = tmp_path / "d.txt"
    txt.write_text("w5 w6\n\nw7\n")
    assert bench.load_samples(str(txt), 9) == [Sample("w5 w6"), Sample("w7")]
    assert len(bench.load_samples("suite", 3)) == 3 and bench.load_samples("pydoc", 2)[0].reference is None
    suite = bench.load_samples("suite", 8)
    # references only where the prompt has one honest answer: the summary, the question on a context, the
    # translation
    assert [k for k, sample in enumerate(suite) if sample.reference] == [2, 3, 7]
    assert "Physics" in suite[3].reference and "Chemistry" in suite[3].reference


def test_aclsum_prompts_carry_references():
    if importlib.util.find_spec("aclsum") is None:
        pytest.skip("the aclsum wheel is not installed (pip install --no-deps aclsum)")
    samples = bench.load_samples("aclsum", 2)
    assert len(samples) == 2 and all(s.reference and "Abstract:" in s.prompt for s in samples)
    assert "aclsum" in bench.data_choices()


def test_load_samples_errors(tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text(json.dumps({"text": "w5"}) + "\n")
    with pytest.raises(BenchDataError, match="needs a 'prompt' field"):
        bench.load_samples(str(bad), 2)
    with pytest.raises(BenchDataError, match="no such file"):
        bench.load_samples(str(tmp_path / "missing.jsonl"), 2)
    with pytest.raises(BenchDataError, match="unknown data 'nope'"):
        bench.load_samples("nope", 2)
    with pytest.raises(BenchDataError, match="integer >= 1"):
        bench.load_samples("suite", 0)


# -- a run on a tiny model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def result(tokenizer, tmp_path_factory):
    model = tiny_model("llama", layers=3, seed=2)
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.json"
    vocab.write_text(json.dumps({"ids": list(range(3, 20))}))
    configs = [
        BenchConfig("same pipeline as dense"),  # no passes: the dense program, timed as a configuration
        BenchConfig("token-drop keep 1.0", (TokenDrop(at_layers=(1,), keep=(1.0,)),)),  # identity setting
        BenchConfig("random neuron mask 0.3", (NeuronMask(keep=0.3, score="random"),)),
        BenchConfig("early exit 0.05", (EarlyExit(layers=(0,), thresholds=(0.05,)),)),
        BenchConfig("early exit calibrated", (EarlyExit(layers=(0, 1)),), calibrate=0.9),
        # never falls back: held-out tokens outside its 8 ids get probability 0, so perplexity is infinite
        BenchConfig("reduced head k=8", (VocabReduce(k=8, where="head", vocab=str(vocab), fallback=0.0),)),
    ]
    samples = [Sample(_words(s, 6 + s), _words(s + 9, 5)) for s in range(2)]
    return bench.run_bench(
        model,
        tokenizer,
        configs,
        samples,
        model_name="tiny",
        data="test",
        new_tokens=6,
        repeats=2,
        chat=False,
        heldout=HELDOUT,
        heldout_tokens=128,
        seq_len=32,
        calib_texts=HELDOUT,
        progress=False,
    )


def test_result_follows_the_schema(result, tmp_path):
    bench.validate_result(result)
    assert result["schema"] == "effx-bench" and result["version"] == 1
    assert {"cpu_count", "python", "torch", "transformers", "effx"} <= set(result["machine"])
    assert result["settings"]["repeats"] == 2 and result["settings"]["heldout_tokens"] == 128
    names = [c["name"] for c in result["configs"]]
    assert names[0] == "dense" and len(names) == 7
    for c in result["configs"]:
        assert len(c["samples"]) == 4 and len(c["outputs"]) == 2  # 2 prompts x 2 repeats; texts of repeat 1
        assert isinstance(c["metrics"]["rouge_l_reference"], float)
        assert 0 <= c["metrics"]["bleu_reference"] <= 1 and 0 <= c["metrics"]["bleu_dense"] <= 1
        finite = {
            k: v for k, v in c["ratios"].items() if c["name"] != "reduced head k=8" or k != "perplexity"
        }
        assert all(isinstance(v, float) and math.isfinite(v) for v in finite.values())
    mask = result["configs"][3]
    assert mask["ratios"]["weights"] < 1 and mask["ratios"]["flops"] < 1
    assert mask["passes"] == [NeuronMask(keep=0.3, score="random").to_json()]
    assert "mean_layers" in result["configs"][4]["metrics"]["stats"]
    calibration = result["configs"][5]["calibration"]
    assert calibration["target"] == 0.9 and set(calibration["thresholds"]) == {"0", "1"}
    assert all(c["calibration"] is None for c in result["configs"][:5])
    reduced = result["configs"][6]
    assert reduced["metrics"]["perplexity"] is None and reduced["ratios"]["perplexity"] is None
    assert (
        0 < reduced["metrics"]["zero_prob_share"] < 1
        and result["configs"][0]["metrics"]["zero_prob_share"] == 0
    )
    data = json.loads(json.dumps(result))  # JSON-serializable as it is
    bench.validate_result(data)
    broken = json.loads(json.dumps(result))
    del broken["configs"][1]["metrics"]["agreement"]
    with pytest.raises(BenchDataError, match=r"configs\[1\].metrics has no 'agreement'"):
        bench.validate_result(broken)
    broken = {**data, "version": 2}
    with pytest.raises(BenchDataError, match="version 2"):
        bench.validate_result(broken)


def test_configurations_identical_to_dense_report_exact_quality(result):
    for c in result["configs"][:3]:  # dense itself, an empty pipeline, token-drop at keep 1.0
        m = c["metrics"]
        assert m["agreement"] == 1.0 and m["rouge_l_dense"] == 1.0 and m["same_tokens"] == 1.0
        assert (
            m["bleu_dense"] == 1.0
            and m["bleu_reference"] == result["configs"][0]["metrics"]["bleu_reference"]
        )
        assert c["outputs"] == result["configs"][0]["outputs"]
        assert c["ratios"]["perplexity"] == pytest.approx(1.0, rel=1e-6)
        assert c["ratios"]["flops"] == 1.0
        # Timing on a shared 2-core machine at these tiny sizes swings by tens of percent from run to run,
        # so a tight bound here would fail by chance: the ratio is only required to be a sane measurement.
        assert 0.05 < c["ratios"]["speedup"] < 20 and 0.05 < c["ratios"]["ttft_speedup"] < 20
    assert result["configs"][0]["ratios"]["speedup"] == 1.0  # paired with itself
    dense = result["configs"][0]["metrics"]
    mask = result["configs"][3]["metrics"]
    assert mask["agreement"] < 1.0 and mask["perplexity"] != pytest.approx(dense["perplexity"], rel=1e-3)
    lossy = result["configs"][4]["metrics"]  # nearly every token leaves at layer 0
    assert lossy["agreement"] < 0.9 and lossy["stats"]["mean_layers"] < 1.5
    assert lossy["bleu_dense"] < 1.0 and lossy["rouge_l_dense"] < 1.0
    # perplexity scores every token with the head that decodes it (effx.quality.perplexity): here the exit's
    assert lossy["perplexity"] != pytest.approx(dense["perplexity"], rel=1e-3)


@pytest.mark.parametrize(
    "passes",
    [
        [],
        [NeuronMask(keep=0.3, score="random")],
        [NeuronMask(mode="core", keep=0.5)],
        [TokenDrop(at_layers=(1,), keep=(0.5,))],
        [EarlyExit(layers=(0,), thresholds=(0.05,))],
    ],
    ids=["dense", "static-mask", "core-mask", "token-drop", "lossy-exit"],
)
def test_perplexity_from_the_agreement_pass_is_effx_quality_perplexity(passes, tokenizer):
    # run_bench computes agreement and perplexity in one forward pass: it must equal the library's definition
    from tqdm.auto import tqdm

    from effx.data import token_chunks
    from effx.quality import perplexity

    program = effx.transform(tiny_model("llama", layers=3, seed=2), passes)
    chunks = token_chunks(tokenizer, HELDOUT, 32, 128)
    with torch.inference_mode():  # as run_bench calls it
        scored = bench.run.score_heldout([bench.run.Entry("p", "", (), program)], chunks, tqdm(disable=True))
    assert scored.perplexity[0] == pytest.approx(
        perplexity(program, HELDOUT, tokenizer, seq_len=32, max_tokens=128), rel=1e-4
    )


def test_perplexity_scores_each_token_with_the_head_that_decodes_it(tokenizer):
    # the definition, computed independently in one teacher-forced pass over every exit: a token's
    # probability is the first exit's whose confidence passes its threshold, else the final head's; the
    # first token after the prompt comes from the prefill, which runs every layer
    from effx.calibrate import teacher_forced_exits
    from effx.data import token_chunks
    from effx.quality import perplexity

    program = effx.transform(
        tiny_model("llama", layers=3, seed=2), [EarlyExit(layers=(0, 1), thresholds=(0.35, 0.3))]
    )
    chunks = token_chunks(tokenizer, HELDOUT, 32, 128)
    nll, count, exited, final_nll = 0.0, 0, 0, 0.0
    with torch.inference_mode():
        for c in chunks:
            n, half = c.shape[1], c.shape[1] // 2
            teacher, exits = teacher_forced_exits(program, c)
            logp, decided = teacher[0].clone(), torch.zeros(n, dtype=torch.bool)
            for e, logits, conf in exits:
                leave = ~decided & (conf[0].float() >= program.exits[e].attrs["threshold"])
                logp[leave] = logits[0, leave].float().log_softmax(-1)
                decided |= leave
            logp[half - 1], decided[half - 1] = teacher[0, half - 1], False
            target = c[0, half:, None]
            nll -= float(logp[half - 1 : n - 1].gather(-1, target).sum())
            final_nll -= float(teacher[0, half - 1 : n - 1].gather(-1, target).sum())
            exited += int(decided[half - 1 : n - 1].sum())
            count += n - half
    assert 0 < exited < count  # some tokens leave early, some reach the final head
    ours = perplexity(program, HELDOUT, tokenizer, seq_len=32, max_tokens=128)
    assert ours == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert ours != pytest.approx(math.exp(final_nll / count), rel=1e-3)  # not the final head's


def test_table_plot_and_files(result, tmp_path):
    table = bench.format_table(result)
    lines = table.splitlines()
    assert lines[2].startswith("| config | tok/s | speed-up") and len(lines) == 4 + 7
    assert "| inf (" in lines[-1] and "of tokens get p=0) |" in lines[-1]
    assert lines[4].startswith("| dense |") and "| 1.00x |" in lines[4] and "1.000 | 1.000 |" in lines[4]
    paths = bench.write_outputs(result, tmp_path / "out")
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plot"].stat().st_size > 10_000
    assert paths["markdown"].read_text().startswith(table)
    seed = bench.format_path_table(result).splitlines()
    assert seed[0].startswith("| prompt | config | time s | x dense | ROUGE-L (ref) | ROUGE-L (dense) |")
    assert len(seed) == 2 + 2 * 7 + 7  # per prompt x config, then one aggregate row per config
    assert (
        seed[2].startswith("| 1 | dense |")
        and "| 1.00x |" in seed[2]
        and seed[2].endswith("all 3 layers 100% |")
    )
    assert seed[-7].startswith("| all | dense |") and seed[-1].startswith("| all | reduced head k=8 |")
    assert seed[-1].endswith("all 3 layers 100%, reduced head 100% |")  # no fallback: every token reduced
    assert "exit at layer 0 " in seed[-3]
    assert paths["markdown"].read_text().endswith(bench.format_path_table(result))
    assert bench.load_result(paths["json"]) == json.loads(json.dumps(result))


def test_paths_are_shares_of_the_generated_tokens(result):
    for c in result["configs"]:
        for s in c["samples"]:
            groups = [k for k in s["paths"] if "head" not in k], [k for k in s["paths"] if "head" in k]
            for keys in groups:
                assert not keys or sum(s["paths"][k] for k in keys) == pytest.approx(1.0)
    assert result["configs"][0]["metrics"]["paths"] == {"all 3 layers": 1.0}
    lossy = result["configs"][4]["metrics"]["paths"]  # nearly every decoded token leaves after layer 0
    assert lossy["exit at layer 0"] > 0.5 and set(lossy) <= {"exit at layer 0", "all 3 layers"}
    # the first token comes from the prefill, through every layer; 4 more decoded by exits, of 6 in all
    stats = {"exit_layers": [[1], [3], [2], [1], [1]]}
    assert bench.metrics.paths(stats, 6, 3) == {
        "exit at layer 0": 0.5,
        "exit at layer 1": pytest.approx(1 / 6),
        "all 3 layers": pytest.approx(2 / 6),
    }
    mean = bench.metrics.mean_paths([{"all 3 layers": 0.5, "exit at layer 1": 0.5}, {"exit at layer 0": 1.0}])
    assert mean == {"exit at layer 0": 0.5, "exit at layer 1": 0.25, "all 3 layers": 0.25}
    assert list(mean) == ["exit at layer 0", "exit at layer 1", "all 3 layers"]  # by depth
    spec = {"drafted": 12, "accepted": 5, "rounds": 3, "head_positions": 20, "head_fallbacks": 5}
    assert bench.metrics.paths(spec, 10, 3) == {
        "accepted draft": 0.5,
        "full model": 0.5,
        "reduced head": 0.75,
        "full head (fallback)": 0.25,
    }


def test_bleu_is_sacrebleu_on_a_zero_to_one_scale():
    from effx.quality import bleu

    ref = ["the cat sat on the mat today", "a dog ran across the wide green park"]
    assert bleu(ref, ref) == 1.0
    assert bleu(["a b"], ["a b"]) == 1.0  # too short for 4-grams, still identical
    partial = bleu(["the cat is on the mat today", "a dog ran across the park"], ref)
    assert 0.2 < partial < 0.9
    assert bleu(["x y z w v"], ["the cat sat on the mat"]) < 0.05
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        bleu(["a", "b"], ["a"])


def test_interleave_rotates_the_order_and_times_every_call():
    calls = []

    def runner(name):
        def run(x, on_token=None):
            calls.append(name)
            if on_token is not None:
                on_token(x)
            return (name, x)

        return run

    runs = bench.interleave(
        {n: runner(n) for n in "abc"}, [(1,), (2,)], repeats=2, on_token=True, warmup=(0,), progress=False
    )
    assert calls[:3] == ["a", "b", "c"]  # the warm-up
    # input 1 of repeat 1 starts with a, input 2 with b, repeat 2 shifts once more
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "b", "c", "a", "c", "a", "b"]
    assert set(runs) == {"a", "b", "c"} and all(len(r) == 2 and len(r[0]) == 2 for r in runs.values())
    assert bench.first_outputs(runs["b"]) == [("b", 1), ("b", 2)]
    call = runs["a"][1][1]
    assert call.seconds >= call.first_token_s >= 0
    assert bench.total_seconds(runs["a"]) > 0
    assert bench.timed(lambda: 5).first_token_s is None
    with pytest.raises(BenchConfigError, match="repeats must be an integer >= 1"):
        bench.interleave({"a": runner("a")}, [(1,)], repeats=0)


def test_pareto_front():
    points = [(1.0, 1.0), (0.9, 1.2), (0.8, 1.1), (0.5, 2.0), (0.95, 0.9)]
    assert bench.pareto_front(points) == [3, 1, 0]


def test_pipeline_string_round_trips():
    passes = parse_pipeline(
        "early-exit{layers=8,16 measure=top2-gap thresholds=0.4,0.5}, vocab-reduce{k=128}"
    )
    text = bench.pipeline_string(passes)
    assert text == "early-exit{layers=8,16 measure=top2-gap thresholds=0.4,0.5}, vocab-reduce{k=128}"
    assert parse_pipeline(text) == passes


def test_run_bench_rejects_bad_settings(tokenizer):
    model = tiny_model("llama", layers=2)
    with pytest.raises(BenchConfigError, match="new_tokens must be an integer >= 2"):
        bench.run_bench(model, tokenizer, [], ["w5"], new_tokens=1, progress=False)
    with pytest.raises(BenchConfigError, match="unique and not 'dense'"):
        bench.run_bench(model, tokenizer, [BenchConfig("dense")], ["w5"], progress=False)


# -- CLI -------------------------------------------------------------------------------------------------


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--sweep" in out and "--passes" in out and "--data" in out and "pareto" in out


def test_bench_bad_sweep_is_a_one_line_error_before_loading(capsys):
    # the model does not exist: the sweep must fail first, without a traceback
    assert main(["bench", "--model", "/no/such/model", "--sweep", "neuron-mask.keep=0.9:0.5:0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("effx: error: sweep 'neuron-mask.keep=0.9:0.5:0.1': the range is empty")
    assert "Traceback" not in err
    assert main(["bench", "--model", "/no/such/model", "--sweep", "neuron-mask.kep=1"]) == 2
    assert "has no field 'kep'" in capsys.readouterr().err


def test_bench_command_on_a_local_model(tmp_path, tokenizer, capsys, monkeypatch):
    path = tmp_path / "tiny"
    tiny_model("llama", layers=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    monkeypatch.setattr(effx.data, "pydoc_texts", lambda split="calib": HELDOUT)
    prompts = tmp_path / "p.txt"
    prompts.write_text("w5 w6 w7\nw8 w9\n")
    args = ["bench", "--model", str(path), "--passes", "token-drop{at_layers=1}", "--data", str(prompts)]
    args += [
        "--sweep",
        "token-drop.keep=0.5,1.0",
        "--prompts",
        "2",
        "--new-tokens",
        "3",
        "--heldout-tokens",
        "64",
    ]
    args += ["--no-chat-template", "--no-plot", "--out", str(tmp_path / "res")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| dense |" in out and "| token-drop.keep=0.5 |" in out and "| token-drop.keep=1.0 |" in out
    (written,) = (tmp_path / "res").glob("bench-*.json")
    data = bench.load_result(written)
    assert data["configs"][2]["metrics"]["agreement"] == 1.0  # keep=1.0 is the dense program


def test_default_quantize_step_follows_the_model_source():
    """int8 round-to-nearest for a model that did not come from a GGUF file (the file's own values
    otherwise: tested on SmolLM2 by the bench's own run)."""
    dense = effx.transform(tiny_model("llama"), passes=[])
    assert bench.default_quantize(dense) == "quantize{bits=8 symmetric=true}"
    assert [p.name for p in parse_pipeline(bench.default_quantize(dense))] == ["quantize"]


def test_bench_quantize_flag_is_for_the_defaults(capsys):
    assert main(["bench", "--model", "/no/such/model", "--passes", "quantize{bits=8}", "--quantize"]) == 2
    assert "--quantize adds to the default configurations" in capsys.readouterr().err


def test_bench_branch_flag_is_checked_before_the_model_loads(capsys, tmp_path):
    assert main(["bench", "--model", "/no/such/model", "--branch", str(tmp_path / "none.safetensors")]) == 2
    assert "--branch: no such file" in capsys.readouterr().err
    (tmp_path / "b.safetensors").write_bytes(b"")
    args = [
        "bench",
        "--model",
        "/no/such/model",
        "--branch",
        str(tmp_path / "b.safetensors"),
        "--passes",
        "x",
    ]
    assert main(args) == 2
    assert "--branch adds to the default configurations" in capsys.readouterr().err


def _config(name: str, speedup: float, ttft_speedup: float, tok_s, ttft_ms) -> dict:
    samples = [
        {"prompt": p, "repeat": r, "decode_tok_s": tok_s[p], "ttft_ms": ttft_ms[p]}
        for p in (0, 1)
        for r in (0, 1)
    ]
    return {"name": name, "ratios": {"speedup": speedup, "ttft_speedup": ttft_speedup}, "samples": samples}


def test_stacked_rows_compare_a_pass_on_its_base_with_the_pass_alone():
    result = {
        "configs": [
            _config("dense", 1.0, 1.0, (10, 20), (100, 200)),
            _config("mask", 1.5, 1.0, (15, 30), (100, 200)),
            _config("quantize{bits=8}", 2.0, 0.8, (20, 40), (125, 250)),
            _config("mask + quantize{bits=8}", 2.6, 0.8, (26, 52), (125, 250)),
            _config("drop", 1.0, 2.0, (10, 20), (50, 100)),
            _config("drop + quantize{bits=8}", 2.0, 1.6, (20, 40), (100, 125)),
            _config("exits + vocab", 1.1, 1.0, (11, 22), (100, 200)),  # its parts are no rows: not stacked
        ]
    }
    rows = bench.stacked_rows(result)
    assert [(r["pass"], r["base"]) for r in rows] == [
        ("mask", "quantize{bits=8}"),
        ("drop", "quantize{bits=8}"),
    ]
    mask, drop = rows
    assert mask["speedup_on_base"] == pytest.approx(1.3) and mask["kept"] == pytest.approx(1.3 / 1.5)
    assert mask["ttft_kept"] == pytest.approx(1.0)
    # TTFT over the base per sample: 125/100 and 250/125, median 1.625
    assert drop["ttft_speedup_on_base"] == pytest.approx(1.625) and drop["ttft_kept"] == pytest.approx(
        1.625 / 2
    )
    table = bench.format_stacked_table(result).splitlines()
    assert table[2].startswith("| pass | base | speed-up | on base | kept |")
    assert table[4] == "| mask | quantize{bits=8} | 1.50x | 1.30x | 87% | 1.00x | 1.00x | 100% |"
    assert bench.format_stacked_table({"configs": result["configs"][:3]}) == ""
