"""The fault suite of ONNX artifacts: drawn corruptions of a tiny artifact (truncated, flipped, deleted files,
plan fields edited to drawn values, with the manifest sealed again or not) are each refused at load with one
``ArtifactError`` line, or give the intact artifact's tokens. And the named cases of issue 37: a plan
without its ``data`` entry, a plan nested 100,000 deep, the tokenizer's files, ONNX Runtime's and the
tokenizer's own failures on re-hashed files, plan sizes the graphs contradict, ``cascade.json`` fields,
pre-release version numbers."""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import effx
from effx import artifact
from effx.artifact import sha256, write_manifest
from effx.errors import ArtifactError
from effx.exporters import onnx as exporter
from effx.runtime import onnx as ort_runtime
from effx.testing import tiny_model, tiny_tokenizer

PROMPT = np.array([[5, 6, 7], [9, 3, 4]], dtype=np.int64)
NEW = 6


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """A 2-layer artifact with its tokenizer (and chat template), exported once, and its tokens."""
    program = effx.transform(tiny_model("llama", layers=2, seed=4))
    out = exporter.export(program, tmp_path_factory.mktemp("faults") / "tiny", tokenizer=tiny_tokenizer())
    tokens = ort_runtime.load(out).generate(PROMPT, max_new_tokens=NEW, eos_token_id=[])
    return out, tokens


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _outcome(path: Path, expected) -> str:
    """``"refused"`` (one ArtifactError line) or ``"same"`` (the intact tokens); anything else fails."""
    try:
        out = ort_runtime.load(path).generate(PROMPT, max_new_tokens=NEW, eos_token_id=[])
    except ArtifactError as e:
        message = str(e)
        assert message and "\n" not in message, repr(message)
        return "refused"
    assert np.array_equal(out, expected), out
    return "same"


def _edit(path: Path, fn, *, sealed: bool) -> None:
    """Edit plan.json; ``sealed``: set its own checksum again, as a hand edit that knows the format would."""
    manifest = json.loads((path / "plan.json").read_text())
    fn(manifest)
    if sealed:
        write_manifest(path / "plan.json", manifest)
    else:
        (path / "plan.json").write_text(json.dumps(manifest, indent=2))


# where a drawn value goes in plan.json (a key path), and the values: wrong types, huge, negative, NaN
FIELDS = [
    *[
        ("plan", "model", k)
        for k in (
            "architecture",
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
            "max_positions",
            "dtype",
            "tie_word_embeddings",
            "rope_tables",
        )
    ],
    ("plan", "model"),
    ("plan", "eos_token_ids"),
    ("plan", "pad_token_id"),
    ("plan", "kernels"),
    ("plan", "activations"),
    ("plan", "policy"),
    ("plan", "stages"),
    ("plan", "stages", 1, "layer"),
    ("plan", "stages", 1, "name"),
    ("plan", "stages", 1, "kind"),
    ("plan", "stages", 1, "attrs"),
    ("plan", "stages", 1, "inputs"),
    ("files", "head", "onnx"),
    ("files", "embed", "sha256"),
    ("files", "head"),
    ("data",),
    ("data", "weights.bin"),
    ("segments",),
    ("fused",),
    ("tokenizer",),
    ("tokenizer", "tokenizer.json"),
    ("effx_version",),
    ("schema_version",),
    ("format",),
    ("manifest_sha256",),
]
VALUES = [
    -1,
    0,
    64,
    2**31,
    2**63,
    10**15,
    -(2**63),
    1.5,
    64.0,
    float("nan"),
    float("inf"),
    True,
    None,
    "abc",
    "",
    "64",
    "../x",
    "0.1.1rc1",
    [],
    [64],
    {},
    {"a": 1},
]
DELETE = object()


def _set(manifest, keys, value) -> None:
    node = manifest
    for k in keys[:-1]:
        node = node[k]
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value


@st.composite
def corruptions(draw, files: list[str]):
    kind = draw(st.sampled_from(["truncate", "flip", "delete", "edit", "edit-sealed"]))
    if kind.startswith("edit"):
        return kind, draw(st.sampled_from(FIELDS)), draw(st.sampled_from([*VALUES, DELETE]))
    name = draw(st.sampled_from(files))
    return kind, name, draw(st.floats(0, 1, exclude_max=True)), draw(st.integers(1, 255))


def _apply(path: Path, corruption) -> None:
    kind = corruption[0]
    if kind.startswith("edit"):
        _, keys, value = corruption
        _edit(path, lambda m: _set(m, keys, value), sealed=kind == "edit-sealed")
        return
    _, name, where, mask = corruption
    file = path / name
    data = bytearray(file.read_bytes())
    if kind == "delete":
        file.unlink()
    elif kind == "truncate":
        file.write_bytes(bytes(data[: int(where * len(data))]))
    elif data:
        data[int(where * len(data))] ^= mask
        file.write_bytes(bytes(data))


@settings(derandomize=True, deadline=None, max_examples=300, database=None)
@given(data=st.data())
def test_drawn_corruptions_are_refused_or_harmless(intact, data):
    """Each drawn corruption of the artifact is refused at load with one ArtifactError line, or the artifact
    still gives the intact tokens (a flip that leaves the JSON the same, an edit to what the runtime does
    not read, a dropped segment)."""
    path, tokens = intact
    corruption = data.draw(corruptions(_files(path)))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "a"
        shutil.copytree(path, copy)
        _apply(copy, corruption)
        event(f"{corruption[0]}: {_outcome(copy, tokens)}")  # --hypothesis-show-statistics


def test_every_kind_of_corruption_is_drawn_and_most_are_refused(intact):
    """The suite's own check: the drawn corruptions above cover every kind and every file, and refusals
    dominate (a suite whose draws all came out harmless would check nothing)."""
    path, tokens = intact
    files = _files(path)
    assert {"plan.json", "weights.bin", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"} <= set(
        files
    )
    outcomes = {"refused": 0, "same": 0}
    for n, name in enumerate(files):
        for kind in ("truncate", "flip", "delete"):
            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / "a"
                shutil.copytree(path, copy)
                _apply(copy, (kind, name, (n % 7) / 7, 0x41))
                outcome = _outcome(copy, tokens)
                outcomes[outcome] += 1
                assert outcome == "refused", (kind, name)  # every file is under a checksum
    assert outcomes["refused"] == 3 * len(files)


def _copy(intact, tmp_path) -> Path:
    out = tmp_path / "a"
    shutil.copytree(intact[0], out)
    return out


def test_a_plan_without_its_data_entry_is_refused(intact, tmp_path):
    a = _copy(intact, tmp_path)
    _edit(a, lambda m: m.pop("data"), sealed=True)
    with pytest.raises(ArtifactError, match="no checksum of weights.bin under 'data'"):
        ort_runtime.load(a)
    (a / "weights.bin").write_bytes(bytes((a / "weights.bin").stat().st_size))  # zeroed weights
    with pytest.raises(ArtifactError):
        ort_runtime.load(a)


def test_zeroed_weights_and_edited_plan_values_are_refused(intact, tmp_path):
    a = _copy(intact, tmp_path)
    (a / "weights.bin").write_bytes(bytes((a / "weights.bin").stat().st_size))
    with pytest.raises(ArtifactError, match="weights.bin does not match its checksum"):
        ort_runtime.load(a)
    b = _copy(intact, tmp_path / "b")
    _edit(b, lambda m: m["plan"]["model"].update(vocab_size=95), sealed=False)  # a flipped digit
    with pytest.raises(ArtifactError, match="does not match its own checksum"):
        ort_runtime.load(b)


def test_a_plan_nested_deep_is_an_artifact_error(intact, tmp_path):
    a = _copy(intact, tmp_path)
    (a / "plan.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ArtifactError, match="nested too deep"):
        ort_runtime.load(a)
    (a / "plan.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        ort_runtime.load(a)


@pytest.mark.parametrize(
    "model, match",
    [
        ({"num_kv_heads": 10**9}, "num_kv_heads"),  # would size the cache at hundreds of GiB
        ({"num_kv_heads": 4}, "past_k.0 has size 2 on axis 1; the plan says 4"),
        ({"head_dim": 8}, "has size 16 on axis -1; the plan says 8"),
        ({"vocab_size": 5}, "has size 96 on axis -1; the plan says 5"),
        ({"hidden_size": 32}, "hidden has size 64 on axis -1; the plan says 32"),
        ({"max_positions": 10**15}, r"max_positions must be an integer in \[1, 2147483647\]"),
        ({"max_positions": 0}, "max_positions"),
        ({"num_layers": True}, "num_layers"),
        ({"hidden_size": 64.0}, "hidden_size"),
        ({"dtype": "int4"}, "dtype"),
        ({"rope_tables": 2}, "the plan says 32"),
        ({"num_heads": 3}, "not a multiple of num_kv_heads"),
    ],
)
def test_plan_sizes_are_checked_for_type_range_and_against_the_graphs(intact, tmp_path, model, match):
    """Sealed edits (a file written by hand): each size is an integer in range and agrees with the graphs'
    own shapes before any cache is allocated."""
    a = _copy(intact, tmp_path)
    _edit(a, lambda m: m["plan"]["model"].update(model), sealed=True)
    with pytest.raises(ArtifactError, match=match):
        ort_runtime.load(a)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda p: p.update(eos_token_ids=[-1]), "eos_token_ids"),
        (lambda p: p.update(eos_token_ids=[96]), "eos_token_ids"),
        (lambda p: p.update(pad_token_id=10**12), "pad_token_id"),
        (lambda p: p.update(pad_token_id="0"), "pad_token_id"),
        (lambda p: p["stages"][1]["attrs"].update(sliding_window=-4), "sliding_window"),
        (lambda p: p.update(policy={"token_drop": {"protect_last": 1, "special": ["abc"]}}), "malformed"),
        (lambda p: p["stages"][1].update(attrs="abc"), "malformed"),
    ],
)
def test_plan_token_ids_and_attributes_are_checked(intact, tmp_path, edit, match):
    a = _copy(intact, tmp_path)
    _edit(a, lambda m: edit(m["plan"]), sealed=True)
    with pytest.raises(ArtifactError, match=match):
        ort_runtime.load(a)


def test_the_tokenizer_is_under_the_checksums_and_must_load(intact, tmp_path):
    manifest = json.loads((intact[0] / "plan.json").read_text())
    assert set(manifest["tokenizer"]) >= {"tokenizer.json", "tokenizer_config.json"}
    a = _copy(intact, tmp_path)
    (a / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"tokenizer\.json does not match its checksum"):
        ort_runtime.load(a)
    # a file added after the export (one that transformers would read) is not taken silently
    b = _copy(intact, tmp_path / "b")
    (b / "tokenizer" / "added_tokens.json").write_text('{"w999": 5}')
    with pytest.raises(ArtifactError, match="added_tokens.json is not under the checksums"):
        ort_runtime.load(b)
    # re-hashed broken files: the tokenizers library's and Jinja's own errors, as ArtifactErrors naming them
    for name, text, match in [
        ("tokenizer.json", '{"model": 5}', r"tokenizer\.json is not a tokenizer"),
        ("tokenizer_config.json", "[1, 2", r"tokenizer_config\.json is not valid JSON"),
    ]:
        c = _copy(intact, tmp_path / name)
        (c / "tokenizer" / name).write_text(text)
        _edit(c, lambda m, n=name, c=c: m["tokenizer"].update({n: sha256(c / "tokenizer" / n)}), sealed=True)
        with pytest.raises(ArtifactError, match=match):
            ort_runtime.load(c)
    d = _copy(intact, tmp_path / "d")
    config = json.loads((d / "tokenizer" / "tokenizer_config.json").read_text())
    template = d / "tokenizer" / "chat_template.jinja"
    where = template if template.is_file() else d / "tokenizer" / "tokenizer_config.json"
    if template.is_file():
        template.write_text("{% for m in messages %}")
    else:
        config["chat_template"] = "{% for m in messages %}"
        where.write_text(json.dumps(config))
    _edit(d, lambda m: m["tokenizer"].update({where.name: sha256(where)}), sealed=True)
    with pytest.raises(ArtifactError, match="the chat template is not valid Jinja"):
        ort_runtime.load(d)


def test_onnx_runtime_failures_at_load_name_the_file(intact, tmp_path):
    """A graph that matches its (re-hashed) checksum but that ONNX Runtime cannot load."""
    a = _copy(intact, tmp_path)
    manifest = json.loads((a / "plan.json").read_text())
    head = a / manifest["files"]["head"]["onnx"]
    head.write_bytes(head.read_bytes()[:100])
    _edit(a, lambda m: m["files"]["head"].update(sha256=sha256(head)), sealed=True)
    with pytest.raises(ArtifactError, match=r"head\.onnx: ONNX Runtime cannot load it \(InvalidProtobuf"):
        ort_runtime.load(a)


def test_older_schemas_are_refused_with_the_fix(intact, tmp_path):
    a = _copy(intact, tmp_path)
    _edit(a, lambda m: m.update(schema_version=2), sealed=True)
    with pytest.raises(ArtifactError, match="schema version 2; this effx reads 3.*export the program again"):
        ort_runtime.load(a)


@pytest.mark.parametrize(
    "made_by, newer", [("0.1.1rc1", True), ("0.1.0rc1", False), ("0.1.0.post1", True), ("0.0.9", False)]
)
def test_version_numbers_are_ordered_as_pep_440(intact, tmp_path, made_by, newer, monkeypatch):
    monkeypatch.setattr("effx._about.__version__", "0.1.0")
    a = _copy(intact, tmp_path)
    _edit(a, lambda m: m.update(effx_version=made_by), sealed=True)
    if newer:
        with pytest.raises(ArtifactError, match=f"written by effx {made_by}, newer than this effx 0.1.0"):
            ort_runtime.load(a)
    else:
        ort_runtime.load(a)
    _edit(a, lambda m: m.update(effx_version="not a version"), sealed=True)
    with pytest.raises(ArtifactError, match="not a version number"):
        ort_runtime.load(a)


def _cascade(intact, tmp_path, **fields) -> Path:
    """A cascade artifact of two copies of the tiny artifact (a cascade of a model with itself)."""
    out = tmp_path / "casc"
    out.mkdir(parents=True)
    parts = {}
    for role in ("small", "large"):
        shutil.copytree(intact[0], out / role)
        parts[role] = {"dir": role, "plan_sha256": sha256(out / role / "plan.json")}
    manifest = {
        "format": artifact.CASCADE_FORMAT,
        "schema_version": artifact.CASCADE_SCHEMA_VERSION,
        "effx_version": effx.__version__,
        "mode": "verified",
        "draft": 4,
        "adaptive": True,
        "gate": None,
        "parts": parts,
        "tokenizer": {},
    }
    write_manifest(out / "cascade.json", {**manifest, **fields})
    return out


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"draft": -1}, r"draft must be an integer in \[1, 256\], got -1"),
        ({"draft": "abc"}, "draft must be an integer"),
        ({"draft": 10**9}, "draft must be an integer"),
        ({"draft": True}, "draft must be an integer"),
        ({"adaptive": "yes"}, "adaptive must be true or false"),
        ({"mode": "abc"}, "unknown cascade mode"),
        ({"gate": {"kind": "entropy", "threshold": float("nan")}}, "finite number"),
        ({"parts": {"small": {"dir": ".."}}}, "no valid directory for the small model"),
        ({"parts": "abc"}, "no valid directory"),
    ],
)
def test_cascade_fields_are_checked(intact, tmp_path, fields, match):
    with pytest.raises(ArtifactError, match=match):
        ort_runtime.load(_cascade(intact, tmp_path, **fields))


def test_a_checked_cascade_runs(intact, tmp_path):
    gen = ort_runtime.load(_cascade(intact, tmp_path))
    out = gen.generate(PROMPT, max_new_tokens=NEW, eos_token_id=[])
    assert np.array_equal(out, intact[1])  # a model verifying its own drafts: its own tokens
    path = _cascade(intact, tmp_path / "b")
    text = (path / "cascade.json").read_text().replace('"draft": 4', '"draft": 5')  # not sealed again
    (path / "cascade.json").write_text(text)
    with pytest.raises(ArtifactError, match="does not match its own checksum"):
        ort_runtime.load(path)
