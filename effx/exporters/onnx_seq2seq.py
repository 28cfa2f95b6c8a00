"""Write an encoder-decoder program (:class:`effx.seq2seq.Seq2SeqProgram`) as an ONNX artifact.

One self-contained ONNX file per stage (weights inside), named as :mod:`effx.runtime.seq2seq` names the
stages, and ``seq2seq.json``: the shapes, the greedy generation defaults, the encoder's token drops and the
files' checksums. ``effx.runtime.onnx.load`` opens it as an
:class:`effx.runtime.onnx_seq2seq.OnnxSeq2Seq`, which runs the same loop as ``Seq2SeqProgram.generate``.
The token embedding is stored in the encoder, decoder and head files each (a shared weight store, as the
decoder-only artifacts have, is left for when a real seq2seq model ships).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .._about import __version__
from ..artifact import (
    SEQ2SEQ_FILE,
    SEQ2SEQ_FORMAT,
    SEQ2SEQ_SCHEMA_VERSION,
    TOKENIZER_DIR,
    folder_checksums,
    sha256,
    write_manifest,
)
from . import onnx_stage
from .folder import replacing

__all__ = ["export_seq2seq"]


def _example(program, name: str):
    """Example inputs and named dynamic axes of stage ``name``."""
    info = program.info
    d, h, hd, dt = info.hidden_size, info.num_heads, info.head_dim, program.dtype
    B, S, P, E = 2, 3, 2, 5
    seq = {0: "batch", 1: "seq"}
    if name == "encoder.embed":
        return (torch.zeros(B, E, dtype=torch.long),), (seq,)
    mask_heads = h if info.relative_bias else 1  # T5's masks carry the per-head position bias
    if name == "encoder.bias":
        return (torch.arange(E).expand(B, E).clone(),), (seq,)
    if name == "decoder.bias":
        return (torch.arange(S).expand(B, S) + P, torch.arange(P + S).expand(B, P + S).clone()), (
            seq,
            {0: "batch", 1: None},
        )
    if name.startswith(("encoder.layer.", "encoder.score.")):
        return (torch.randn(B, E, d, dtype=dt), torch.zeros(B, mask_heads, E, E, dtype=dt)), (
            seq,
            {0: "batch", 2: "seq", 3: "seq"},
        )
    if name == "encoder.gather":
        return (torch.randn(B, 7, d, dtype=dt), torch.tensor([[0, 2, 5], [1, 3, 6]])), (
            seq,
            {0: "batch", 1: "kept"},
        )
    if name == "decoder.embed":
        return (torch.zeros(B, S, dtype=torch.long), torch.arange(S).expand(B, S).clone()), (seq, seq)
    if name.startswith("decoder.cross."):
        return (torch.randn(B, E, d, dtype=dt),), ({0: "batch", 1: "kept"},)
    if name.startswith("decoder.layer."):
        kv = torch.randn(B, h, P, hd, dtype=dt)
        ckv = torch.randn(B, h, E, hd, dtype=dt)
        args = (
            torch.randn(B, S, d, dtype=dt),
            torch.zeros(B, mask_heads, S, P + S, dtype=dt),
            kv,
            kv.clone(),
            ckv,
            ckv.clone(),
            torch.zeros(B, 1, 1, E, dtype=dt),
        )
        past, kept = {0: "batch", 2: "past"}, {0: "batch", 2: "kept"}
        return args, (seq, {0: "batch", 2: "seq", 3: None}, past, past, kept, kept, {0: "batch", 3: "kept"})
    if name == "head":
        return (torch.randn(B, S, d, dtype=dt),), (seq,)
    raise KeyError(name)


def export_seq2seq(
    program, out_dir: str | os.PathLike, *, tokenizer=None, progress: bool = False, overwrite: bool = False
) -> Path:
    """Write ``program`` to ``out_dir`` (as :func:`effx.exporters.onnx.export` writes: an earlier artifact
    replaced once the new one is complete, anything else refused unless ``overwrite``); returns the path.
    ``progress=True`` shows a progress bar over the stages."""
    import onnx
    from tqdm.auto import tqdm

    stages = program.stages()
    with replacing(out_dir, tokenizer, overwrite=overwrite) as tmp:
        files = {}
        for name, gm in tqdm(stages.items(), desc="export stages", unit="stage", disable=not progress):
            args, axes = _example(program, name)
            proto = onnx_stage.export_onnx(gm, args, axes)
            path = tmp / f"{name}.onnx"
            onnx.save(proto, path)
            files[name] = {"onnx": path.name, "sha256": sha256(path)}
        enc = program.encoder
        manifest = {
            "format": SEQ2SEQ_FORMAT,
            "schema_version": SEQ2SEQ_SCHEMA_VERSION,
            "effx_version": __version__,
            "info": program.info.to_dict(),
            "generation": program.generation,
            "drops": {str(i): d.keep for i, d in enc.drops.items()},
            "special": list(enc.special),
            "files": files,
            "tokenizer": folder_checksums(tmp / TOKENIZER_DIR),
        }
        write_manifest(tmp / SEQ2SEQ_FILE, manifest)
    return Path(out_dir)
