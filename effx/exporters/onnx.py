"""ONNX artifacts: every stage of a Program in its own ``.onnx`` file, one weight store, and ``plan.json``.

``export(program, out_dir, tokenizer=None)`` writes::

    out_dir/
      plan.json            {"format": "effx-onnx", "schema_version": 3, "effx_version", "opset",
                            "plan": <Program.plan as JSON>,
                            "files": {stage: {"onnx", "sha256"}},
                            "segments": [{"name": "layers" | "layers.0-3", "stages": [layer names],
                                          "onnx", "sha256"}],
                            "data": {"weights.bin": sha256},
                            "tokenizer": {file under tokenizer/: sha256},
                            "manifest_sha256": <the SHA-256 of the rest (effx.artifact.seal)>}
      embed.onnx, layer.0.onnx, ..., exit.9.onnx, ..., head.onnx    (graphs; weights are external)
      layers.onnx          every layer in one graph, on the same weights (only when ``segments`` lists it)
      layers.0-3.onnx      a run of layers between decision points in one graph (also under ``segments``)
      weights.bin          every weight tensor once, at 64-byte (>= 1 MB: 64 KiB) aligned offsets
      tokenizer/           (when a tokenizer is given; every file under the manifest's checksums)

Every stage kind a pass creates is exported with its plan signature (``effx.techniques``: its kind's signature) and
dynamic batch, sequence and past axes: layers (neuron-masked ones with their sliced weights), exits (full,
or pruned with a ``vocab_ids`` input of dynamic length), reduced and full heads, TokenDrop's score and
gather stages. Stages of one structure are exported once: the others are that model with their own weights
swapped in, so a 30-layer model costs one layer's export, not 30. Tensors with the same bytes are stored
once (a tied embedding and LM head, the head that every shared-head exit repeats).

A quantized Program (the Quantize pass) keeps its quantized bytes, and only them, in the weight store: its
4-bit products run as ONNX Runtime's ``com.microsoft.MatMulNBits``, its lookups (the embedding, a pruned
exit's rows of the head) gather the quantized rows and de-quantize them, and 8-bit and bfloat16 products
de-quantize in the graph, which ONNX Runtime folds to float32 weights at load
(:mod:`effx.exporters.onnx_quant`). The logits equal the torch Program's up to float rounding.

A program whose decoding steps always run every layer back to back (no exits or token-drop stages between
them: dense, neuron-masked, a reduced head) also gets ``layers.onnx``, the layer stages composed into one
graph, listed under ``segments``: the runtime then opens that one session instead of one per layer, which
spares ONNX Runtime a thread wake-up per layer and step. Runtimes that do not know ``segments`` ignore it
and run the layer files. A program with decision points between its layers (an exit after layer i, a
token drop before layer j, a change of attention window) gets such a graph for every run of two or more
layers between them instead, ``layers.a-b.onnx``, also listed under ``segments``: the
runtime runs a run of layers as one session wherever the loop runs it without a decision in between.
``effx.runtime.onnx.load`` checks every segment like the stage files (two or more consecutive layers
with one attention window, a new name, no two overlapping, its file inside the artifact and matching its
checksum).

A cascade (``effx.cascade``) is written as two such artifacts, ``small/`` and ``large/``, with
``cascade.json`` (mode, draft settings, the calibrated gate, both plans' checksums); ``effx.runtime.onnx.load``
then returns an ``OnnxCascade`` that decodes as ``Cascade.generate``.

Everything is written to a temporary directory next to ``out_dir`` and renamed at the end: an interrupted
export leaves nothing half-written. Two runtime choices have no ONNX form yet and are refused with an
``ArtifactError``: early exit with ``kv="copy"`` and NeuronMask ``mode="core"``.

``effx.runtime.onnx.load(out_dir)`` runs the artifact with numpy and onnxruntime only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .. import _about, techniques
from ..artifact import (
    CASCADE_FILE,
    CASCADE_FORMAT,
    CASCADE_SCHEMA_VERSION,
    FORMAT,
    SCHEMA_VERSION,
    SEGMENT_FILE,
    TOKENIZER_DIR,
    WEIGHTS,
    folder_checksums,
    one_block,
    sha256,
    write_manifest,
)
from ..cascade import Cascade
from ..errors import ArtifactError
from ..program import torch_dtype
from ..runtime.backend import describe, needed_capabilities
from ..seq2seq import Seq2SeqProgram
from . import onnx_attention, onnx_quant, onnx_stage
from .folder import check_target, replacing
from .onnx_seq2seq import export_seq2seq

__all__ = ["FORMAT", "SCHEMA_VERSION", "export", "layer_runs"]

OPSET = 18
# the largest difference a fused layer graph may have from the plain one, relative to the largest output
# (float32 sums in another order; measured 1e-6 on SmolLM2's layers)
_FUSED_TOLERANCE = 1e-4
_INT8_FUSED_TOLERANCE = 2e-2  # the same check where products round their input to int8 levels
_INLINE_BYTES = 1024  # smaller tensors (scalars, shapes) stay inside the .onnx file


def _example_args(program, stage):
    """Example inputs of ``stage`` and the dynamic axes of each (``None``: inferred by export), built from
    the shapes its signature's tensors have in ``effx.techniques.TENSORS``: floats random (each input its
    own), int64 inputs counting up along their last axis (token ids, positions, kept slots, vocabulary ids:
    all in range), the mask zeros."""
    info = program.info
    sizes = {**model_sizes(info), "batch": 2, "seq": 3, "past": 2, "total": 5, "kept": 2, "vocab_k": 5}
    args, axes = [], []
    for i, name in enumerate(techniques.stage_kind(stage.kind).signature(stage.attrs)[0]):
        shape, dtype = techniques.TENSORS[name]
        dims = [d if isinstance(d, int) else sizes[d] for d in shape]
        if dtype == "int64":
            bound = info.vocab_size if name in ("input_ids", "vocab_ids") else dims[-1]
            value = (torch.arange(dims[-1]) % bound).expand(*dims).clone()
        elif name == "mask":
            value = torch.zeros(*dims, dtype=torch_dtype(info))
        else:
            value = torch.randn(*dims, dtype=torch_dtype(info)) + i
        args.append(value)
        axes.append(
            {a: (None if d == "total" else d) for a, d in enumerate(shape) if d in techniques.DYNAMIC}
        )
    return tuple(args), tuple(axes)


def model_sizes(info) -> dict[str, int]:
    """The sizes the model fixes, by the symbols of ``effx.techniques.TENSORS``."""
    return {
        "hidden": info.hidden_size,
        "rope": info.rope_width,
        "kv_heads": info.num_kv_heads,
        "head_dim": info.head_dim,
        "vocab": info.vocab_size,
    }


def _structure_of_graph(gm: torch.fx.GraphModule) -> tuple:
    """What two stage graphs must share for one ONNX export to serve both (with swapped weights)."""
    shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in gm.state_dict().items())
    return gm.code, shapes


def _optimize(model):
    """``model`` through onnxscript's optimizer (folds the shape arithmetic every stage recomputes, removes
    dead and redundant nodes: a SmolLM2 layer goes from 180 nodes to 88; decode about 5% faster) with
    its initializers held out as graph inputs meanwhile, so that every weight keeps its name and bytes:
    the weight swapping between stages of one structure and the deduplicated store work on them."""
    import onnx
    import onnx_ir
    import onnxscript.optimizer

    weights = list(model.graph.initializer)
    held = onnx.ModelProto()
    held.CopyFrom(model)
    del held.graph.initializer[:]
    held.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights
    )
    optimized = onnx_ir.to_proto(onnxscript.optimizer.optimize(onnx_ir.from_proto(held)))
    names = {t.name for t in weights}
    inputs = [i for i in optimized.graph.input if i.name not in names]
    del optimized.graph.input[:]
    optimized.graph.input.extend(inputs)
    optimized.graph.initializer.extend(weights)
    _strip_node_metadata(optimized.graph)
    return optimized


def _strip_node_metadata(graph) -> None:
    """Drop what ``torch.onnx`` writes on every node (its fx node, module path and the Python stack trace
    that made it, with this machine's file paths): 87% of a SmolLM2 layer file's bytes, nothing that ONNX
    Runtime reads."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs]:
                _strip_node_metadata(sub)


def _with_weights(model, gm: torch.fx.GraphModule):
    """A copy of ``model`` (an exported stage) whose initializers hold ``gm``'s weights of the same names,
    or None if its initializers are not exactly ``gm``'s weights by name."""
    import onnx

    state = {k: v.detach() for k, v in gm.state_dict().items()}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    swapped = 0
    for init in out.graph.initializer:
        if init.name in state:
            init.CopyFrom(_tensor_proto(state[init.name], init.name))
            swapped += 1
    return out if swapped == len(state) else None


def _tensor_proto(t: torch.Tensor, name: str):
    """``t`` as an ONNX initializer (bfloat16, which numpy lacks, from its bytes)."""
    import onnx
    from onnx import numpy_helper

    if t.dtype == torch.bfloat16:
        data = t.contiguous().view(torch.int16).numpy().tobytes()
        return onnx.helper.make_tensor(name, onnx.TensorProto.BFLOAT16, list(t.shape), data, raw=True)
    return numpy_helper.from_array(t.numpy(), name)


class _WeightStore:
    """One file of weight bytes that every stage's initializers point into; identical tensors once."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")  # closed in close(): the store spans every stage
        self.placed: dict[bytes, tuple[int, int]] = {}

    def externalize(self, model) -> None:
        from onnx import numpy_helper
        from onnx.external_data_helper import set_external_data

        for init in model.graph.initializer:
            if not init.HasField("raw_data"):
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
            data = init.raw_data
            if len(data) < _INLINE_BYTES:
                continue
            digest = hashlib.sha256(data).digest()
            if digest not in self.placed:
                align = 65536 if len(data) >= 1 << 20 else 64
                offset = -self.file.tell() % align
                self.file.write(b"\0" * offset)
                self.placed[digest] = (self.file.tell(), len(data))
                self.file.write(data)
            offset, length = self.placed[digest]
            set_external_data(init, self.path.name, offset, length)
            init.ClearField("raw_data")

    def close(self) -> None:
        self.file.close()


def _unsupported(program) -> list[str]:
    problems = [
        f"stage {s.name!r} of kind {s.kind!r}" for s in program if s.kind not in techniques.stage_kinds()
    ]
    return problems + [describe(c) for c in needed_capabilities(program.plan)]


def export(
    program, out_dir: str | os.PathLike, *, tokenizer=None, progress: bool = False, overwrite: bool = False
) -> Path:
    """Write ``program`` as ONNX stages + weight store + ``plan.json`` to ``out_dir``. ``progress=True``
    shows a progress bar over the stages.

    ``out_dir`` may be a new path, an empty folder or an earlier artifact, which the new one replaces
    atomically once complete; a folder holding anything else is refused unless ``overwrite=True``, and the
    current directory, a folder above it or a file always (:mod:`effx.exporters.folder`). Nothing is
    written where the export fails or is interrupted.

    ``program`` may also be an encoder-decoder :class:`effx.seq2seq.Seq2SeqProgram`
    (:mod:`effx.exporters.onnx_seq2seq`), or an ``effx.Cascade`` (calibrated, if it has a gate): each model is written as
    such an artifact under ``small/`` and ``large/``, and ``cascade.json`` holds the mode, the draft
    settings, the gate (kind and threshold) and the checksums of both plans."""
    if isinstance(program, Seq2SeqProgram):
        return export_seq2seq(program, out_dir, tokenizer=tokenizer, progress=progress, overwrite=overwrite)
    check_target(out_dir, overwrite)
    parts = (
        {"small": program.small, "large": program.large} if isinstance(program, Cascade) else {"": program}
    )
    problems = [
        f"{role + ': ' if role else ''}{p}" for role, prog in parts.items() for p in _unsupported(prog)
    ]
    if problems:
        raise ArtifactError("cannot export this program to ONNX: " + "; ".join(problems))
    if isinstance(program, Cascade) and program.gate is not None and program.gate.threshold is None:
        raise ArtifactError(
            "the cascade's gate has no threshold yet: calibrate the cascade before exporting it"
        )
    with replacing(out_dir, tokenizer, overwrite=overwrite) as tmp:
        for role, prog in parts.items():
            (tmp / role).mkdir(exist_ok=True)
            _write_program(prog, tmp / role, progress=progress, label=role)
        if isinstance(program, Cascade):
            _write_cascade(program, tmp)
    return Path(out_dir)


def _write_program(program, out: Path, *, progress: bool, label: str) -> None:
    import onnx
    from tqdm.auto import tqdm

    files = {}
    translations = onnx_quant.translations()
    templates: dict[tuple, onnx.ModelProto] = {}  # exported stages before lowering: weights swap by name
    layers = {}  # layer stage name -> its exported model, for the segments
    fused_layers, fused_files = {}, {}  # the same with fused attention (onnx_attention), and their files
    checked: set = set()  # the structures whose fused graph was checked against the plain one
    store = _WeightStore(out / WEIGHTS)
    desc = f"export ONNX{' (' + label + ')' if label else ''}"
    try:
        for stage in tqdm(list(program), desc=desc, unit="stage", disable=not progress):
            key = (stage.kind, _structure_of_graph(stage.graph))
            model = _with_weights(templates[key], stage.graph) if key in templates else None
            if model is None:
                args, axes = _example_args(program, stage)
                with torch.no_grad():
                    exported = onnx_stage.export_onnx(
                        stage.graph, args, axes, OPSET, translations=translations
                    )
                    model = _optimize(exported)
                templates[key] = model
                model = _copy(model)
            # quantized products and lookups: from the placeholders over this stage's own tensors
            model = onnx_quant.lower(model, program.plan.activations)
            fused = _fused_layer(program, model, check=key not in checked) if stage.kind == "layer" else None
            checked.add(key)
            store.externalize(model)
            name = f"{stage.name}.onnx"
            onnx.save(model, str(out / name))
            files[stage.name] = {"onnx": name, "sha256": sha256(out / name)}
            if stage.kind == "layer":
                layers[stage.name] = model
            if fused is not None:
                store.externalize(fused)
                fused_layers[stage.name] = fused
                path = f"{stage.name}.fused.onnx"
                onnx.save(fused, str(out / path))
                fused_files[stage.name] = {"onnx": path, "sha256": sha256(out / path)}
    finally:
        store.close()
    segments = []
    for run in layer_runs(program):
        whole = _runs_as_one_block(program) and len(run) == len(layers)
        name, path = ("layers", SEGMENT_FILE) if whole else (_segment_name(run), f"{_segment_name(run)}.onnx")
        onnx.save(_fuse_layers([(s, layers[s]) for s in run], presents=whole), str(out / path))
        entry = {"name": name, "stages": list(run), "onnx": path, "sha256": sha256(out / path)}
        segments.append(entry)
        if all(s in fused_layers for s in run):
            path = path.removesuffix(".onnx") + ".fused.onnx"
            onnx.save(_fuse_layers([(s, fused_layers[s]) for s in run]), str(out / path))
            fused_files[name] = {"onnx": path, "sha256": sha256(out / path)}
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "effx_version": _about.__version__,
        "opset": OPSET,
        "plan": json.loads(program.plan.to_json()),
        "files": files,
        "segments": segments,
        "fused": fused_files,
        "data": {WEIGHTS: sha256(out / WEIGHTS)},
        # a cascade's parts have none: its tokenizer is the cascade's, under cascade.json
        "tokenizer": folder_checksums(out / TOKENIZER_DIR),
    }
    write_manifest(out / "plan.json", manifest)


def _fused_layer(program, model, *, check: bool):
    """``model`` (a layer stage) with fused attention and norms (:mod:`effx.exporters.onnx_attention`), or
    None where the rewrite does not apply. ``check``: run both on random inputs first (the first layer of
    each structure); a fused graph that computes another function is an error of this exporter."""
    info = program.info
    if info.dtype != "float32":
        return None  # the rewrite and its check are for float32 stages, as every effx Program is today
    if info.head_dim % 8:
        return None  # ONNX Runtime's GroupQueryAttention takes head sizes that are multiples of 8 only
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3

    def session(m):
        return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    errors, plain = [], None
    # first with ONNX Runtime's rotary embedding on the projections, then with the graph's own; a model with
    # a rotary table per kind of layer (Gemma 3) keeps the graph's own, which slices the layer's table
    for rotary in (True, False) if info.rope_tables == 1 else (False,):
        fused = onnx_attention.fuse_layer(
            model, num_heads=info.num_heads, kv_heads=info.num_kv_heads, rotary=rotary
        )
        if fused is None or not check:
            return fused
        plain = plain or session(model)
        err = onnx_attention.reference_check(
            plain,
            session(fused),
            hidden=info.hidden_size,
            kv_heads=info.num_kv_heads,
            head_dim=info.head_dim,
            tables=info.rope_tables,
        )
        # int8 activations: an input that differs in the last bits may round to a neighbouring int8 level,
        # one step of the block's scale (1/127 of its largest magnitude)
        if err <= (_INT8_FUSED_TOLERANCE if program.plan.activations == "int8" else _FUSED_TOLERANCE):
            return fused
        errors.append(f"{err:.1e}")
    raise ArtifactError(
        f"the fused layer graphs differ from the plain one by {' and '.join(errors)} (relative): an exporter bug"
    )


def layer_runs(stages) -> list[tuple[str, ...]]:
    """The names of every maximal run of two or more consecutive layer stages of ``stages`` (a Program or
    a Plan's stages, in order) that a decoding step may run without a decision between them: an exit after
    layer i ends a run at i (the loop checks it, and deferred tokens join after it), a token drop before
    layer j starts one at j (the layers from j on have another dropped set), and a change of sliding window
    starts one too (one mask serves a segment's layers)."""
    runs, run, window = [], [], None
    for stage in stages:
        if stage.kind == "layer":
            w = stage.attrs.get("sliding_window")
            if run and w != window:
                runs.append(run)
                run = []
            run.append(stage.name)
            window = w
        elif run:  # exit, token_score / token_drop, or a stage outside the layers: a decision point
            runs.append(run)
            run = []
    runs.append(run)
    return [tuple(r) for r in runs if len(r) >= 2]


def _runs_as_one_block(program) -> bool:
    """Whether every decoding step runs all of ``program``'s layers back to back with one mask: no exits
    or token-drop stages between them, one attention window. Only then is a segment the whole-model one
    (``layers``, with the bound cache's outputs)."""
    return one_block(list(program))


def _segment_name(run) -> str:
    """``layers.a-b`` for a run of layer stages ``layer.a`` .. ``layer.b``."""
    return f"layers.{run[0].split('.', 1)[1]}-{run[-1].split('.', 1)[1]}"


def _fuse_layers(layers, *, presents: bool = True):
    """One graph that runs the layer stages ``layers`` (``[(name, model)]``, in order): inputs ``hidden``,
    ``cos``, ``sin``, ``mask`` and each layer's ``past_k.i`` / ``past_v.i``; outputs the last hidden state
    and each layer's ``k.i`` / ``v.i`` (``i`` counts the segment's layers from 0). Its weights are the layer
    files' own entries in the weight store. ``presents=False`` leaves out the past-and-new cache outputs
    (``_present_outputs``), which only the whole-model segment's bound cache reads.
    Fused layers (:func:`effx.exporters.onnx_attention.fuse_layer`) compose the same way, with their
    ``seqlens_k`` and ``total_len`` inputs shared by every layer and their in-place caches as outputs
    ``present_k.i`` / ``present_v.i``.
    ONNX Runtime wakes a session's threads at each run: on 2 cores, SmolLM2's 30 layers as 30 sessions ran
    at 0.95x the speed of this one graph, fed the same inputs."""
    import onnx
    from onnx import compose, helper

    nodes, initializers, value_info, inputs, outputs, found = [], [], [], [], [], []
    hidden = "hidden"
    for i, (name, model) in enumerate(layers):
        graph = compose.add_prefix(model, f"{name}/").graph
        names = [x.name for x in graph.input]  # the layer signature: hidden, cos, sin, mask, past_k, past_v
        shared = [hidden, "cos", "sin", "mask", f"past_k.{i}", f"past_v.{i}", *onnx_attention.FUSED_INPUTS]
        shared = shared[: len(names)]
        fused = len(names) > 6
        rename = dict(zip(names, shared, strict=True))
        if fused:
            # the in-place caches: the attention node's own outputs, which the runtime binds to the past's
            # buffers (an Identity would copy them into buffers of ONNX Runtime's)
            outs = {graph.output[1].name: f"present_k.{i}", graph.output[2].name: f"present_v.{i}"}
            for value in graph.output[1:]:
                value.name = outs[value.name]
        for node in graph.node:
            node.input[:] = [rename.get(x, x) for x in node.input]
            if fused:
                node.output[:] = [outs.get(x, x) for x in node.output]
        nodes += graph.node
        initializers += graph.initializer
        value_info += graph.value_info
        for value, new in zip(graph.input, shared, strict=True):
            if i == 0 or new.startswith("past_"):
                inputs.append(onnx.ValueInfoProto())
                inputs[-1].CopyFrom(value)
                inputs[-1].name = new
        out_hidden, out_k, out_v = graph.output
        for value, kind in zip((out_k, out_v), ("k", "v"), strict=True):
            outputs.append(onnx.ValueInfoProto())
            outputs[-1].CopyFrom(value)
            if not fused:
                outputs[-1].name = f"{kind}.{i}"
                nodes.append(helper.make_node("Identity", [value.name], [outputs[-1].name]))
        found.append(None if fused else _present_outputs(graph, i))
        hidden = out_hidden.name
    if presents and all(found):  # every layer's cache concatenation found: expose them (see _present_outputs)
        for i, pair in enumerate(found):
            for kv, source in zip("kv", pair, strict=True):
                nodes.append(helper.make_node("Identity", [source], [f"present_{kv}.{i}"]))
                outputs.append(_length_free(inputs, f"past_{kv}.{i}", f"present_{kv}.{i}"))
    if fused:  # the norms after one layer's residual sum, in the next layer (see fuse_norms)
        nodes = onnx_attention.fuse_norms(nodes, initializers, [x.name for x in inputs])
    nodes.append(helper.make_node("Identity", [hidden], ["last_hidden"]))
    last = onnx.ValueInfoProto()
    last.CopyFrom(out_hidden)
    last.name = "last_hidden"
    graph = helper.make_graph(nodes, "layers", inputs, [last, *outputs], initializers, value_info=value_info)
    first = layers[0][1]
    return helper.make_model(graph, opset_imports=first.opset_import, ir_version=first.ir_version)


def _present_outputs(graph, i: int):
    """The names of layer ``i``'s past-and-new keys and values (the Concat of ``past_k.i`` / ``past_v.i`` with
    the step's own along the sequence axis, which attention computes anyway), or None where the graph has
    no such single Concat for each. Exposed as outputs, they let a runtime keep the cache where the
    session runs (on a GPU) and feed it back as the next step's past."""
    found = []
    for past in (f"past_k.{i}", f"past_v.{i}"):
        concats = [
            n.output[0]
            for n in graph.node
            if n.op_type == "Concat"
            and list(n.input)[:1] == [past]
            and len(n.input) == 2
            and any(a.name == "axis" and a.i in (2, -2) for a in n.attribute)
        ]
        if len(concats) != 1:
            return None
        found.append(concats[0])
    return tuple(found)


def _length_free(inputs, like: str, name: str):
    """A value info named ``name`` with the type of the input ``like``, its sequence axis left unnamed."""
    import onnx

    value = onnx.ValueInfoProto()
    value.CopyFrom(next(x for x in inputs if x.name == like))
    value.name = name
    value.type.tensor_type.shape.dim[2].Clear()
    return value


def _write_cascade(casc, out: Path) -> None:
    gate = None if casc.gate is None else {"kind": casc.gate.name, "threshold": float(casc.gate.threshold)}
    manifest = {
        "format": CASCADE_FORMAT,
        "schema_version": CASCADE_SCHEMA_VERSION,
        "effx_version": _about.__version__,
        "mode": casc.mode,
        "draft": casc.draft,
        "adaptive": casc.adaptive,
        "gate": gate,
        "parts": {
            role: {"dir": role, "plan_sha256": sha256(out / role / "plan.json")}
            for role in ("small", "large")
        },
        "tokenizer": folder_checksums(out / TOKENIZER_DIR),
    }
    write_manifest(out / CASCADE_FILE, manifest)


def _copy(model):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
