import importlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import left_padded_batch, tiny_model

import effx
from effx.errors import ArtifactError
from effx.exporters import onnx as exporter
from effx.runtime import onnx as ort_runtime

V = 96


@pytest.fixture(scope="module")
def program():
    return effx.transform(tiny_model("llama", layers=3, seed=4))


@pytest.fixture(scope="module")
def artifact(program, tmp_path_factory):
    return exporter.export(program, tmp_path_factory.mktemp("a") / "tiny")


def test_artifact_layout_and_checker(artifact):
    import onnx

    manifest = json.loads((artifact / "plan.json").read_text())
    assert manifest["format"] == "effx-onnx" and manifest["schema_version"] == 1 and manifest["opset"] >= 18
    assert set(manifest["files"]) == {"embed", "layer.0", "layer.1", "layer.2", "head"}
    for entry in manifest["files"].values():
        assert (artifact / entry["onnx"]).is_file() and (artifact / entry["data"]).is_file()
        onnx.checker.check_model(str(artifact / entry["onnx"]), full_check=True)


@pytest.mark.parametrize("lengths", [[5], [7, 3], [4, 9, 6, 2]])
def test_generate_parity_with_the_torch_backend(program, artifact, lengths):
    gen = ort_runtime.load(artifact)
    ids, mask = left_padded_batch(lengths, V, seed=len(lengths))
    ref = program.generate(ids, attention_mask=mask, max_new_tokens=7, eos_token_id=[])
    out = gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=7, eos_token_id=[])
    assert np.array_equal(out, ref.numpy())


def test_stop_tokens_and_padding_match(program, artifact):
    gen = ort_runtime.load(artifact)
    ids, mask = left_padded_batch([6, 4], V, seed=9)
    ref = program.generate(ids, attention_mask=mask, max_new_tokens=8)
    stop = int(ref[0, ids.shape[1] + 1])  # a token the first row emits: use it as the stop token
    ref = program.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=stop, pad_token_id=0)
    out = gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=8, eos_token_id=stop, pad_token_id=0)
    assert np.array_equal(out, ref.numpy())


def test_one_export_serves_every_layer(program, tmp_path, monkeypatch):
    capture_module = importlib.import_module("effx.capture")  # effx.capture is also the function's name
    calls = []
    real = capture_module.export_onnx

    def counting(gm, *args, **kw):
        calls.append(gm)
        return real(gm, *args, **kw)

    monkeypatch.setattr(capture_module, "export_onnx", counting)
    exporter.export(program, tmp_path / "x")
    assert len(calls) == 3  # embed, one layer, head


def test_interrupted_export_leaves_nothing(program, tmp_path, monkeypatch):
    capture_module = importlib.import_module("effx.capture")
    real = capture_module.export_onnx
    seen = []

    def failing(gm, *args, **kw):
        seen.append(gm)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(gm, *args, **kw)

    monkeypatch.setattr(capture_module, "export_onnx", failing)
    with pytest.raises(KeyboardInterrupt):
        exporter.export(program, tmp_path / "half")
    assert list(tmp_path.iterdir()) == []


def _copy(artifact, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def _edit_manifest(path, fn):
    manifest = json.loads((path / "plan.json").read_text())
    fn(manifest)
    (path / "plan.json").write_text(json.dumps(manifest))


def test_bad_artifacts(artifact, tmp_path):
    with pytest.raises(ArtifactError, match="no plan.json"):
        ort_runtime.load(tmp_path)
    a = _copy(artifact, tmp_path)
    (a / "layer.1.onnx.data").unlink()
    with pytest.raises(ArtifactError, match="layer.1.onnx.data is missing"):
        ort_runtime.load(a)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(schema_version=99), "schema version 99"),
        (lambda m: m.update(effx_version="99.0.0"), "newer than this effx"),
        (lambda m: m["files"].pop("layer.2"), "references stage 'layer.2'"),
        (lambda m: m.update(format="something"), "not an effx ONNX plan"),
        (lambda m: m["files"]["head"].update(sha256="0" * 64), "does not match its checksum"),
    ],
)
def test_bad_manifests(artifact, tmp_path, edit, match):
    a = _copy(artifact, tmp_path)
    _edit_manifest(a, edit)
    with pytest.raises(ArtifactError, match=match):
        ort_runtime.load(a)


def test_corrupt_weights_fail_the_checksum(artifact, tmp_path):
    a = _copy(artifact, tmp_path)
    data = bytearray((a / "layer.0.onnx.data").read_bytes())
    data[10] ^= 0xFF
    (a / "layer.0.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        ort_runtime.load(a)


def test_programs_with_passes_are_refused_for_now(tmp_path):
    prog = effx.transform(tiny_model("llama", layers=3), "early-exit{layers=1}")
    with pytest.raises(ArtifactError, match="dense programs so far"):
        exporter.export(prog, tmp_path / "ee")
    assert not (tmp_path / "ee").exists()


def test_runtime_runs_without_torch(program, artifact):
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
