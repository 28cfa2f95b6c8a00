"""Fused layer graphs (effx.exporters.onnx_attention): attention as one GroupQueryAttention node over the
cache in place, rotary embedding and residual norms as ONNX Runtime's fused nodes; the graph after the
rewrite, its numbers against the plain graph, the runtime's choice between the two, and refusals."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import left_padded_batch, tiny_model

import effx
from effx.artifact import fused_inputs, write_manifest
from effx.errors import ArtifactError
from effx.exporters import onnx as exporter
from effx.exporters.onnx_attention import fuse_layer, reference_check
from effx.passes import PromptLookup
from effx.runtime import onnx as ort_runtime
from effx.testing import TINY_VOCAB

V = TINY_VOCAB


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def exported(request, tmp_path_factory):
    model = tiny_model(request.param)
    program = effx.transform(model, [], kernels="reference")
    return program, exporter.export(program, tmp_path_factory.mktemp(request.param) / "a")


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_the_rewrite_replaces_attention_and_keeps_the_checker_happy(exported):
    program, artifact = exported
    manifest = json.loads((artifact / "plan.json").read_text())
    assert set(manifest["fused"]) == {"layer.0", "layer.1", "layers"}
    path = artifact / manifest["fused"]["layer.0"]["onnx"]
    model = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == 1 and ops.count("RotaryEmbedding") == 2
    assert ops.count("SkipSimplifiedLayerNormalization") == 1
    assert "Softmax" not in ops and "Expand" not in ops and "Concat" not in ops  # no cache copies left
    assert [o.name for o in model.graph.output][1:] == ["present_k", "present_v"]
    onnx.checker.check_model(str(path), full_check=True)
    # the segment: each later layer's first norm also takes the residual sum before it
    path = artifact / manifest["fused"]["layers"]["onnx"]
    segment = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in segment.graph.node]
    assert ops.count("SkipSimplifiedLayerNormalization") == 3 and ops.count("Pow") == 1
    onnx.checker.check_model(str(path), full_check=True)
    plain = onnx.load(str(artifact / "layer.0.onnx"), load_external_data=False)
    assert "Softmax" in [n.op_type for n in plain.graph.node]  # the plain graph stays as exported


def test_fused_layer_matches_the_plain_layer_and_writes_the_cache_in_place(exported):
    program, artifact = exported
    info = program.info
    manifest = json.loads((artifact / "plan.json").read_text())
    plain = _session(artifact / "layer.0.onnx")
    fused = _session(artifact / manifest["fused"]["layer.0"]["onnx"])
    shape = dict(hidden=info.hidden_size, kv_heads=info.num_kv_heads, head_dim=info.head_dim)
    assert reference_check(plain, fused, **shape) < 1e-5
    # one decode step over a cache of 6 filled slots in a buffer of 10: the step's keys and values land
    # in slot 6, equal to what the plain graph returns, and the hidden states agree
    rng = np.random.default_rng(1)
    kv, d, start = info.num_kv_heads, info.head_dim, 6
    buf_k = np.zeros((1, kv, 10, d), np.float32)
    buf_v = np.zeros((1, kv, 10, d), np.float32)
    buf_k[:, :, :start] = rng.standard_normal((1, kv, start, d))
    buf_v[:, :, :start] = rng.standard_normal((1, kv, start, d))
    x = rng.standard_normal((1, 1, info.hidden_size), dtype=np.float32)
    ang = np.tile(rng.standard_normal((1, 1, d // 2), dtype=np.float32), 2)
    cos, sin = np.cos(ang), np.sin(ang)
    mask = np.zeros((1, 1, 1, start + 1), np.float32)
    want = plain.run(
        None,
        dict(
            hidden=x,
            cos=cos,
            sin=sin,
            mask=mask,
            past_k=buf_k[:, :, :start].copy(),
            past_v=buf_v[:, :, :start].copy(),
        ),
    )
    binding = fused.io_binding()
    for name, value in dict(
        hidden=x, cos=cos, sin=sin, mask=mask, **fused_inputs(cos, sin, start, 1)
    ).items():
        binding.bind_cpu_input(name, value)
    binding.bind_output(fused.get_outputs()[0].name, "cpu")
    for kv_name, buf in (("k", buf_k), ("v", buf_v)):
        value = ort.OrtValue.ortvalue_from_numpy(buf)
        binding.bind_ortvalue_input(f"past_{kv_name}", value)
        binding.bind_ortvalue_output(f"present_{kv_name}", value)
    fused.run_with_iobinding(binding)
    got = binding.get_outputs()[0].numpy()
    np.testing.assert_allclose(got, want[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(buf_k[:, :, start : start + 1], want[1], atol=1e-6)
    np.testing.assert_allclose(buf_v[:, :, start : start + 1], want[2], atol=1e-6)
    assert not buf_k[:, :, start + 1 :].any()  # nothing written past the step


def test_graphs_the_rewrite_does_not_know_are_left_alone(exported):
    program, artifact = exported
    info = program.info
    head = onnx.load(str(artifact / "head.onnx"), load_external_data=False)
    assert fuse_layer(head, num_heads=info.num_heads, kv_heads=info.num_kv_heads) is None
    layer = onnx.load(str(artifact / "layer.0.onnx"), load_external_data=False)
    for node in layer.graph.node:
        if node.op_type == "Softmax":
            node.op_type = "LogSoftmax"  # another attention than the decomposed one the rewrite knows
    assert fuse_layer(layer, num_heads=info.num_heads, kv_heads=info.num_kv_heads) is None


def _copy(artifact, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(artifact, out)
    return out


def _edit(artifact, edit):
    path = artifact / "plan.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    write_manifest(path, manifest)


def test_plain_and_fused_artifacts_decode_alike(exported, tmp_path):
    """The same tokens from the fused graphs, from an artifact without them (older ones), and from torch."""
    program, artifact = exported
    plain = _copy(artifact, tmp_path)
    _edit(plain, lambda m: m.pop("fused"))
    ids, mask = left_padded_batch([6, 3, 8], V, seed=2)
    want = program.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]).numpy()
    fused_gen, plain_gen = ort_runtime.load(artifact), ort_runtime.load(plain)
    assert "fused:layers" in fused_gen.sessions and "layers" in plain_gen.sessions
    for gen in (fused_gen, plain_gen):
        assert np.array_equal(
            gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=8, eos_token_id=[]), want
        )


def test_batched_multi_token_steps_run_the_plain_graphs(tmp_path):
    """ONNX Runtime's CPU attention refuses several tokens over a past at batch > 1 (verification of a batch
    of drafts): those steps open and run the plain segment, batch-1 rounds stay on the fused one, and the
    tokens equal the same Program's dense greedy output."""
    model = tiny_model("llama")
    dense = effx.transform(model, [], kernels="reference")
    program = effx.transform(model, [PromptLookup(ngram=2, min_ngram=1, draft=3)], kernels="reference")
    artifact = exporter.export(program, tmp_path / "a")
    gen = ort_runtime.load(artifact)
    assert "layers" not in gen.sessions
    ids, mask = left_padded_batch([9, 5], V, seed=3)
    ids[:, -4:] = ids[:, -8:-4]  # repeated n-grams: lookup drafts
    out = gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=10, eos_token_id=[])
    want = dense.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[]).numpy()
    assert np.array_equal(out, want)
    assert "layers" in gen.sessions  # opened for the batched verification steps
    single = gen.generate(ids[:1].numpy(), mask[:1].numpy(), max_new_tokens=10, eos_token_id=[])
    assert np.array_equal(
        single, dense.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=10, eos_token_id=[]).numpy()
    )


def test_bad_fused_entries_are_refused(exported, tmp_path):
    program, artifact = exported
    a = _copy(artifact, tmp_path)
    _edit(a, lambda m: m["fused"].update({"layer.9": {"onnx": "layer.0.fused.onnx", "sha256": "0"}}))
    with pytest.raises(ArtifactError, match="neither layers nor segments"):
        ort_runtime.load(a)
    b = _copy(artifact, tmp_path / "b")
    path = b / "layer.0.fused.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        ort_runtime.load(b)
