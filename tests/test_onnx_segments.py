"""ONNX segments between decision points: a program with exits or token drop gets a fused graph for every
run of two or more layers between them (under ``segments`` in plan.json), and the ONNX backend runs
such a run as one session wherever the loop asks for exactly it, with the same tokens and decisions as
layer by layer and as the torch backend."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import left_padded_batch, opened, tiny_model

import effx
from effx.artifact import write_manifest
from effx.errors import ArtifactError
from effx.exporters import onnx as exporter
from effx.passes import EarlyExit, TokenDrop
from effx.runtime import onnx as ort_runtime
from effx.runtime.forward import MaskCache, forward_logits, run_layer_stages
from effx.testing import TINY_VOCAB

V = TINY_VOCAB
BATCHES = ([5], [7, 3], [4, 12, 6, 2])


@pytest.fixture(scope="module")
def model6():
    return tiny_model("llama", layers=6, seed=1)


def _export(model, passes, root, name):
    program = effx.transform(model, passes)
    return program, exporter.export(program, root / name)


def _manifest(artifact):
    return json.loads((artifact / "plan.json").read_text())


def _layer_by_layer(artifact, tmp_path):
    """A copy of ``artifact`` without its segments (and their fused graphs): the runtime then runs a session
    per layer."""
    dst = tmp_path / f"{artifact.name}-per-layer"
    shutil.copytree(artifact, dst)
    manifest = _manifest(dst)
    for seg in manifest.pop("segments"):
        (dst / seg["onnx"]).unlink()
        fused = manifest["fused"].pop(seg["name"], None)
        if fused:
            (dst / fused["onnx"]).unlink()
    write_manifest(dst / "plan.json", manifest)
    return dst


def _count_segment_runs(gen, monkeypatch):
    runs = []
    real = gen._run_segment
    monkeypatch.setattr(gen, "_run_segment", lambda seg, *a: runs.append(seg["name"]) or real(seg, *a))
    return runs


def _check_parity(program, artifact, tmp_path, monkeypatch, batches=BATCHES):
    """Tokens and decisions of the artifact with segments = without them = the torch Program's; returns
    the names of the segments run."""
    gen = ort_runtime.load(artifact)
    plain = ort_runtime.load(_layer_by_layer(artifact, tmp_path))
    assert not any(name.startswith("layers") for name in opened(plain))
    runs = _count_segment_runs(gen, monkeypatch)
    for lengths in batches:
        ids, mask = left_padded_batch(lengths, V, seed=len(lengths) + sum(lengths))
        stats = [{}, {}, {}]
        ref = program.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=[], stats=stats[0])
        for g, st in ((gen, stats[1]), (plain, stats[2])):
            out = g.generate(ids.numpy(), mask.numpy(), max_new_tokens=9, eos_token_id=[], stats=st)
            assert np.array_equal(out, ref.numpy()), lengths
        assert stats[1] == stats[0] and stats[2] == stats[0]
    return runs, gen


# -- which segments an artifact lists ----------------------------------------------------------------------


def test_layer_runs_end_at_exits_drops_and_window_changes():
    def stages(*spec):
        out = []
        for item in spec:
            kind, name, window = (item + (None,))[:3]
            out.append(SimpleNamespace(kind=kind, name=name, attrs={"sliding_window": window}))
        return out

    layer = lambda i, w=None: ("layer", f"layer.{i}", w)  # noqa: E731
    program = stages(
        ("embed", "embed"),
        layer(0),
        layer(1),
        ("exit", "exit.1"),
        layer(2),
        ("token_score", "score.3"),
        ("token_drop", "drop.3"),
        layer(3),
        layer(4),
        layer(5, 8),
        layer(6, 8),
        layer(7),
        ("head", "head"),
    )
    assert exporter.layer_runs(program) == [
        ("layer.0", "layer.1"),
        ("layer.3", "layer.4"),
        ("layer.5", "layer.6"),
    ]


def test_lossy_exit_artifact_lists_a_segment_per_run(model6, tmp_path):
    import onnx

    _, artifact = _export(model6, [EarlyExit(layers=(1, 3), thresholds=(0.3,))], tmp_path, "lossy")
    manifest = _manifest(artifact)
    segments = manifest["segments"]  # no whole-model "layers": it is for programs without decisions
    assert [(s["name"], s["onnx"], s["stages"]) for s in segments] == [
        ("layers.0-1", "layers.0-1.onnx", ["layer.0", "layer.1"]),
        ("layers.2-3", "layers.2-3.onnx", ["layer.2", "layer.3"]),
        ("layers.4-5", "layers.4-5.onnx", ["layer.4", "layer.5"]),
    ]
    for seg in segments:
        model = onnx.load(str(artifact / seg["onnx"]), load_external_data=False)
        external = {d.value for t in model.graph.initializer for d in t.external_data if d.key == "location"}
        assert external == {"weights.bin"}  # the layer files' own weights, not a copy
        assert not any(o.name.startswith("present_") for o in model.graph.output)
        onnx.checker.check_model(str(artifact / seg["onnx"]), full_check=True)
    # the segments' sessions instead of the layers' (which open only if a layer runs alone)
    # (their fused graphs, on the CPU: effx.exporters.onnx_attention)
    sessions = ort_runtime.load(artifact).sessions
    fused = {"fused:layers.0-1", "fused:layers.2-3", "fused:layers.4-5"}
    assert set(sessions) == {"embed", "exit.1", "exit.3", "head"} | fused


def test_runs_of_one_layer_get_no_segment(model6, tmp_path):
    passes = [EarlyExit(layers=(0, 1, 2, 3, 4), thresholds=(0.3,))]
    _, artifact = _export(model6, passes, tmp_path, "every")
    manifest = _manifest(artifact)
    assert manifest["segments"] == []
    assert not any(name.startswith("layers") for name in opened(ort_runtime.load(artifact)))


def test_dense_artifact_keeps_its_whole_model_segment(model6, tmp_path):
    _, artifact = _export(model6, [], tmp_path, "dense")
    manifest = _manifest(artifact)
    (segment,) = manifest["segments"]
    assert segment["name"] == "layers" and segment["onnx"] == "layers.onnx"
    assert segment["stages"] == [f"layer.{i}" for i in range(6)]
    assert "partial_segments" not in manifest
    import onnx

    # the present_* outputs are still there for the bound cache (the CUDA provider's, and artifacts run
    # without their fused graphs); the CPU runs the fused segment, which writes the host cache in place
    model = onnx.load(str(artifact / "layers.onnx"), load_external_data=False)
    assert {"present_k.0", "present_v.5"} <= {o.name for o in model.graph.output}
    gen = ort_runtime.load(artifact)
    assert "fused:layers" in gen.sessions and gen._bound_device is None


# -- the same tokens and decisions ------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [2.0, 0.3, 0.0], ids=["never-fires", "fires-sometimes", "always-fires"])
def test_lossy_exits_match_layer_by_layer_and_torch(model6, tmp_path, monkeypatch, threshold):
    program, artifact = _export(model6, [EarlyExit(layers=(1, 3), thresholds=(threshold,))], tmp_path, "x")
    runs, gen = _check_parity(program, artifact, tmp_path, monkeypatch)
    assert runs and set(runs) <= {"layers.0-1", "layers.2-3", "layers.4-5"}
    if threshold == 2.0:  # every step runs every layer, run by run: no layer ever runs alone
        assert not any(name.startswith("layer.") for name in opened(gen))
    if threshold == 0.0:  # every token leaves at exit.1; the deferred ones join at layer 2 (the prompt's
        # prefill runs every layer, the decoding steps the first segment)
        assert set(runs) == {"layers.0-1", "layers.2-3", "layers.4-5"}


def test_lossy_exits_that_fire_at_several_depths(model6, tmp_path, monkeypatch):
    """Deferred tokens join at the layer after an exit, where a segment starts: exits at several depths
    still run every step segment by segment."""
    program, artifact = _export(model6, [EarlyExit(layers=(1, 3), thresholds=(0.3,))], tmp_path, "several")
    gen = ort_runtime.load(artifact)
    stats = {}
    ids, mask = left_padded_batch([4, 12, 6, 2], V, seed=7)
    gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=9, eos_token_id=[], stats=stats)
    depths = {d for step in stats["exit_layers"] for d in step}
    assert len(depths) >= 2, depths
    assert not any(name.startswith("layer.") for name in opened(gen))


def test_self_speculative_matches_layer_by_layer_and_torch(model6, tmp_path, monkeypatch):
    passes = [EarlyExit(layers=(2,), thresholds=(0.2,), mode="self-speculative", draft=3)]
    program, artifact = _export(model6, passes, tmp_path, "spec")
    assert [s["stages"] for s in _manifest(artifact)["segments"]] == [
        ["layer.0", "layer.1", "layer.2"],
        ["layer.3", "layer.4", "layer.5"],
    ]
    runs, gen = _check_parity(program, artifact, tmp_path, monkeypatch)
    # the draft runs the layers up to the exit, the verification the rest: each one segment
    assert set(runs) == {"layers.0-2", "layers.3-5"}
    assert not any(name.startswith("layer.") for name in opened(gen))


def test_token_drop_segments_start_at_the_drop_layers(model6, tmp_path, monkeypatch):
    passes = [TokenDrop(at_layers=(2, 5), keep=(0.6, 0.4), protect_last=2)]
    program, artifact = _export(model6, passes, tmp_path, "drop")
    assert [s["stages"] for s in _manifest(artifact)["segments"]] == [
        ["layer.0", "layer.1"],
        ["layer.2", "layer.3", "layer.4"],  # layer.5 starts a run of one: no segment
    ]
    runs, _ = _check_parity(program, artifact, tmp_path, monkeypatch)
    # decoding steps run the layers that share one dropped set as their segment
    assert set(runs) == {"layers.0-1", "layers.2-4"}


def test_a_run_that_is_not_a_segment_runs_layer_by_layer(model6, tmp_path):
    """``run_layers`` on any consecutive layers: the parts that are a segment run as it, the rest layer by
    layer, to the same logits (a full forward, and one from layer 1 on)."""
    _, artifact = _export(model6, [EarlyExit(layers=(1, 3), thresholds=(0.3,))], tmp_path, "any")
    gen = ort_runtime.load(artifact)
    plain = ort_runtime.load(_layer_by_layer(artifact, tmp_path))
    ids, mask = left_padded_batch([7, 3], V, seed=5)
    np.testing.assert_allclose(
        forward_logits(gen, ids.numpy(), mask.numpy()),
        forward_logits(plain, ids.numpy(), mask.numpy()),
        rtol=1e-4,
        atol=1e-4,
    )
    # layers 1..4 cut across two segments: layer.1 and layer.4 run alone, layers.2-3 as its segment
    cache = gen.new_cache(2, 8)
    hidden = np.random.default_rng(0).standard_normal((2, 3, gen.info.hidden_size)).astype(gen.dtype)
    cos, sin = (np.ones((2, 3, gen.info.head_dim), gen.dtype) for _ in range(2))
    masks = MaskCache(gen, np.ones((2, 3), bool), gen.dtype)
    got = gen.run_layers(cache, gen.plan.layers[1:5], hidden, cos, sin, masks)
    assert {"layer.1", "layer.4"} <= opened(gen) and "layer.2" not in opened(gen)
    ref_cache = plain.new_cache(2, 8)
    ref = run_layer_stages(plain, ref_cache, plain.plan.layers[1:5], hidden, cos, sin, masks)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert cache.lengths == ref_cache.lengths == [0, 3, 3, 3, 3, 0]


# -- checked by the loader like the other files -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lossy_artifact(model6, tmp_path_factory):
    passes = [EarlyExit(layers=(1, 3), thresholds=(0.3,))]
    return _export(model6, passes, tmp_path_factory.mktemp("l"), "a")[1]


def _tampered(artifact, tmp_path, edit):
    dst = tmp_path / "tampered"
    shutil.copytree(artifact, dst)
    manifest = _manifest(dst)
    edit(dst, manifest)
    write_manifest(dst / "plan.json", manifest)
    return dst


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d, m: _flip_byte(d / "layers.2-3.onnx"), "layers.2-3.onnx does not match its checksum"),
        (lambda d, m: (d / "layers.4-5.onnx").unlink(), r"layers.4-5.onnx is missing \(segment layers.4-5\)"),
        (lambda d, m: m["segments"][0].update(onnx="../x.onnx"), "must lie in the artifact itself"),
        (lambda d, m: m["segments"][0].update(name="head"), "segment name 'head' is not a new name"),
        (
            lambda d, m: m["segments"][1]["stages"].insert(0, "layer.0"),
            "two or more consecutive layers",
        ),
        (lambda d, m: m["segments"][0]["stages"].pop(), "two or more consecutive layers"),
        (lambda d, m: m["segments"].append(dict(m["segments"][0], name="again")), "overlap"),
        (lambda d, m: m.update(segments={"a": 1}), "must be a list"),
    ],
)
def test_bad_segments_are_refused(lossy_artifact, tmp_path, edit, match):
    with pytest.raises(ArtifactError, match=match):
        ort_runtime.load(_tampered(lossy_artifact, tmp_path, edit))
