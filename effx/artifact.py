"""The ONNX artifact format that the exporter writes and the ONNX runtime reads: names, versions, checks.

Torch-free, below both ``effx.exporters.onnx`` and ``effx.runtime.onnx``, so that neither imports the other.

Every file the runtime reads is under a checksum that load checks: the graphs and the weight store under
the manifest's (``plan.json``, ``cascade.json``, ``seq2seq.json``), the files of ``tokenizer/`` under its
``tokenizer`` entry, and the manifest itself under ``manifest_sha256``, the SHA-256 of its own content
(:func:`manifest_digest`): a flipped digit in a threshold or a token id is refused, not run. A manifest
whose content is edited on purpose is sealed again with :func:`seal`; its fields are then checked for type
and range (:func:`check_plan`) and, by the runtime, against the graphs' own shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from . import _about
from .errors import ArtifactError
from .plan import Plan

__all__ = [
    "BLOCK_KINDS",
    "one_block",
    "CASCADE_FILE",
    "CASCADE_FORMAT",
    "CASCADE_SCHEMA_VERSION",
    "FORMAT",
    "FUSED_INPUTS",
    "MANIFEST_DIGEST",
    "PLAN_FILE",
    "SCHEMA_VERSION",
    "SEGMENT_FILE",
    "SEQ2SEQ_FILE",
    "SEQ2SEQ_FORMAT",
    "SEQ2SEQ_SCHEMA_VERSION",
    "TOKENIZER_DIR",
    "WEIGHTS",
    "check_folder",
    "check_model",
    "check_plan",
    "check_tokenizer",
    "folder_checksums",
    "fused_inputs",
    "manifest_digest",
    "read_manifest",
    "seal",
    "sha256",
    "write_manifest",
]

FORMAT = "effx-onnx"
# 2: one shared weight store and the stages of passes (1, a weights file per stage, is no longer read)
# 3: the manifest's own checksum and the tokenizer's files under checksums (2 is no longer read)
SCHEMA_VERSION = 3
PLAN_FILE = "plan.json"
WEIGHTS = "weights.bin"
SEGMENT_FILE = "layers.onnx"
CASCADE_FILE = "cascade.json"
CASCADE_FORMAT = "effx-onnx-cascade"
CASCADE_SCHEMA_VERSION = 2  # 2: its own checksum and the tokenizer's
# an encoder-decoder program (effx.seq2seq): one self-contained ONNX file per stage, named in seq2seq.json
SEQ2SEQ_FILE = "seq2seq.json"
SEQ2SEQ_FORMAT = "effx-onnx-seq2seq"
SEQ2SEQ_SCHEMA_VERSION = 2  # 2: its own checksum and the tokenizer's
TOKENIZER_DIR = "tokenizer"
MANIFEST_DIGEST = "manifest_sha256"
# the largest manifest read (SmolLM2's plan.json is 30 KB): a larger file is not one effx wrote
_MAX_MANIFEST_BYTES = 16 << 20
# every size and token id a plan holds fits ONNX Runtime's int32 lengths (the fused graphs' total_len)
_INT32 = 2**31 - 1
# the inputs a fused layer graph (effx.exporters.onnx_attention) takes beyond a layer's: seqlens_k (int32
# [batch], the filled length after the step minus one), total_len (int32, that length), and the step's
# rotary angles as RotaryEmbedding takes them (fused_inputs)
FUSED_INPUTS = ("seqlens_k", "total_len", "rope_ids", "rope_cos", "rope_sin")


# the stage kinds of a program whose every decoding step runs all its layers back to back (no decision
# between them): only then is the artifact's whole-model segment ("layers") the one a step runs
BLOCK_KINDS = ("embed", "layer", "head", "full_head")


def one_block(stages) -> bool:
    """Whether every decoding step runs all of ``stages``'s layers back to back with one mask: only stages of
    :data:`BLOCK_KINDS` (any other kind, an exit, TokenDrop's or a technique's own, may be a decision point)
    and one attention window."""
    windows = {s.attrs.get("sliding_window") for s in stages if s.kind == "layer"}
    return all(s.kind in BLOCK_KINDS for s in stages) and len(windows) == 1


def fused_inputs(cos, sin, start: int, length: int) -> dict:
    """The fused graphs' own inputs (:data:`FUSED_INPUTS`) for a step of ``length`` tokens from slot
    ``start``, with the embed stage's rotary ``cos``/``sin`` ``[batch, seq, dim]``. RotaryEmbedding reads
    rows ``rope_ids[b, i]`` of its cos/sin tables, so the tables are the step's own rows, one per token; a
    plan's angles repeat over the two halves of ``dim`` (``cat(freqs, freqs)``), so half a row is the
    table's (the exporter's check would fail on a model whose halves differ)."""
    batch, seq, dim = cos.shape
    total = start + length
    return {
        "seqlens_k": np.full((batch,), total - 1, np.int32),
        "total_len": np.array(total, np.int32),
        "rope_ids": np.arange(batch * seq, dtype=np.int64).reshape(batch, seq),
        "rope_cos": np.ascontiguousarray(cos[..., : dim // 2].reshape(batch * seq, dim // 2)),
        "rope_sin": np.ascontiguousarray(sin[..., : dim // 2].reshape(batch * seq, dim // 2)),
    }


def sha256(path: Path) -> str:
    """The hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version(v: str, path: Path):
    """``v`` as a PEP 440 version (``0.1.1rc1`` is newer than ``0.1.0`` and older than ``0.1.1``)."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(v)
    except (InvalidVersion, TypeError) as e:
        raise ArtifactError(f"{path} names effx version {v!r}, which is not a version number") from e


def manifest_digest(manifest: dict) -> str:
    """The SHA-256 of ``manifest``'s content, its own ``manifest_sha256`` left out: of its canonical JSON
    (sorted keys, no spaces), so that reformatting the file keeps it and changing a value does not."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(manifest: dict) -> dict:
    """``manifest`` with its ``manifest_sha256`` (set again after an edit made on purpose)."""
    return {**manifest, MANIFEST_DIGEST: manifest_digest(manifest)}


def write_manifest(path: Path, manifest: dict) -> None:
    """Write ``manifest``, sealed, as JSON to ``path``."""
    path.write_text(json.dumps(seal(manifest), indent=2) + "\n")


def read_manifest(path: Path, fmt: str, schema: int) -> dict:
    """``path`` as JSON, checked for format, schema version, its own checksum and the effx version that
    wrote it. Every problem, a file nested too deep to parse included, is an ``ArtifactError``."""
    try:
        size = path.stat().st_size
        if size > _MAX_MANIFEST_BYTES:
            raise ArtifactError(
                f"{path} is {size} bytes, not a manifest effx wrote (at most {_MAX_MANIFEST_BYTES})"
            )
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        what = "nested too deep" if isinstance(e, RecursionError) else str(e)
        raise ArtifactError(f"{path} is not valid JSON: {what}") from None
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read: {e.strerror or e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{path} is not an {fmt} file (format {found!r})")
    version = manifest.get("schema_version")
    if version != schema:
        older = isinstance(version, int) and not isinstance(version, bool) and version < schema
        raise ArtifactError(
            f"{path} has schema version {version!r}; this effx reads {schema}"
            + (
                " (older artifacts lack checksums of their tokenizer and of the manifest itself)"
                if older
                else ""
            )
            + ": export the program again with this effx"
        )
    if manifest.get(MANIFEST_DIGEST) != manifest_digest(manifest):
        raise ArtifactError(
            f"{path} does not match its own checksum ({MANIFEST_DIGEST}): the file was changed or is corrupt"
        )
    made_by = manifest.get("effx_version")
    if not isinstance(made_by, str):
        raise ArtifactError(f"{path} names no effx version (effx_version {made_by!r})")
    if _version(made_by, path) > _version(_about.__version__, path):
        raise ArtifactError(
            f"{path.parent} was written by effx {made_by}, newer than this effx {_about.__version__}: upgrade effx"
        )
    return manifest


# -- the tokenizer folder ------------------------------------------------------------------------------------


def folder_checksums(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (its path relative to ``folder``, with ``/``) and its SHA-256; empty when
    there is no such folder."""
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def check_folder(folder: Path, listed, manifest: Path, what: str = "tokenizer") -> None:
    """The files under ``folder`` are exactly those ``listed`` (``{relative path: sha256}``) in ``manifest``,
    each matching its checksum."""
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        raise ArtifactError(f"{manifest}: {what!r} must map file names to checksums, got {listed!r}")
    for name in listed:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise ArtifactError(
                f"{manifest} names file {name!r} ({what}): files must lie in the artifact itself"
            )
    present = (
        {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        if folder.is_dir()
        else set()
    )
    extra = sorted(present - set(listed))
    if extra:
        raise ArtifactError(
            f"{folder / extra[0]} is not under the checksums of {manifest} ({what}): "
            "it was added after the export; remove it or export again"
        )
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing ({what})")
        if sha256(path) != digest:
            raise ArtifactError(
                f"{path} does not match its checksum in {manifest.name}: the artifact is corrupt"
            )


def check_tokenizer(folder: Path) -> None:
    """What effx reads of an exported tokenizer loads: ``tokenizer.json`` (with the ``tokenizers`` library),
    ``tokenizer_config.json`` (a JSON object) and its chat template (compiled with Jinja, when installed).
    A failure is an ``ArtifactError`` naming the file."""
    tok = folder / "tokenizer.json"
    if tok.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(tok))
        except Exception as e:  # the Rust library raises plain Exceptions
            raise ArtifactError(
                f"{tok} is not a tokenizer the tokenizers library loads: {_first_line(e)}"
            ) from None
    config: dict = {}
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError):
            raise ArtifactError(f"{config_file} is not valid JSON") from None
        if not isinstance(config, dict):
            raise ArtifactError(f"{config_file} is not a JSON object")
    template_file = folder / "chat_template.jinja"
    where, template = config_file, config.get("chat_template")
    if template_file.is_file():
        try:
            where, template = template_file, template_file.read_bytes().decode("utf-8")
        except ValueError:
            raise ArtifactError(f"{template_file} is not UTF-8 text") from None
    if isinstance(template, list):  # named templates
        if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
            raise ArtifactError(f"{where}: named chat templates must be objects with a 'template' string")
        templates = [t["template"] for t in template]
    elif template is None or isinstance(template, str):
        templates = [template] if template else []
    else:
        raise ArtifactError(f"{where}: the chat template must be a string, got {type(template).__name__}")
    try:
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # effx run then says that a template needs jinja2
        return
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    for text in templates:
        try:
            env.parse(text)
        except (TemplateSyntaxError, RecursionError) as e:
            raise ArtifactError(f"{where}: the chat template is not valid Jinja: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]


# -- the plan's fields -----------------------------------------------------------------------------------------

_DTYPES = ("float32", "float16", "bfloat16")


def _int(value, name: str, where: Path, low: int = 1, high: int = _INT32) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ArtifactError(f"{where}: {name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _token(value, name: str, where: Path, vocab: int) -> None:
    _int(value, name, where, 0, vocab - 1)


def check_model(model, stages, where: Path) -> None:
    """The ``model`` fields of a plan as read from JSON (before ``Plan.from_dict``, which trusts them to size
    its checks), checked for type and range and against each other: sizes are integers in
    ``[1, 2**31 - 1]`` (ONNX Runtime's int32 lengths), as many layers as the plan has layer ``stages``, the
    attention heads a multiple of the KV heads, the dtype a float type. The sizes the graphs fix are checked
    against them when each graph is opened (``effx.runtime.onnx_backend.check_shapes``)."""
    if not isinstance(model, dict):
        raise ArtifactError(f"{where}: the plan's 'model' must be a JSON object, got {model!r}")
    for name in ("architecture", "model_type", "source"):
        if not isinstance(model.get(name, ""), str):
            raise ArtifactError(f"{where}: model {name} must be a string, got {model.get(name)!r}")
    for name in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
        _int(model.get(name), f"model {name}", where)
    _int(model.get("max_positions"), "model max_positions", where)
    _int(model.get("rope_tables", 1), "model rope_tables", where, 1, 64)
    layers = sum(1 for s in stages if isinstance(s, dict) and s.get("kind") == "layer")
    _int(model.get("num_layers"), "model num_layers", where, layers, layers)
    heads, kv_heads = model["num_heads"], model["num_kv_heads"]
    if kv_heads > heads or heads % kv_heads:
        raise ArtifactError(f"{where}: model num_heads {heads} is not a multiple of num_kv_heads {kv_heads}")
    if model.get("dtype") not in _DTYPES:
        raise ArtifactError(
            f"{where}: model dtype must be one of {', '.join(_DTYPES)}, got {model.get('dtype')!r}"
        )
    if not isinstance(model.get("tie_word_embeddings"), bool):
        raise ArtifactError(f"{where}: model tie_word_embeddings must be true or false")


def check_plan(plan: Plan, where: Path) -> None:
    """The fields of ``plan`` beyond its model's (:func:`check_model`) that ``Plan.from_dict`` takes as given:
    token ids inside the vocabulary, stage layers and windows in range, exit thresholds finite, policies'
    counts in range."""
    info = plan.model
    for t in plan.eos_token_ids:
        _token(t, "eos_token_ids", where, info.vocab_size)
    if plan.pad_token_id is not None:
        _token(plan.pad_token_id, "pad_token_id", where, info.vocab_size)
    for s in plan.stages:
        if not isinstance(s.name, str) or not s.name:
            raise ArtifactError(f"{where}: a stage has no valid name ({s.name!r})")
        if s.layer is not None:
            _int(s.layer, f"stage {s.name} layer", where, 0)
        window = s.attrs.get("sliding_window")
        if window is not None:
            _int(window, f"stage {s.name} sliding_window", where)
        for key, value in s.attrs.items():  # thresholds, shares kept: a NaN or infinity is no setting
            if isinstance(value, float) and not math.isfinite(value):
                raise ArtifactError(f"{where}: stage {s.name} has {key} {value!r}, not a finite number")
    for key, policy in plan.policy.entries:  # counts in range; token ids inside the vocabulary
        for name, value in dataclasses.asdict(policy).items():
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if isinstance(v, int) and not isinstance(v, bool):
                    _int(v, f"{key} {name}", where, 0)
                elif isinstance(v, float) and not math.isfinite(v):
                    raise ArtifactError(f"{where}: {key} {name} is {v!r}, not a finite number")
        for t in getattr(policy, "token_ids", tuple)():
            _token(t, f"{key} token id", where, info.vocab_size)
