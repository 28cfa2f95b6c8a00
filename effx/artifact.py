"""The ONNX artifact format that the exporter writes and the ONNX runtime reads: names, versions, checks.

Torch-free, below both ``effx.exporters.onnx`` and ``effx.runtime.onnx``, so that neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .errors import ArtifactError

__all__ = [
    "CASCADE_FILE",
    "CASCADE_FORMAT",
    "CASCADE_SCHEMA_VERSION",
    "FORMAT",
    "FUSED_INPUTS",
    "KINDS",
    "PLAN_FILE",
    "SCHEMA_VERSION",
    "SEGMENT_FILE",
    "SEQ2SEQ_FILE",
    "SEQ2SEQ_FORMAT",
    "SEQ2SEQ_SCHEMA_VERSION",
    "WEIGHTS",
    "fused_inputs",
    "read_manifest",
    "sha256",
]

FORMAT = "effx-onnx"
# 2: one shared weight store and the stages of passes (1, a weights file per stage, is no longer read)
SCHEMA_VERSION = 2
PLAN_FILE = "plan.json"
WEIGHTS = "weights.bin"
SEGMENT_FILE = "layers.onnx"
CASCADE_FILE = "cascade.json"
CASCADE_FORMAT = "effx-onnx-cascade"
CASCADE_SCHEMA_VERSION = 1
# an encoder-decoder program (effx.seq2seq): one self-contained ONNX file per stage, named in seq2seq.json
SEQ2SEQ_FILE = "seq2seq.json"
SEQ2SEQ_FORMAT = "effx-onnx-seq2seq"
SEQ2SEQ_SCHEMA_VERSION = 1
# the stage kinds an artifact holds and the ONNX runtime runs (every kind of effx.plan.STAGE_SIGNATURES)
KINDS = ("embed", "layer", "exit", "head", "full_head", "token_score", "token_drop")
# the inputs a fused layer graph (effx.exporters.onnx_attention) takes beyond a layer's: seqlens_k (int32
# [batch], the filled length after the step minus one), total_len (int32, that length), and the step's
# rotary angles as RotaryEmbedding takes them (fused_inputs)
FUSED_INPUTS = ("seqlens_k", "total_len", "rope_ids", "rope_cos", "rope_sin")


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


def _version_tuple(v: str) -> tuple:
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())


def read_manifest(path: Path, fmt: str, schema: int) -> dict:
    """``path`` as JSON, checked for format, schema version and the effx version that wrote it."""
    from ._about import __version__

    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{path} is not an {fmt} file (format {found!r})")
    if manifest.get("schema_version") != schema:
        raise ArtifactError(
            f"{path} has schema version {manifest.get('schema_version')!r}; this effx reads "
            f"{schema}: export the program again with this effx"
        )
    made_by = str(manifest.get("effx_version", "0"))
    if _version_tuple(made_by) > _version_tuple(__version__):
        raise ArtifactError(
            f"{path.parent} was written by effx {made_by}, newer than this effx {__version__}: upgrade effx"
        )
    return manifest
