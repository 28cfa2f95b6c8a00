"""ONNX artifacts: every stage of a Program in its own ``.onnx`` file, plus ``plan.json``.

``export(program, out_dir, tokenizer=None)`` writes::

    out_dir/
      plan.json            {"format": "effx-onnx", "schema_version": 1, "effx_version", "opset",
                            "plan": <Program.plan as JSON>, "files": {stage: {"onnx", "data", "sha256"}}}
      embed.onnx, embed.onnx.data, layer.0.onnx, ..., head.onnx, ...   (weights as external data)
      tokenizer/           (when a tokenizer is given)

Stages keep their signatures (``embed (input_ids, position_ids) -> (hidden, cos, sin)``, ``layer.i
(hidden, cos, sin, mask, past_k, past_v) -> (hidden, k, v)``, ``head (hidden) -> logits``) with dynamic
batch, sequence and past axes. Decoder layers of one structure are exported once: the other layers' files
are that model with their own weights swapped in, so a 30-layer model costs one layer's export, not 30.
Everything is written to a temporary directory next to ``out_dir`` and renamed at the end: an interrupted
export leaves nothing half-written. This version exports dense programs; programs with passes raise.

``effx.runtime.onnx.load(out_dir)`` runs the artifact with numpy and onnxruntime only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ArtifactError

__all__ = ["FORMAT", "SCHEMA_VERSION", "export"]

from ..runtime.onnx import FORMAT, SCHEMA_VERSION, _sha256

OPSET = 18


def _example_args(program, kind: str):
    info = program.info
    dt = info.torch_dtype
    b, s, p = 2, 3, 2
    if kind == "embed":
        return (torch.zeros(b, s, dtype=torch.long), torch.arange(s).expand(b, s).clone()), (
            {0: "batch", 1: "seq"},
            {0: "batch", 1: "seq"},
        )
    if kind == "layer":
        rope = torch.randn(b, s, info.head_dim, dtype=dt)
        past = torch.randn(b, info.num_kv_heads, p, info.head_dim, dtype=dt)
        args = (
            torch.randn(b, s, info.hidden_size, dtype=dt),
            rope,
            rope.clone() + 1,
            torch.zeros(b, 1, s, s + p, dtype=dt),
            past,
            past.clone() + 1,
        )
        seq = {0: "batch", 1: "seq"}
        return args, (
            seq,
            seq,
            seq,
            {0: "batch", 2: "seq", 3: None},
            {0: "batch", 2: "past"},
            {0: "batch", 2: "past"},
        )
    if kind == "head":
        return (torch.randn(b, s, info.hidden_size, dtype=dt),), ({0: "batch", 1: "seq"},)
    raise ArtifactError(f"stage kind {kind!r} has no ONNX export yet")


def _structure_of_graph(gm: torch.fx.GraphModule) -> tuple:
    """What two stage graphs must share for one ONNX export to serve both (with swapped weights)."""
    shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in gm.state_dict().items())
    return gm.code, shapes


def _with_weights(model, gm: torch.fx.GraphModule):
    """A copy of ``model`` (an exported layer) whose initializers hold ``gm``'s weights of the same names."""
    import onnx
    from onnx import numpy_helper

    state = {k: v.detach() for k, v in gm.state_dict().items()}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    swapped = 0
    for init in out.graph.initializer:
        if init.name in state:
            init.CopyFrom(numpy_helper.from_array(state[init.name].numpy(), init.name))
            swapped += 1
    if swapped != len(state):
        missing = sorted(set(state) - {i.name for i in out.graph.initializer})
        raise ArtifactError(
            f"cannot reuse the layer export: weights {missing[:3]} are not initializers of it"
        )
    return out


def export(program, out_dir: str | os.PathLike, *, tokenizer=None, progress: bool = False) -> Path:
    """Write ``program`` as ONNX stages + ``plan.json`` to ``out_dir`` (replaced if it exists)."""
    import onnx
    from tqdm.auto import tqdm

    from .. import __version__
    from ..capture import export_onnx

    unsupported = [s.name for s in program if s.kind not in ("embed", "layer", "head")]
    if unsupported or program.plan.passes:
        raise ArtifactError(
            f"this exporter writes dense programs so far; this one has passes {[p['name'] for p in program.plan.passes]} "
            f"and stages {unsupported}"
        )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        files = {}
        templates: dict[tuple, onnx.ModelProto] = {}
        for stage in tqdm(list(program), desc="export ONNX", unit="stage", disable=not progress):
            key = (stage.kind, _structure_of_graph(stage.graph))
            if stage.kind == "layer" and key in templates:
                model = _with_weights(templates[key], stage.graph)
            else:
                args, axes = _example_args(program, stage.kind)
                with torch.no_grad():
                    model = export_onnx(stage.graph, args, axes, OPSET)
                templates[key] = model
            name = f"{stage.name}.onnx"
            onnx.save(
                model, str(tmp / name), save_as_external_data=True, location=f"{name}.data", size_threshold=0
            )
            entry = {"onnx": name, "sha256": _sha256(tmp / name)}
            data = tmp / f"{name}.data"
            if data.is_file():
                entry.update(data=data.name, data_sha256=_sha256(data))
            files[stage.name] = entry
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "effx_version": __version__,
            "opset": OPSET,
            "plan": json.loads(program.plan.to_json()),
            "files": files,
        }
        (tmp / "plan.json").write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
