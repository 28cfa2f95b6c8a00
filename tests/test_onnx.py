import importlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import left_padded_batch, opened, related_models, tiny_model

import effx
from effx.artifact import write_manifest
from effx.errors import ArtifactError
from effx.exporters import onnx as exporter
from effx.passes import EarlyExit, NeuronMask
from effx.runtime import onnx as ort_runtime
from effx.runtime import onnx_backend
from effx.testing import PARITY_PASSES, TINY_VOCAB

V = TINY_VOCAB


@pytest.fixture(scope="module")
def program():
    return effx.transform(tiny_model("llama", layers=3, seed=4))


@pytest.fixture(scope="module")
def artifact(program, tmp_path_factory):
    return exporter.export(program, tmp_path_factory.mktemp("a") / "tiny")


def test_artifact_layout_and_checker(artifact):
    import onnx

    manifest = json.loads((artifact / "plan.json").read_text())
    assert manifest["format"] == "effx-onnx" and manifest["schema_version"] == 3 and manifest["opset"] >= 18
    assert set(manifest["files"]) == {"embed", "layer.0", "layer.1", "layer.2", "head"}
    assert set(manifest["data"]) == {"weights.bin"}
    # the layers also as one segment graph, on the same weights, which the runtime opens instead of them
    (segment,) = manifest["segments"]
    assert segment["stages"] == ["layer.0", "layer.1", "layer.2"] and segment["onnx"] == "layers.onnx"
    # and with fused attention (onnx_attention), which the CPU runs instead of the plain segment
    assert set(manifest["fused"]) == {"layer.0", "layer.1", "layer.2", "layers"}
    sessions = ort_runtime.load(artifact).sessions
    assert set(sessions) == {"embed", "fused:layers", "head"}
    # every stage takes CPU memory from the one arena registered with ONNX Runtime's environment
    assert {
        s.get_session_options().get_session_config_entry("session.use_env_allocators")
        for s in sessions.values()
    } == {"1"}
    for entry in [*manifest["files"].values(), segment, *manifest["fused"].values()]:
        model = onnx.load(str(artifact / entry["onnx"]), load_external_data=False)
        external = {d.value for t in model.graph.initializer for d in t.external_data if d.key == "location"}
        assert external == {"weights.bin"}  # weights live in the one store, not in the graph files
        # nor torch.onnx's notes on every node (stack traces with this machine's paths: most of the bytes)
        assert not any(n.metadata_props or n.doc_string for n in model.graph.node)
        onnx.checker.check_model(str(artifact / entry["onnx"]), full_check=True)


@pytest.mark.parametrize("lengths", [[5], [7, 3], [4, 9, 6, 2]])
def test_generate_parity_with_the_torch_backend(program, artifact, lengths):
    gen = ort_runtime.load(artifact)
    ids, mask = left_padded_batch(lengths, V, seed=len(lengths))
    ref = program.generate(ids, attention_mask=mask, max_new_tokens=7, eos_token_id=[])
    out = gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=7, eos_token_id=[])
    assert np.array_equal(out, ref.numpy())


def test_artifacts_without_a_segment_run_layer_by_layer(program, artifact, tmp_path):
    """An artifact without the segment (or one whose plan drops it) runs a session per layer, with the
    same tokens."""
    a = _copy(artifact, tmp_path)
    _edit_manifest(a, lambda m: (m.pop("segments"), m["fused"].pop("layers")))
    (a / "layers.onnx").unlink()
    (a / "layers.fused.onnx").unlink()
    gen = ort_runtime.load(a)  # the layers' fused graphs
    layers = {"layer.0", "layer.1", "layer.2"}
    assert set(gen.sessions) == {"embed", "head"} | {f"fused:{name}" for name in layers}
    _edit_manifest(a, lambda m: m.pop("fused"))
    plain = ort_runtime.load(a)  # and without them (an artifact older than the fused graphs)
    assert set(plain.sessions) == {"embed", "head"} | layers
    ids, mask = left_padded_batch([7, 3], V, seed=5)
    ref = program.generate(ids, attention_mask=mask, max_new_tokens=7, eos_token_id=[])
    for g in (gen, plain):
        assert np.array_equal(
            g.generate(ids.numpy(), mask.numpy(), max_new_tokens=7, eos_token_id=[]), ref.numpy()
        )


def test_segment_cache_stays_with_the_session(program, artifact, monkeypatch, tmp_path):
    """Plain decoding binds each layer's past-and-new cache (the segment's present_k.i / present_v.i) as the
    next step's past, where the session runs (under CUDA it never leaves the GPU); with host arrays instead
    the tokens are the same. (On the CPU the fused segment, which writes the host cache in place, runs
    instead where the artifact has it: here it has not.)"""
    a = _copy(artifact, tmp_path)
    _edit_manifest(a, lambda m: m.pop("fused"))
    gen = ort_runtime.load(a)
    outputs = {o.name for o in gen.sessions["layers"].get_outputs()}
    assert {"present_k.0", "present_v.0", "present_k.2", "present_v.2"} <= outputs
    assert gen._bound_device == "cpu"
    calls = []
    real = gen._run_bound
    monkeypatch.setattr(gen, "_run_bound", lambda *a: calls.append(1) or real(*a))
    ids, mask = left_padded_batch([4, 9, 6, 2], V, seed=3)
    ref = program.generate(ids, attention_mask=mask, max_new_tokens=7, eos_token_id=[]).numpy()
    assert np.array_equal(gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=7, eos_token_id=[]), ref)
    assert len(calls) == 7  # the prompt and 6 more steps
    gen.bind_cache = False
    calls.clear()
    assert np.array_equal(gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=7, eos_token_id=[]), ref)
    assert calls == []


def test_stop_tokens_and_padding_match(program, artifact):
    gen = ort_runtime.load(artifact)
    ids, mask = left_padded_batch([6, 4], V, seed=9)
    ref = program.generate(ids, attention_mask=mask, max_new_tokens=8)
    stop = int(ref[0, ids.shape[1] + 1])  # a token the first row emits: use it as the stop token
    ref = program.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=stop, pad_token_id=0)
    out = gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=8, eos_token_id=stop, pad_token_id=0)
    assert np.array_equal(out, ref.numpy())


def test_one_export_serves_every_layer(program, tmp_path, monkeypatch):
    stage_export = importlib.import_module("effx.exporters.onnx_stage")
    calls = []
    real = stage_export.export_onnx

    def counting(gm, *args, **kw):
        calls.append(gm)
        return real(gm, *args, **kw)

    monkeypatch.setattr(stage_export, "export_onnx", counting)
    exporter.export(program, tmp_path / "x")
    assert len(calls) == 3  # embed, one layer, head


def test_interrupted_export_leaves_nothing(program, tmp_path, monkeypatch):
    stage_export = importlib.import_module("effx.exporters.onnx_stage")
    real = stage_export.export_onnx
    seen = []

    def failing(gm, *args, **kw):
        seen.append(gm)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(gm, *args, **kw)

    monkeypatch.setattr(stage_export, "export_onnx", failing)
    with pytest.raises(KeyboardInterrupt):
        exporter.export(program, tmp_path / "half")
    assert list(tmp_path.iterdir()) == []


def _copy(artifact, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def _edit_manifest(path, fn):
    """Edit ``plan.json`` on purpose: sealed again, so that load checks what the edit changed."""
    manifest = json.loads((path / "plan.json").read_text())
    fn(manifest)
    write_manifest(path / "plan.json", manifest)


def test_bad_artifacts(artifact, tmp_path):
    with pytest.raises(ArtifactError, match="no plan.json"):
        ort_runtime.load(tmp_path)
    a = _copy(artifact, tmp_path)
    (a / "weights.bin").unlink()
    with pytest.raises(ArtifactError, match="weights.bin is missing"):
        ort_runtime.load(a)
    a = _copy(artifact, tmp_path / "b")
    (a / "layer.1.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"layer.1.onnx is missing \(stage layer.1\)"):
        ort_runtime.load(a)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(schema_version=99), "schema version 99"),
        (lambda m: m.update(effx_version="99.0.0"), "newer than this effx"),
        (lambda m: m["files"].pop("layer.2"), "references stage 'layer.2'"),
        (lambda m: m.update(format="something"), "not an effx-onnx file"),
        (lambda m: m["files"]["head"].update(sha256="0" * 64), "does not match its checksum"),
        (lambda m: m["files"]["head"].update(onnx="../head.onnx"), "must lie in the artifact itself"),
        (lambda m: m.update(data={"weights.bin": "0" * 64}), "weights.bin does not match its checksum"),
        (lambda m: m["plan"]["stages"].__setitem__(1, {"name": "x", "kind": "moe"}), "kinds \\['moe'\\]"),
        (lambda m: m["plan"]["policy"].update(early_exit={"mode": "lossy", "kv": "copy"}), "kv='copy'"),
        (lambda m: m["segments"][0]["stages"].pop(1), "'stages' are two or more consecutive layers"),
        (lambda m: m["segments"][0]["stages"].reverse(), "'stages' are two or more consecutive layers"),
        (lambda m: m.update(segments=[{"layers": 1}]), "a segment must be a dict whose 'stages'"),
        (lambda m: m.update(segments={"layers": 1}), "'segments' must be a list"),
        (lambda m: m["segments"][0].update(name="head"), "segment name 'head' is not a new name"),
        (lambda m: m["segments"][0].update(sha256="0" * 64), "layers.onnx does not match its checksum"),
        (lambda m: m["segments"][0].update(onnx="gone.onnx"), r"gone.onnx is missing \(segment layers\)"),
    ],
)
def test_bad_manifests(artifact, tmp_path, edit, match):
    a = _copy(artifact, tmp_path)
    _edit_manifest(a, edit)
    with pytest.raises(ArtifactError, match=match):
        ort_runtime.load(a)


def test_corrupt_weights_fail_the_checksum(artifact, tmp_path):
    a = _copy(artifact, tmp_path)
    data = bytearray((a / "weights.bin").read_bytes())
    data[10] ^= 0xFF
    (a / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        ort_runtime.load(a)


def test_default_providers(monkeypatch):
    """CPU alone without a GPU; with onnxruntime-gpu, CUDA first with full float32 products (TF32 changed a
    greedy token on an H200: benchmarks/onnx_providers.py) and the nvidia wheels' libraries loaded once."""
    import onnxruntime as ort

    monkeypatch.setattr(onnx_backend, "_CUDA_LIBRARIES_LOADED", False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_backend.session_providers(None) == ["CPUExecutionProvider"]
    loads = []
    monkeypatch.setattr(ort, "preload_dlls", lambda: loads.append(1), raising=False)
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert loads == []
    cuda = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert onnx_backend.session_providers(None) == cuda
    assert onnx_backend.session_providers(["CUDAExecutionProvider"]) == ["CUDAExecutionProvider"]
    assert onnx_backend.session_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert loads == [1]


def test_runtime_runs_without_torch(pass_artifacts):
    """The runtime of a program with every kind of pass (neuron-masked layers, token drop, early exits with
    pruned vocabularies) imports neither torch nor anything that needs it."""
    program, artifact = pass_artifacts["combined"]
    ids, mask = left_padded_batch([5, 3], V, seed=2)
    ref = program.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[]).tolist()
    code = textwrap.dedent(
        f"""
        import sys

        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")

        sys.meta_path.insert(0, NoTorch())
        import numpy as np
        from effx.runtime import onnx as rt

        gen = rt.load({str(artifact)!r})
        out = gen.generate(np.array({ids.tolist()}), np.array({mask.tolist()}), max_new_tokens=5, eos_token_id=[])
        assert "torch" not in sys.modules
        import json
        print(json.dumps(out.tolist()))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ref


# -- programs with passes ---------------------------------------------------------------------------------

PASSES = PARITY_PASSES


@pytest.fixture(scope="module")
def model4():
    return tiny_model("llama", layers=4, seed=3)


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.json"
    path.write_text(json.dumps({"ids": list(range(3, 60))}))
    return str(path)


@pytest.fixture(scope="module")
def pass_artifacts(model4, vocab_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("passes")
    out = {}
    for name, passes in PASSES.items():
        program = effx.transform(model4, passes(vocab_file))
        out[name] = program, exporter.export(program, root / name)
    return out


def _assert_parity(name, program, artifact, batches):
    """The artifact's tokens and runtime decisions equal the torch backend's on left-padded batches of the
    prompt ``lengths`` in ``batches``."""
    gen = ort_runtime.load(artifact)
    for lengths in batches:
        ids, mask = left_padded_batch(lengths, V, seed=len(lengths) + sum(lengths))
        torch_stats, onnx_stats = {}, {}
        ref = program.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=[], stats=torch_stats)
        out = gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=9, eos_token_id=[], stats=onnx_stats)
        assert np.array_equal(out, ref.numpy()), (name, lengths)
        assert onnx_stats == torch_stats, name


@pytest.mark.parametrize("name", list(PASSES))
def test_pass_artifacts_match_the_torch_backend(pass_artifacts, name):
    """Token-for-token parity, and the same runtime decisions (exit depths, drafts, fallbacks, kept
    tokens), over batches of 1..4 left-padded prompts of several lengths."""
    import onnx

    program, artifact = pass_artifacts[name]
    _assert_parity(name, program, artifact, ([5], [7, 3], [4, 12, 6, 2], [9, 9, 1]))
    kinds = {s.kind for s in program}
    manifest = json.loads((artifact / "plan.json").read_text())
    assert {s["kind"] for s in manifest["plan"]["stages"]} == kinds
    for entry in manifest["files"].values():
        onnx.checker.check_model(str(artifact / entry["onnx"]), full_check=True)


def test_segments_only_where_every_step_runs_every_layer(pass_artifacts):
    """Neuron-masked layers, a reduced head and prompt lookup (which verifies with every layer) still run as
    one block, the whole-model segment "layers";
    exits and token drop decide between layers, so their artifacts list a segment per run of layers
    between decision points instead (tests/test_onnx_segments.py)."""
    for name, (program, artifact) in pass_artifacts.items():
        segments = json.loads((artifact / "plan.json").read_text())["segments"]
        block = name in ("neuron-mask", "reduced-head", "prompt-lookup")
        whole = [s for s in segments if s["name"] == "layers"]
        assert bool(whole) == block, name
        if block:
            assert segments == whole and whole[0]["stages"] == [s.name for s in program.plan.layers], name
        else:
            assert all(s["name"].startswith("layers.") for s in segments), name
        assert ("layers" in opened(ort_runtime.load(artifact))) == block, name


def test_pass_decisions_are_exercised(pass_artifacts):
    """The parity above means something only if the runtime decisions happen: exits fire at several depths,
    drafts are accepted and rejected, the head falls back sometimes, tokens are dropped."""

    def stats_of(name, lengths=(4, 12, 6, 2)):
        ids, mask = left_padded_batch(list(lengths), V, seed=7)
        stats = {}
        gen = ort_runtime.load(pass_artifacts[name][1])
        gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=9, eos_token_id=[], stats=stats)
        return stats

    depths = {d for step in stats_of("pruned-exits")["exit_layers"] for d in step}
    assert len(depths) >= 2
    spec = stats_of(
        "self-speculative", [5]
    )  # a batch keeps the drafts all its rows agree on: rarely any here
    assert 0 < spec["accepted"] < spec["drafted"]
    head = stats_of("reduced-head")
    assert 0 < head["head_fallbacks"] < head["head_positions"]
    kept = stats_of("token-drop")["kept_tokens"]
    assert kept[1] == [3, 8, 4, 2] and kept[3] == [2, 4, 2, 2]  # ceil(n * keep), >= protect_last


def test_stages_of_one_structure_are_exported_once(pass_artifacts, model4, vocab_file, tmp_path, monkeypatch):
    stage_export = importlib.import_module("effx.exporters.onnx_stage")
    calls = []
    real = stage_export.export_onnx

    def counting(gm, *args, **kw):
        calls.append(gm)
        return real(gm, *args, **kw)

    monkeypatch.setattr(stage_export, "export_onnx", counting)
    program = pass_artifacts["pruned-exits"][0]
    exporter.export(program, tmp_path / "x")
    assert len(calls) == 5  # embed, one layer, one full exit, one pruned exit, head


def test_shared_weights_are_stored_once(pass_artifacts, model4, tmp_path):
    dense = exporter.export(effx.transform(model4), tmp_path / "dense")
    exits = pass_artifacts["lossy-exits"][1]  # two exits that share the final norm and the LM head
    assert (exits / "weights.bin").stat().st_size == (dense / "weights.bin").stat().st_size
    sliced = pass_artifacts["neuron-mask"][1]  # layers 1..2 keep half their MLP neurons
    assert (sliced / "weights.bin").stat().st_size < (dense / "weights.bin").stat().st_size


@pytest.mark.parametrize(
    "passes, match",
    [
        ([EarlyExit(layers=(1,), thresholds=(0.5,), kv="copy")], "kv='copy'"),
        ([NeuronMask(keep=0.5, score="random", mode="core")], "mode='core'"),
    ],
)
def test_runtime_choices_without_an_onnx_form_are_refused(model4, tmp_path, passes, match):
    with pytest.raises(ArtifactError, match=match):
        exporter.export(effx.transform(model4, passes), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# -- cascades ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cascade_pair():
    small, large = related_models("llama", 0.2)  # some drafts accepted, some not
    return effx.transform(small), effx.transform(large)


@pytest.mark.parametrize("mode", ["verified", "gated"])
def test_cascade_artifacts_match_the_torch_backend(cascade_pair, tmp_path, mode):
    small, large = cascade_pair
    casc = effx.cascade(small, large, gate=effx.EntropyGate(percentile=60), mode=mode, draft=3)
    texts = [" ".join(f"token{i % 17} word{i % 5}" for i in range(200))]

    class Chars:  # one id per character: tiny models have no tokenizer
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": [3 + ord(c) % 90 for c in text]})()

    casc, _ = casc.calibrate(texts, Chars(), seq_len=32, progress=False)
    artifact = exporter.export(casc, tmp_path / "casc")
    manifest = json.loads((artifact / "cascade.json").read_text())
    assert manifest["mode"] == mode and manifest["gate"]["kind"] == "entropy"
    gen = ort_runtime.load(artifact)
    assert isinstance(gen, ort_runtime.OnnxCascade)
    for lengths in ([5], [7, 3], [4, 9, 2]):
        ids, mask = left_padded_batch(lengths, V, seed=sum(lengths))
        torch_stats, onnx_stats = {}, {}
        ref = casc.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], stats=torch_stats)
        out = gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=10, eos_token_id=[], stats=onnx_stats)
        assert np.array_equal(out, ref.numpy()), lengths
        # every field of the torch cascade's report, the guard-checked bookkeeping included
        assert onnx_stats == torch_stats
        assert {"small_passes", "large_passes", "small_positions", "large_positions"} <= set(onnx_stats)
        assert ("draft_lengths" if mode == "verified" else "overridden") in onnx_stats
        assert 0 < onnx_stats["large_tokens"] and 0 < onnx_stats["small_tokens"]  # both models decide


def test_bad_cascade_artifacts(cascade_pair, tmp_path):
    small, large = cascade_pair
    with pytest.raises(ArtifactError, match="no threshold yet"):
        exporter.export(effx.cascade(small, large, gate=effx.EntropyGate(percentile=80)), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []
    artifact = exporter.export(effx.cascade(small, large, mode="verified"), tmp_path / "v")
    a = _copy(artifact, tmp_path / "c1")
    (a / "large" / "plan.json").write_text((a / "large" / "plan.json").read_text() + " ")
    with pytest.raises(ArtifactError, match="large/plan.json does not match its checksum"):
        ort_runtime.load(a)
    a = _copy(artifact, tmp_path / "c2")
    manifest = json.loads((a / "cascade.json").read_text())
    manifest["gate"] = {"kind": "coin-flip", "threshold": 0.5}
    write_manifest(a / "cascade.json", manifest)
    with pytest.raises(ArtifactError, match="gate this runtime does not know"):
        ort_runtime.load(a)


# -- sampling on the ONNX backend (the loop's Sampler, numpy's generator) ------------------------------------


def test_onnx_sampling_is_seeded_and_takes_every_setting(program, artifact):
    gen = ort_runtime.load(artifact)
    ids = np.array([[5, 9, 11]])
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, eos_token_id=[])
    a, b, c = (gen.generate(ids, seed=s, **kw) for s in (7, 7, 8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    greedy = gen.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert np.array_equal(gen.generate(ids, seed=1, **{**kw, "top_k": 1}), greedy)
    # top_k beyond the vocabulary keeps every token (it used to fail with an IndexError)
    assert gen.generate(ids, seed=3, **{**kw, "top_k": 10 * V}).shape == (1, 11)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.0), "temperature must be > 0"),  # used to be clamped to 1e-6
        (dict(temperature=-1.0), "temperature must be > 0"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
    ],
)
def test_onnx_sampling_settings_are_checked_as_on_torch(program, artifact, kwargs, match):
    from effx.errors import GenerationInputError

    gen = ort_runtime.load(artifact)
    ids = np.array([[5, 9, 11]])
    for run in (
        lambda: gen.generate(ids, max_new_tokens=2, do_sample=True, **kwargs),
        lambda: program.generate(torch.as_tensor(ids), max_new_tokens=2, do_sample=True, **kwargs),
    ):
        with pytest.raises(GenerationInputError, match=match):
            run()


def test_onnx_core_neurons_are_a_missing_capability(artifact, tmp_path):
    """Per-prompt core neurons need run-time graph surgery: the ONNX backend says so at load, and the loop
    says so if a backend without the capability is asked to run it."""
    a = _copy(artifact, tmp_path)
    _edit_manifest(a, lambda m: m["plan"]["policy"].update(neuron_mask={"mode": "core", "top_share": 0.2}))
    with pytest.raises(ArtifactError, match="cannot run neuron-mask mode='core'"):
        ort_runtime.load(a)


@pytest.fixture(scope="module")
def gemma_artifacts(vocab_file, tmp_path_factory):
    """Every parity pipeline, and the dense and int4 Programs, on a tiny Gemma 3 (two rotary tables, local and
    global layers alternating) and their artifacts."""
    model = tiny_model("gemma3", layers=4, seed=3)
    root = tmp_path_factory.mktemp("gemma3")
    pipelines = {"dense": lambda v: [], **PASSES, "quantize": lambda v: "quantize{bits=4}"}
    out = {}
    for name, passes in pipelines.items():
        program = effx.transform(model, passes(vocab_file))
        out[name] = program, exporter.export(program, root / name)
    return out


def test_gemma3_artifacts_match_the_torch_backend(gemma_artifacts):
    for name, (program, artifact) in gemma_artifacts.items():
        _assert_parity(name, program, artifact, ([5], [7, 3], [4, 12, 6, 2]))
        manifest = json.loads((artifact / "plan.json").read_text())
        assert manifest["plan"]["model"]["rope_tables"] == 2
        assert manifest["fused"]  # the layers fused, each on its own rotary table
