"""Run an effx ONNX artifact with numpy and onnxruntime only (no torch).

    from effx.runtime import onnx as effx_onnx
    gen = effx_onnx.load("out/smollm2")            # checks plan.json, checksums, schema
    out = gen.generate(input_ids, attention_mask, max_new_tokens=64)   # numpy int64 arrays

``generate`` is a front end of the same decode loop as ``Program.generate`` (:mod:`effx.runtime.loop`),
over the ONNX Runtime backend (:mod:`effx.runtime.onnx_backend`): left-padded batches, greedy decoding or
sampling (``do_sample=True``, ``temperature``, ``top_k``, ``top_p``, ``seed``), stop at ``eos_token_id``
(the plan's by default; ``[]`` never stops), finished rows padded with ``pad_token_id``; early exits with
deferred KV (lossy) or self-speculative drafting and verification, pruned exit vocabularies chosen per
token, a reduced head's fallback to the full head, TokenDrop's per-prompt token selection. A cascade
artifact (``cascade.json``) loads as an :class:`OnnxCascade`, which runs ``effx.Cascade``'s gated and
verified loops (:mod:`effx.runtime.cascade`). Neuron-masked layers need nothing here: their slicing is in
the stage files. What needs run-time graph surgery (NeuronMask ``mode="core"``, EarlyExit ``kv="copy"``)
is a capability this backend lacks: such artifacts are refused at load.

Execution providers: CPU by default; CUDA first when onnxruntime-gpu is installed and sees a GPU, with
full float32 matrix products (``providers=`` overrides). ``benchmarks/onnx_providers.py`` checks every
pass's tokens and decisions on each provider.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import techniques
from ..arrays import Array
from ..artifact import (
    CASCADE_FILE,
    CASCADE_FORMAT,
    CASCADE_SCHEMA_VERSION,
    FORMAT,
    PLAN_FILE,
    SCHEMA_VERSION,
    SEQ2SEQ_FILE,
    TOKENIZER_DIR,
    WEIGHTS,
    check_folder,
    check_model,
    check_plan,
    check_tokenizer,
    read_manifest,
    sha256,
)
from ..errors import ArtifactError, CascadeError, PlanError
from ..gates import GATES, Gate
from ..plan import Plan
from .backend import describe, needed_capabilities
from .cascade import decode as cascade_decode
from .inputs import check_arguments, resolve_max_new
from .loop import check_inputs, decode, stop_and_pad
from .onnx_backend import XP, OnnxBackend, Providers, Segment, default_providers
from .onnx_seq2seq import load_seq2seq
from .sampling import Sampler
from .stats import StatsArg

if TYPE_CHECKING:
    from .onnx_seq2seq import OnnxSeq2Seq

__all__ = ["OnnxCascade", "OnnxGenerator", "default_providers", "load"]


def load(
    out_dir: str | os.PathLike[str], *, providers: Providers | None = None
) -> OnnxGenerator | OnnxCascade | OnnxSeq2Seq:
    """Open an artifact written by ``effx.exporters.onnx.export``: an :class:`OnnxGenerator` for a Program,
    an :class:`OnnxCascade` for a cascade (``cascade.json``), an
    :class:`effx.runtime.onnx_seq2seq.OnnxSeq2Seq` for an encoder-decoder program (``seq2seq.json``). Every problem is an ``ArtifactError``."""
    out_dir = Path(out_dir)
    if (out_dir / SEQ2SEQ_FILE).is_file():
        return load_seq2seq(out_dir, providers)
    if (out_dir / CASCADE_FILE).is_file():
        return _load_cascade(out_dir, providers)
    return _load_program(out_dir, providers)


def _load_program(out_dir: Path, providers: Providers | None) -> OnnxGenerator:
    """The artifact at ``out_dir``, checked whole before any session opens: the manifest (format, schema,
    its own checksum, every field's type and range), every file it names against its checksum, the
    tokenizer's files and that they load; each graph's shapes are checked against the plan as it opens."""
    plan_path = out_dir / PLAN_FILE
    if not plan_path.is_file():
        raise ArtifactError(f"{out_dir} has no plan.json: not an effx ONNX artifact")
    manifest = read_manifest(plan_path, FORMAT, SCHEMA_VERSION)
    try:
        plan, files, segments, fused = _checked_files(out_dir, plan_path, manifest)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as e:
        # a field of a type the checks did not expect (the manifest is sealed, so someone wrote it so)
        raise ArtifactError(f"{plan_path} is malformed ({type(e).__name__}: {e})") from None
    check_folder(out_dir / TOKENIZER_DIR, manifest.get("tokenizer"), plan_path)
    check_tokenizer(out_dir / TOKENIZER_DIR)
    return OnnxGenerator(out_dir, plan, files, providers=providers, segments=segments, fused=fused)


def _checked_files(
    out_dir: Path, plan_path: Path, manifest: dict[str, Any]
) -> tuple[Plan, dict[str, Any], list[Segment], dict[str, Any]]:
    raw, files = manifest.get("plan"), manifest.get("files")
    if not isinstance(raw, dict) or not isinstance(files, dict) or not isinstance(raw.get("stages"), list):
        raise ArtifactError(f"{plan_path} lacks 'plan' (with its 'stages') or 'files'")
    kinds = [s.get("kind") if isinstance(s, dict) else None for s in raw["stages"]]
    unknown = sorted({str(k) for k in kinds if k not in techniques.stage_kinds()})
    if unknown:
        raise ArtifactError(f"{out_dir} has stages of kinds {unknown}, which this runtime does not run yet")
    check_model(raw.get("model"), raw["stages"], plan_path)
    try:
        plan = Plan.from_dict(raw)
    except PlanError as e:
        raise ArtifactError(f"{plan_path}: {e}") from e
    check_plan(plan, plan_path)
    missing = [describe(c) for c in needed_capabilities(plan) if c not in OnnxGenerator.capabilities]
    if missing:
        raise ArtifactError(f"{out_dir}: the ONNX runtime cannot run {'; '.join(missing)}")
    data = manifest.get("data")
    if not isinstance(data, dict) or not isinstance(data.get(WEIGHTS), str):
        raise ArtifactError(
            f"{plan_path} has no checksum of {WEIGHTS} under 'data': the weights cannot be checked; "
            "export the program again"
        )
    checks = [(name, digest, "weight store") for name, digest in data.items()]
    for s in plan.stages:
        entry = files.get(s.name)
        if not isinstance(entry, dict):
            raise ArtifactError(f"the plan references stage {s.name!r}, which has no file in {plan_path}")
        checks.append((entry.get("onnx"), entry.get("sha256"), f"stage {s.name}"))
    segments = _check_segments(manifest.get("segments", []), plan, files, plan_path)
    checks += [(seg.get("onnx"), seg.get("sha256"), f"segment {seg['name']}") for seg in segments]
    fused = _check_fused(manifest.get("fused", {}), plan, segments, plan_path)
    checks += [
        (entry.get("onnx"), entry.get("sha256"), f"fused graph of {name}") for name, entry in fused.items()
    ]
    for name, digest, what in checks:
        if not isinstance(name, str) or "\0" in name or name in ("", ".", "..") or Path(name).name != name:
            raise ArtifactError(
                f"{plan_path} names file {name!r} ({what}): files must lie in the artifact itself"
            )
        path = out_dir / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing ({what})")
        if sha256(path) != digest:
            raise ArtifactError(f"{path} does not match its checksum in plan.json: the artifact is corrupt")
    return plan, files, segments, fused


def _check_segments(segments: Any, plan: Plan, files: dict[str, Any], plan_path: Path) -> list[Segment]:
    """The manifest's ``segments``, checked: each a dict with a new name over two or more consecutive layers
    of the plan with one attention window (the whole-model segment ``layers``, or a run of layers between
    decision points, ``layers.a-b``), no two covering the same layer. Their files are checked with the
    others. An artifact without the key (older ones) runs layer by layer."""
    if not isinstance(segments, list):
        raise ArtifactError(f"{plan_path}: 'segments' must be a list, got {segments!r}")
    order = {s.name: n for n, s in enumerate(plan.layers)}
    names = set(files)
    covered: set[str] = set()
    for seg in segments:
        # the manifest's JSON, checked here: a list of layer names once ``consecutive`` holds
        stages: Any = seg.get("stages") if isinstance(seg, dict) else None
        where: list[Any] = (
            [order.get(s) if isinstance(s, str) else None for s in stages] if isinstance(stages, list) else []
        )
        consecutive = (
            len(where) >= 2
            and None not in where
            and where == list(range(where[0], where[0] + len(where)))
            and len({plan.layers[n].attrs.get("sliding_window") for n in where}) == 1
        )
        if not consecutive:
            raise ArtifactError(
                f"{plan_path}: a segment must be a dict whose 'stages' are two or more consecutive layers "
                f"of the plan with one attention window, got {seg!r}"
            )
        name = seg.get("name")
        if not isinstance(name, str) or name in names:
            raise ArtifactError(f"{plan_path}: segment name {name!r} is not a new name")
        names.add(name)
        if covered & set(stages):
            raise ArtifactError(
                f"{plan_path}: segments overlap (segment {name}: {sorted(covered & set(stages))})"
            )
        covered.update(stages)
    return segments


def _check_fused(fused: Any, plan: Plan, segments: list[Segment], plan_path: Path) -> dict[str, Any]:
    """The manifest's ``fused`` graphs (``effx.exporters.onnx_attention``), checked: a dict from the name of
    a layer stage or a segment to its fused graph's ``{"onnx", "sha256"}`` (the files are checked with the
    others). An artifact without the key (older ones) runs its plain graphs only."""
    names = {s.name for s in plan.layers} | {seg["name"] for seg in segments}
    if not isinstance(fused, dict) or not all(isinstance(v, dict) for v in fused.values()):
        raise ArtifactError(f"{plan_path}: 'fused' must map layer or segment names to files, got {fused!r}")
    unknown = sorted(set(fused) - names)
    if unknown:
        raise ArtifactError(f"{plan_path}: 'fused' names {unknown}, which are neither layers nor segments")
    return fused


# GenerationConfig fields Program.generate takes that are not parameters of OnnxGenerator.generate:
# use_cache and bos_token_id change nothing, max_length sets max_new_tokens
_ONNX_EXTRA = ("use_cache", "bos_token_id", "max_length")


class OnnxGenerator(OnnxBackend):
    """An artifact's stages as onnxruntime sessions, and ``generate``: the decode loop over them."""

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        max_new_tokens: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
        streamer: Any = None,
        on_token: Callable[[Array], object] | None = None,
        stats: StatsArg = None,
        stop: Callable[[Array], Any] | None = None,
        **kwargs: Any,
    ) -> np.ndarray[Any, Any]:
        """``[batch, prompt + new]`` token ids, as the torch backend's ``Program.generate`` (the same loop).
        Sampling draws from numpy's generator seeded with ``seed``. Pass a DecodeStats or a dict as ``stats`` to
        get what the runtime decided (the torch backend's keys: ``exit_layers``, ``drafted`` / ``accepted``,
        ``head_positions`` / ``head_fallbacks``, ``kept_tokens``). ``stop`` is the caller's stopping rule,
        as in ``Program.generate``. ``max_new_tokens`` defaults to 32 (or ``max_length`` less the prompt);
        other generation arguments are checked as :mod:`effx.runtime.inputs` says (refused by name unless
        they ask for nothing)."""
        given = check_arguments(kwargs, implemented=_ONNX_EXTRA, front_end="OnnxGenerator.generate")
        max_new_tokens = resolve_max_new(max_new_tokens, given.get("max_length"), input_ids, default=32)
        vocab = self.info.vocab_size
        ids, mask = check_inputs(
            XP, input_ids, attention_mask, max_new_tokens, self.info.max_positions, vocab_size=vocab
        )
        sampler = Sampler(do_sample=bool(do_sample), temperature=temperature, top_k=top_k, top_p=top_p)
        eos, pad = stop_and_pad(self.plan, eos_token_id, pad_token_id, vocab)
        tokens: np.ndarray[Any, Any] = decode(
            self,
            ids,
            mask,
            max_new=max_new_tokens,
            eos=eos,
            pad=pad,
            sampler=sampler,
            generator=np.random.default_rng(seed),
            streamer=streamer,
            on_token=on_token,
            stats=stats,
            stop=stop,
        )
        return tokens


# -- cascades ----------------------------------------------------------------------------------------------


def _load_cascade(out_dir: Path, providers: Providers | None) -> OnnxCascade:
    path = out_dir / CASCADE_FILE
    manifest = read_manifest(path, CASCADE_FORMAT, CASCADE_SCHEMA_VERSION)
    parts = manifest.get("parts")
    gens: dict[str, OnnxGenerator] = {}
    for role in ("small", "large"):
        part: Any = parts.get(role) if isinstance(parts, dict) else None  # JSON, checked here
        name = part.get("dir") if isinstance(part, dict) else None
        if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name or Path(name).name != name:
            raise ArtifactError(f"{path} names no valid directory for the {role} model")
        plan = out_dir / name / PLAN_FILE
        if not plan.is_file():
            raise ArtifactError(f"{plan} is missing (the cascade's {role} model)")
        if sha256(plan) != part.get("plan_sha256"):
            raise ArtifactError(
                f"{plan} does not match its checksum in {CASCADE_FILE}: the artifact is corrupt"
            )
        gens[role] = _load_program(out_dir / name, providers)
    gate: Any = manifest.get("gate")  # JSON, checked here, then the Gate it describes
    if gate is not None:
        if not isinstance(gate, dict) or gate.get("kind") not in GATES:
            raise ArtifactError(f"{path} has a gate this runtime does not know: {gate!r}")
        threshold: Any = gate.get("threshold")
        finite = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
        if not finite or not math.isfinite(threshold):
            raise ArtifactError(f"{path}: the gate's threshold must be a finite number, got {threshold!r}")
        try:
            gate = GATES[gate["kind"]](threshold=threshold)
            gate.require_threshold()
        except CascadeError as e:
            raise ArtifactError(f"{path} has a gate this runtime does not know: {e}") from e
    if manifest.get("mode") not in ("gated", "verified"):
        raise ArtifactError(f"{path} has an unknown cascade mode {manifest.get('mode')!r}")
    # the longest draft: at least one token, at most what both models' context holds
    limit = min(gens["small"].info.max_positions, gens["large"].info.max_positions)
    draft = manifest.get("draft")
    if isinstance(draft, bool) or not isinstance(draft, int) or not 1 <= draft <= limit:
        raise ArtifactError(f"{path}: draft must be an integer in [1, {limit}], got {draft!r}")
    if not isinstance(manifest.get("adaptive"), bool):
        raise ArtifactError(f"{path}: adaptive must be true or false, got {manifest.get('adaptive')!r}")
    check_folder(out_dir / TOKENIZER_DIR, manifest.get("tokenizer"), path)
    check_tokenizer(out_dir / TOKENIZER_DIR)
    return OnnxCascade(gens["small"], gens["large"], manifest, gate)


class OnnxCascade:
    """A cascade artifact: the small and the large model's generators and the cascade's settings; decodes
    with ``effx.Cascade.generate``'s loops (greedy; gated or verified mode)."""

    def __init__(
        self, small: OnnxGenerator, large: OnnxGenerator, manifest: dict[str, Any], gate: Gate | None = None
    ) -> None:
        if small.info.vocab_size != large.info.vocab_size:
            raise ArtifactError("the cascade's models have different vocabularies")
        self.small, self.large = small, large
        self.mode = manifest["mode"]
        self.draft = manifest["draft"]  # checked by load
        self.adaptive = manifest["adaptive"]
        self.gate = gate
        self.plan = large.plan  # stop and pad tokens come from the large model, as in the torch backend
        if self.mode == "gated" and gate is None:
            raise ArtifactError("a gated cascade artifact needs a gate")

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        max_new_tokens: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        stats: StatsArg = None,
        **kwargs: Any,
    ) -> np.ndarray[Any, Any]:
        """``[batch, prompt + new]`` token ids, as ``effx.Cascade.generate`` (greedy; other generation
        arguments checked as :mod:`effx.runtime.inputs` says); ``stats`` receives what
        :func:`effx.runtime.cascade.decode` reports."""
        given = check_arguments(kwargs, implemented=_ONNX_EXTRA, front_end="OnnxCascade.generate (greedy)")
        max_new_tokens = resolve_max_new(max_new_tokens, given.get("max_length"), input_ids, default=32)
        limit = min(self.small.info.max_positions, self.large.info.max_positions)
        vocab = self.large.info.vocab_size
        ids, mask = check_inputs(
            XP,
            input_ids,
            attention_mask,
            max_new_tokens,
            limit,
            vocab_size=vocab,
            what="the cascade's models",
        )
        eos, pad = stop_and_pad(self.plan, eos_token_id, pad_token_id, vocab)
        tokens: np.ndarray[Any, Any]
        tokens, _, _ = cascade_decode(
            self.small,
            self.large,
            ids,
            mask,
            mode=self.mode,
            max_new=max_new_tokens,
            eos=eos,
            pad=pad,
            fires=self.gate,
            draft=self.draft,
            adaptive=self.adaptive,
            stats=stats,
        )
        return tokens
