"""Run an effx ONNX artifact with numpy and onnxruntime only (no torch).

    from effx.runtime import onnx as effx_onnx
    gen = effx_onnx.load("out/smollm2")            # checks plan.json, checksums, schema
    out = gen.generate(input_ids, attention_mask, max_new_tokens=64)   # numpy int64 arrays

``generate`` has the torch backend's semantics for dense programs: left-padded batches, greedy decoding
(or sampling with ``do_sample=True``, ``temperature``, ``top_k``, ``seed``), stop at ``eos_token_id``
(the plan's by default; ``[]`` never stops), finished rows padded with ``pad_token_id``. Execution
providers: CPU by default, CUDA when onnxruntime-gpu is installed and a GPU is present (``providers=``
overrides).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, GenerationInputError

__all__ = ["OnnxGenerator", "load"]

FORMAT = "effx-onnx"
SCHEMA_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version_tuple(v: str) -> tuple:
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())


def load(out_dir: str | os.PathLike, *, providers=None) -> OnnxGenerator:
    """Open an artifact written by ``effx.exporters.onnx.export``; every problem is an ``ArtifactError``."""
    from .. import __version__

    out_dir = Path(out_dir)
    plan_path = out_dir / "plan.json"
    if not plan_path.is_file():
        raise ArtifactError(f"{out_dir} has no plan.json: not an effx ONNX artifact")
    try:
        manifest = json.loads(plan_path.read_text())
    except ValueError as e:
        raise ArtifactError(f"{plan_path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{plan_path} is not an effx ONNX plan (format {manifest.get('format')!r})")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{plan_path} has schema version {manifest.get('schema_version')!r}; this effx reads {SCHEMA_VERSION}"
        )
    made_by = str(manifest.get("effx_version", "0"))
    if _version_tuple(made_by) > _version_tuple(__version__):
        raise ArtifactError(
            f"{out_dir} was written by effx {made_by}, newer than this effx {__version__}: upgrade effx"
        )
    plan, files = manifest.get("plan"), manifest.get("files")
    if not isinstance(plan, dict) or not isinstance(files, dict):
        raise ArtifactError(f"{plan_path} lacks 'plan' or 'files'")
    stages = plan.get("stages", [])
    kinds = [s.get("kind") for s in stages]
    unknown = sorted({k for k in kinds if k not in ("embed", "layer", "head")})
    if unknown:
        raise ArtifactError(f"{out_dir} has stages of kinds {unknown}, which this runtime does not run yet")
    for s in stages:
        entry = files.get(s["name"])
        if entry is None:
            raise ArtifactError(f"the plan references stage {s['name']!r}, which has no file in {plan_path}")
        for key, digest in (("onnx", "sha256"), ("data", "data_sha256")):
            if key not in entry:
                continue
            path = out_dir / entry[key]
            if not path.is_file():
                raise ArtifactError(f"{path} is missing (stage {s['name']})")
            if _sha256(path) != entry[digest]:
                raise ArtifactError(
                    f"{path} does not match its checksum in plan.json: the artifact is corrupt"
                )
    return OnnxGenerator(out_dir, plan, files, providers=providers)


def _default_providers():
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxGenerator:
    """The stages of an artifact as onnxruntime sessions, and a decode loop over them."""

    def __init__(self, out_dir: Path, plan: dict, files: dict, *, providers=None):
        import onnxruntime as ort

        self.plan = plan
        self.info = plan["model"]
        providers = providers or _default_providers()
        opts = ort.SessionOptions()
        self.sessions = {}
        for s in plan["stages"]:
            self.sessions[s["name"]] = ort.InferenceSession(
                str(out_dir / files[s["name"]]["onnx"]), sess_options=opts, providers=providers
            )
        self.layers = [s for s in plan["stages"] if s["kind"] == "layer"]
        self.windows = {s["name"]: s.get("attrs", {}).get("sliding_window") for s in self.layers}
        self.dtype = np.dtype(self.info["dtype"])

    def _run(self, name: str, *args):
        sess = self.sessions[name]
        feeds = {i.name: np.ascontiguousarray(a) for i, a in zip(sess.get_inputs(), args, strict=True)}
        return sess.run(None, feeds)

    def _mask(self, key_valid: np.ndarray, q_start: int, q_len: int, window) -> np.ndarray:
        keys = key_valid.shape[1]
        q = np.arange(q_start, q_start + q_len)[:, None]
        k = np.arange(keys)[None, :]
        allowed = k <= q
        if window is not None:
            allowed &= k > q - window
        allowed = allowed[None, None] & key_valid[:, None, None, :]
        return np.where(allowed, 0.0, np.finfo(self.dtype).min).astype(self.dtype)

    def _step(self, cache, length: int, ids, positions, key_valid):
        hidden, cos, sin = self._run("embed", ids, positions)
        masks = {}
        q_len = ids.shape[1]
        for stage in self.layers:
            w = self.windows[stage["name"]]
            if w not in masks:
                masks[w] = self._mask(key_valid, length, q_len, w)
            i = stage["layer"]
            k_past, v_past = cache[i][0][:, :, :length], cache[i][1][:, :, :length]
            hidden, k, v = self._run(stage["name"], hidden, cos, sin, masks[w], k_past, v_past)
            cache[i][0][:, :, length : length + q_len] = k
            cache[i][1][:, :, length : length + q_len] = v
        return self._run("head", hidden[:, -1:])[0][:, -1]

    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        max_new_tokens: int = 32,
        eos_token_id=None,
        pad_token_id=None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> np.ndarray:
        """``[batch, prompt + new]`` token ids, as the torch backend's ``Program.generate``."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise GenerationInputError(
                f"input_ids must be a non-empty [batch, prompt] array, got shape {ids.shape}"
            )
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if mask.shape != ids.shape:
            raise GenerationInputError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
        m = mask.astype(bool)
        if not m[:, -1].all() or (m[:, 1:].astype(int) < m[:, :-1].astype(int)).any():
            raise GenerationInputError(
                "attention_mask must be left-padded (zeros, then ones, ending in a real token)"
            )
        batch, prompt = ids.shape
        total = prompt + max_new_tokens
        if total > self.info["max_positions"]:
            raise GenerationInputError(
                f"prompt + max_new_tokens = {total} exceeds {self.info['max_positions']} positions"
            )
        eos = (
            list(self.plan.get("eos_token_ids", ()))
            if eos_token_id is None
            else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        )
        pad = pad_token_id if pad_token_id is not None else self.plan.get("pad_token_id")
        if pad is None:
            pad = eos[0] if eos else 0
        rng = np.random.default_rng(seed)
        shape = (batch, self.info["num_kv_heads"], total, self.info["head_dim"])
        cache = {s["layer"]: (np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)) for s in self.layers}
        key_valid = np.ones((batch, total), dtype=bool)
        key_valid[:, :prompt] = m
        positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int64)
        out = np.full((batch, total), pad, dtype=np.int64)
        out[:, :prompt] = ids
        finished = np.zeros(batch, dtype=bool)
        logits = self._step(cache, 0, ids, positions, key_valid[:, :prompt])
        next_pos = positions[:, -1:] + 1
        length = prompt
        for t in range(max_new_tokens):
            token = self._choose(logits, do_sample, temperature, top_k, rng)
            token = np.where(finished, pad, token)
            out[:, prompt + t] = token
            if eos:
                finished |= np.isin(token, eos)
            if t == max_new_tokens - 1 or finished.all():
                return out[:, : prompt + t + 1]
            logits = self._step(cache, length, token[:, None], next_pos, key_valid[:, : length + 1])
            length += 1
            next_pos = next_pos + 1
        return out

    @staticmethod
    def _choose(logits, do_sample, temperature, top_k, rng) -> np.ndarray:
        logits = logits.astype(np.float64)
        if not do_sample:
            return logits.argmax(-1)
        logits = logits / max(temperature, 1e-6)
        if top_k:
            kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
            logits = np.where(logits < kth, -np.inf, logits)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(p.shape[-1], p=row) for row in p])
