"""Run an effx ONNX artifact with numpy and onnxruntime only (no torch).

    from effx.runtime import onnx as effx_onnx
    gen = effx_onnx.load("out/smollm2")            # checks plan.json, checksums, schema
    out = gen.generate(input_ids, attention_mask, max_new_tokens=64)   # numpy int64 arrays

``generate`` has the torch backend's semantics: left-padded batches, greedy decoding (or sampling with
``do_sample=True``, ``temperature``, ``top_k``, ``seed``), stop at ``eos_token_id`` (the plan's by default;
``[]`` never stops), finished rows padded with ``pad_token_id``. It runs the plan's dynamic control flow as
the torch runtime does (``effx.runtime.generate``), step for step: early exits with deferred KV (lossy) or
self-speculative drafting and verification, pruned exit vocabularies chosen per token, a reduced head's
fallback to the full head, TokenDrop's per-prompt token selection with per-layer cache slots; a cascade artifact
(``cascade.json``) loads as an :class:`OnnxCascade` with ``effx.Cascade``'s gated and verified modes. Neuron-masked
layers need nothing here: their slicing is in the stage files. Where the artifact has a layer segment (a
program with no exits or token drop between its layers), the layers run as that one session, and plain
decoding keeps the segment's KV cache where the session runs (on the GPU under CUDA) instead of host arrays.

Execution providers: CPU by default; CUDA first when onnxruntime-gpu is installed and sees a GPU, with
full float32 matrix products (``providers=`` overrides). ``benchmarks/onnx_providers.py`` checks every
pass's tokens and decisions on each provider (all equal on an H200 with onnxruntime-gpu 1.31).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, GenerationInputError

__all__ = ["OnnxCascade", "OnnxGenerator", "default_providers", "load"]

FORMAT = "effx-onnx"
# 2: one shared weight store and the stages of passes (1, a weights file per stage, is no longer read)
SCHEMA_VERSION = 2
WEIGHTS = "weights.bin"
SEGMENT_FILE = "layers.onnx"
CASCADE_FILE = "cascade.json"
CASCADE_FORMAT = "effx-onnx-cascade"
CASCADE_SCHEMA_VERSION = 1
# the stage kinds this runtime runs (effx.program.STAGE_SIGNATURES, without importing torch)
KINDS = ("embed", "layer", "exit", "head", "full_head", "token_score", "token_drop")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version_tuple(v: str) -> tuple:
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())


def load(out_dir: str | os.PathLike, *, providers=None) -> OnnxGenerator | OnnxCascade:
    """Open an artifact written by ``effx.exporters.onnx.export``: an :class:`OnnxGenerator` for a Program,
    an :class:`OnnxCascade` for a cascade (``cascade.json``). Every problem is an ``ArtifactError``."""
    out_dir = Path(out_dir)
    if (out_dir / CASCADE_FILE).is_file():
        return _load_cascade(out_dir, providers)
    return _load_program(out_dir, providers)


def _read_manifest(path: Path, fmt: str, schema: int) -> dict:
    """``path`` as JSON, checked for format, schema version and the effx version that wrote it."""
    from .. import __version__

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


def _load_program(out_dir: Path, providers) -> OnnxGenerator:
    plan_path = out_dir / "plan.json"
    if not plan_path.is_file():
        raise ArtifactError(f"{out_dir} has no plan.json: not an effx ONNX artifact")
    manifest = _read_manifest(plan_path, FORMAT, SCHEMA_VERSION)
    plan, files = manifest.get("plan"), manifest.get("files")
    if not isinstance(plan, dict) or not isinstance(files, dict):
        raise ArtifactError(f"{plan_path} lacks 'plan' or 'files'")
    stages = plan.get("stages", [])
    kinds = [s.get("kind") for s in stages]
    unknown = sorted({k for k in kinds if k not in KINDS})
    if unknown:
        raise ArtifactError(f"{out_dir} has stages of kinds {unknown}, which this runtime does not run yet")
    policy = plan.get("policy", {})
    if policy.get("early_exit", {}).get("kv") == "copy":
        raise ArtifactError(f"{out_dir}: early exit with kv='copy' is not supported by the ONNX runtime")
    if policy.get("neuron_mask", {}).get("mode") == "core":
        raise ArtifactError(f"{out_dir}: neuron-mask mode='core' is not supported by the ONNX runtime")
    data = manifest.get("data", {})
    if not isinstance(data, dict):
        raise ArtifactError(f"{plan_path}: 'data' must map weight files to checksums")
    checks = [(name, digest, "weight store") for name, digest in data.items()]
    for s in stages:
        entry = files.get(s["name"])
        if entry is None:
            raise ArtifactError(f"the plan references stage {s['name']!r}, which has no file in {plan_path}")
        checks.append((entry.get("onnx"), entry.get("sha256"), f"stage {s['name']}"))
    segments = manifest.get("segments", [])
    layer_names = [s["name"] for s in stages if s.get("kind") == "layer"]
    for seg in segments if isinstance(segments, list) else [None]:
        if not isinstance(seg, dict) or seg.get("stages") != layer_names:
            raise ArtifactError(
                f"{plan_path}: a segment must be a dict whose 'stages' are the plan's layers in order, got {seg!r}"
            )
        if not isinstance(seg.get("name"), str) or seg["name"] in files:
            raise ArtifactError(f"{plan_path}: segment name {seg.get('name')!r} is not a new name")
        checks.append((seg.get("onnx"), seg.get("sha256"), f"segment {seg.get('name')}"))
    for name, digest, what in checks:
        if not isinstance(name, str) or Path(name).name != name:
            raise ArtifactError(
                f"{plan_path} names file {name!r} ({what}): files must lie in the artifact itself"
            )
        path = out_dir / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing ({what})")
        if _sha256(path) != digest:
            raise ArtifactError(f"{path} does not match its checksum in plan.json: the artifact is corrupt")
    return OnnxGenerator(out_dir, plan, files, providers=providers, segments=segments)


_CUDA_LIBRARIES_LOADED = False


def _providers(providers):
    """``providers``, or the default (CUDA first when onnxruntime-gpu sees a GPU, then CPU); for CUDA, the
    CUDA and cuDNN libraries of the ``nvidia-*`` wheels are loaded first (``onnxruntime.preload_dlls``),
    which torch would otherwise have done, and this runtime never imports torch."""
    global _CUDA_LIBRARIES_LOADED
    import onnxruntime as ort

    providers = providers or default_providers()
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    if "CUDAExecutionProvider" in names and not _CUDA_LIBRARIES_LOADED and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
        _CUDA_LIBRARIES_LOADED = True
    return providers


_SHARED_ARENA = False


def _share_cpu_arena(ort, opts) -> None:
    """Have the sessions made with ``opts`` take CPU memory from one arena registered with ONNX Runtime's
    environment, instead of one arena each: stages run one after another, so one arena serves them all,
    and a 1024-token prefill through 30 layer sessions took 6.3 s until each layer's arena had grown and
    2.1 s with one shared arena (1.7 s either way later). Sessions that do not opt in, a user's own, are
    not affected."""
    global _SHARED_ARENA
    if not hasattr(ort, "create_and_register_allocator"):
        return
    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
        _SHARED_ARENA = True
    opts.add_session_config_entry("session.use_env_allocators", "1")


def default_providers() -> list:
    """The execution providers ``load`` uses unless told otherwise: CUDA (full float32 products) first when
    onnxruntime-gpu sees a GPU, then CPU."""
    import onnxruntime as ort

    providers: list = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        # full float32 matrix products, as torch computes them by default: ONNX Runtime's CUDA provider
        # uses TF32 unless told not to, which changes logits enough to change greedy tokens
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0"}))
    return providers


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries along the last axis, largest first."""
    k = min(k, x.shape[-1])
    part = np.argpartition(-x, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(x, part, -1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, -1)


class _Cache:
    """numpy twin of ``effx.runtime.forward.KVCache``: per-layer slots, fill lengths and dropped slots."""

    def __init__(self, layers, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype):
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = {i: np.zeros(shape, dtype) for i in layers}
        self.v = {i: np.zeros(shape, dtype) for i in layers}
        self.capacity = capacity
        self.lengths = dict.fromkeys(layers, 0)
        self.dropped: dict[int, np.ndarray] = {}

    def past(self, layer: int):
        n = self.lengths[layer]
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def write(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        start = self.lengths[layer]
        end = start + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {self.capacity}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        self.lengths[layer] = end

    def write_slots(self, layer: int, k, v, slots: np.ndarray, counts: np.ndarray, length: int) -> None:
        """Prefill of a layer that saw only the tokens at ``slots [batch, n]``; see ``KVCache.write_slots``."""
        rows = np.arange(slots.shape[0])[:, None]
        keep = counts[:, None, :, None].astype(k.dtype)
        for store, new in ((self.k[layer], k), (self.v[layer], v)):
            store[:, :, :length] = 0
            np.moveaxis(store, 2, 1)[rows, slots] = np.moveaxis(new * keep, 2, 1)
        self.lengths[layer] = length

    def truncate(self, length: int) -> None:
        self.lengths = {i: min(n, length) for i, n in self.lengths.items()}


class _BoundCache:
    """The KV cache of a segment that returns each layer's past-and-new keys and values: kept as ONNX
    Runtime values where the session runs (on the GPU under CUDA) and bound as the next step's past, so
    no cache crosses between host and device. Only for plain decoding (no rollback, no dropped slots)."""

    def __init__(self, layers, batch: int, kv_heads: int, head_dim: int, dtype, device: str):
        self.empty = np.zeros((batch, kv_heads, 0, head_dim), dtype)
        self.k = dict.fromkeys(layers)
        self.v = dict.fromkeys(layers)
        self.lengths = dict.fromkeys(layers, 0)
        self.device = device


class _Masks:
    """Additive attention masks for one step, by query start, length, window and dropped slots (the numpy
    twin of ``effx.runtime.forward.MaskCache``)."""

    def __init__(self, key_valid: np.ndarray, dtype):
        self.key_valid = key_valid
        self.dtype = dtype
        self._masks: dict[tuple, np.ndarray] = {}

    def get(self, q_start: int, q_len: int, window, dropped: np.ndarray | None = None) -> np.ndarray:
        key = (q_start, q_len, window, None if dropped is None else id(dropped))
        if key not in self._masks:
            valid = self.key_valid
            if dropped is not None:
                valid = valid.copy()
                valid[:, : dropped.shape[1]] &= ~dropped
            keys = valid.shape[1]
            q = np.arange(q_start, q_start + q_len)[:, None]
            k = np.arange(keys)[None, :]
            allowed = k <= q
            if window is not None:
                allowed &= k > q - window
            allowed = allowed[None, None] & valid[:, None, None, :]
            self._masks[key] = np.where(allowed, 0.0, np.finfo(self.dtype).min).astype(self.dtype)
        return self._masks[key]


def select_tokens(scores, valid, protected, quota):
    """numpy twin of ``effx.runtime.token_drop.select_tokens``: kept indices ``[batch, n]`` (ascending) and
    whether each counts."""
    s = np.where(valid, scores.astype(np.float32), -np.inf)
    s = np.where(protected & valid, np.inf, s)
    quota = np.maximum(quota, (protected & valid).sum(1))
    n = int(quota.max())
    # a stable descending sort: equal scores go to the earlier token, as in the torch runtime
    indices = np.argsort(-s, axis=-1, kind="stable")[:, :n]
    values = np.take_along_axis(s, indices, 1)
    keep_valid = (np.arange(n)[None, :] < quota[:, None]) & (values > -np.inf)
    perm = np.argsort(indices, axis=-1, kind="stable")
    return np.take_along_axis(indices, perm, 1), np.take_along_axis(keep_valid, perm, 1)


def _restrict(mask: np.ndarray, slots: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The prompt mask for the tokens at ``slots`` only (see ``effx.runtime.token_drop._restrict``)."""
    rows = np.take_along_axis(mask, slots[:, None, :, None], 2)
    out = np.take_along_axis(rows, slots[:, None, None, :], 3)
    hidden = ~valid[:, None, None, :] | ~valid[:, None, :, None]
    return np.where(hidden, np.finfo(mask.dtype).min, out).astype(mask.dtype)


def _check_inputs(input_ids, attention_mask, max_new_tokens: int, max_positions: int):
    """``(ids, mask)`` as int64 arrays, or a ``GenerationInputError`` saying what is wrong with them."""
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
    if max_new_tokens < 1:
        raise GenerationInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total = ids.shape[1] + max_new_tokens
    if total > max_positions:
        raise GenerationInputError(f"prompt + max_new_tokens = {total} exceeds {max_positions} positions")
    return ids, mask


class _Output:
    """The output buffer: emitted tokens, stop tokens, finished rows (see ``effx.runtime.generate``)."""

    def __init__(self, ids: np.ndarray, max_new: int, eos: list[int], pad: int):
        batch, prompt = ids.shape
        self.tokens = np.full((batch, prompt + max_new), pad, dtype=np.int64)
        self.tokens[:, :prompt] = ids
        self.length = prompt
        self.end = prompt + max_new
        self.finished = np.zeros(batch, dtype=bool)
        self.eos, self.pad = eos, pad

    @property
    def done(self) -> bool:
        return self.length >= self.end or bool(self.finished.all())

    @property
    def remaining(self) -> int:
        return self.end - self.length

    def emit(self, token: np.ndarray) -> np.ndarray:
        token = np.where(self.finished, self.pad, token)
        self.tokens[:, self.length] = token
        self.length += 1
        if self.eos:
            self.finished |= np.isin(token, self.eos)
        return token


class OnnxGenerator:
    """The stages of an artifact as onnxruntime sessions, and the decode loop of the plan over them."""

    def __init__(self, out_dir: Path, plan: dict, files: dict, *, providers=None, segments=()):
        import onnxruntime as ort

        self.plan = plan
        self.info = plan["model"]
        self.policy = plan.get("policy", {})
        stages = plan["stages"]
        self.layers = [s for s in stages if s["kind"] == "layer"]
        self.exits = {s["layer"]: s for s in stages if s["kind"] == "exit"}
        self.head = stages[-1]
        self.full_head = next((s for s in stages if s["kind"] == "full_head"), None)
        self.drops = {
            s["layer"]: (s, n)
            for s, n in zip(stages[:-1], stages[1:], strict=True)
            if s["kind"] == "token_score"
        }
        self.windows = {s["name"]: s.get("attrs", {}).get("sliding_window") for s in self.layers}
        self.dtype = np.dtype(self.info["dtype"])
        # a program whose steps always run every layer back to back runs them as the artifact's segment,
        # one session, instead of a session per layer (which then are not opened)
        self._segment = None
        if segments and not self.exits and not self.drops and len(set(self.windows.values())) == 1:
            self._segment = segments[0]
        skip = set(self._segment["stages"]) if self._segment else set()
        paths = {s["name"]: files[s["name"]]["onnx"] for s in stages if s["name"] not in skip}
        if self._segment:
            paths[self._segment["name"]] = self._segment["onnx"]

        providers = _providers(providers)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: its notes on nodes it cannot constant-fold are noise
        # one session per stage (or segment), each with its own thread pool: its threads spin between the ops of a run (no
        # wake-up per op) and stop spinning when the run ends, else idle stages' threads take the cores
        # from the next stage (on 2 cores: spinning throughout was 2x slower, no spinning at all 15% slower).
        # ONNX Runtime's global thread pool would avoid both but forces every session in the process, the
        # user's own included, to use it.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        _share_cpu_arena(ort, opts)
        self.sessions = {
            name: ort.InferenceSession(str(out_dir / path), sess_options=opts, providers=providers)
            for name, path in paths.items()
        }
        # where the segment returns each layer's past-and-new cache, plain decoding keeps the cache in the
        # segment session's memory (the GPU's under CUDA) instead of host arrays
        self.bind_cache = True  # False: host arrays even where the segment could keep the cache
        self._bound_device = None
        if self._segment is not None:
            seg = self.sessions[self._segment["name"]]
            if any(o.name.startswith("present_") for o in seg.get_outputs()):
                self._bound_device = "cuda" if seg.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        # each session's input and output names once, and its own run: the Python wrapper's checks on every
        # call were 2% of a SmolLM2 decode step (ONNX Runtime copies non-contiguous arrays, such as a
        # cache's past, itself)
        self._calls = {
            name: (
                [i.name for i in sess.get_inputs()],
                [o.name for o in sess.get_outputs()],
                getattr(sess, "_sess", sess).run,
            )
            for name, sess in self.sessions.items()
        }

    def _run(self, name: str, *args):
        inputs, outputs, run = self._calls[name]
        return run(outputs, dict(zip(inputs, args, strict=True)), None)

    # -- the pieces of a step (twins of effx.runtime.forward / vocab) ------------------------------------
    def _run_layers(self, cache: _Cache, layers, hidden, cos, sin, masks: _Masks):
        if self._segment is not None and layers is self.layers:
            return self._run_segment(cache, hidden, cos, sin, masks)
        q_len = hidden.shape[1]
        for stage in layers:
            i = stage["layer"]
            mask = masks.get(cache.lengths[i], q_len, self.windows[stage["name"]], cache.dropped.get(i))
            hidden, k, v = self._run(stage["name"], hidden, cos, sin, mask, *cache.past(i))
            cache.write(i, k, v)
        return hidden

    def _run_segment(self, cache: _Cache, hidden, cos, sin, masks: _Masks):
        """Every layer in one run of the segment (see ``effx.exporters.onnx._fuse_layers``)."""
        ids = [s["layer"] for s in self.layers]
        window = self.windows[self.layers[0]["name"]]
        mask = masks.get(cache.lengths[ids[0]], hidden.shape[1], window)
        if isinstance(cache, _BoundCache):
            return self._run_bound(cache, ids, hidden, cos, sin, mask)
        out = self._run(
            self._segment["name"], hidden, cos, sin, mask, *(x for i in ids for x in cache.past(i))
        )
        for j, i in enumerate(ids):
            cache.write(i, out[1 + 2 * j], out[2 + 2 * j])
        return out[0]

    def _run_bound(self, cache: _BoundCache, ids, hidden, cos, sin, mask):
        sess = self.sessions[self._segment["name"]]
        binding = sess.io_binding()
        for name, value in (("hidden", hidden), ("cos", cos), ("sin", sin), ("mask", mask)):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for i in ids:
            for kv, store in (("k", cache.k), ("v", cache.v)):
                if store[i] is None:
                    binding.bind_cpu_input(f"past_{kv}.{i}", cache.empty)
                else:
                    binding.bind_ortvalue_input(f"past_{kv}.{i}", store[i])
        binding.bind_output("last_hidden", "cpu")
        for i in ids:
            binding.bind_output(f"present_k.{i}", cache.device)
            binding.bind_output(f"present_v.{i}", cache.device)
        sess.run_with_iobinding(binding)
        out = binding.get_outputs()
        for j, i in enumerate(ids):
            cache.k[i], cache.v[i] = out[1 + 2 * j], out[2 + 2 * j]
            cache.lengths[i] += hidden.shape[1]
        return out[0].numpy()

    def _head_logits(self, hidden: np.ndarray, stats) -> np.ndarray:
        logits = self._run(self.head["name"], hidden)[0]
        threshold = self.head.get("attrs", {}).get("fallback")
        if not threshold or self.full_head is None:
            return logits
        need = _softmax(logits).max(-1) < threshold
        if stats is not None:
            stats["head_positions"] = stats.get("head_positions", 0) + need.size
            stats["head_fallbacks"] = stats.get("head_fallbacks", 0) + int(need.sum())
        if need.any():
            logits = logits.copy()
            logits[need] = self._run(self.full_head["name"], hidden[need][:, None])[0][:, 0]
        return logits

    def _step(self, cache: _Cache, ids, positions, key_valid, stats, *, last_only: bool = True) -> np.ndarray:
        """Embed, every layer on ``cache`` and the head: logits of the last position ``[batch, vocab]``, or
        of every position ``[batch, seq, vocab]``."""
        hidden, cos, sin = self._run("embed", ids, positions)
        hidden = self._run_layers(cache, self.layers, hidden, cos, sin, _Masks(key_valid, self.dtype))
        if last_only:
            return self._head_logits(hidden[:, -1:], stats)[:, -1]
        return self._head_logits(hidden, stats)

    def _prefill(self, cache: _Cache, ids, positions, key_valid, stats) -> np.ndarray:
        """The prompt's step: TokenDrop's prefill if the plan drops tokens, else a plain step."""
        if self.drops:
            return self._drop_prefill(cache, ids, positions, key_valid, stats)
        return self._step(cache, ids, positions, key_valid, stats)

    def _new_cache(self, batch: int, capacity: int) -> _Cache:
        layers = [s["layer"] for s in self.layers]
        info = self.info
        return _Cache(layers, batch, info["num_kv_heads"], capacity, info["head_dim"], self.dtype)

    def _stop_and_pad(self, eos_token_id, pad_token_id) -> tuple[list[int], int]:
        eos = (
            list(self.plan.get("eos_token_ids", ()))
            if eos_token_id is None
            else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        )
        pad = pad_token_id if pad_token_id is not None else self.plan.get("pad_token_id")
        if pad is None:
            pad = eos[0] if eos else 0
        return eos, int(pad)

    @staticmethod
    def _select_vocab(logits: np.ndarray, attrs: dict, ids: np.ndarray | None) -> np.ndarray:
        """The ids a pruned exit scores (``effx.runtime.vocab.select_vocab``, decoding rows only)."""
        k = attrs["vocab_k"]
        if ids is not None and ids.shape[-1] <= k:
            return ids
        mass = attrs.get("vocab_mass")
        if mass is None:
            return _top(logits.astype(np.float32), k)
        probs = _softmax(logits)
        top = _top(probs, k)
        need = (np.cumsum(np.take_along_axis(probs, top, -1), -1) < mass).sum(-1) + 1
        n = int(np.clip(need, attrs["vocab_min_k"], k).max())
        return top[..., :n]

    def _exit(self, stage: dict, hidden, prev, ids):
        if stage.get("attrs", {}).get("vocab") == "pruned":
            return self._run(stage["name"], hidden, prev, ids)
        return self._run(stage["name"], hidden, prev)

    # -- TokenDrop prefill (twin of effx.runtime.token_drop.drop_prefill) --------------------------------
    def _drop_prefill(self, cache: _Cache, ids, positions, key_valid, stats) -> np.ndarray:
        policy = self.policy["token_drop"]
        batch, n = ids.shape
        hidden, cos, sin = self._run("embed", ids, positions)
        prompt_masks = _Masks(key_valid, self.dtype)
        slots = np.broadcast_to(np.arange(n), (batch, n)).copy()
        valid = key_valid.copy()
        real = key_valid.sum(1)
        special = np.isin(ids, policy["special"])
        protect = policy["protect_last"]
        dropped = None
        kept_counts = {}
        for stage in self.layers:
            i = stage["layer"]
            full = prompt_masks.get(0, n, self.windows[stage["name"]])
            mask = full if slots.shape[1] == n else _restrict(full, slots, valid)
            if i in self.drops:
                score_stage, drop_stage = self.drops[i]
                scores = self._run(score_stage["name"], hidden, cos, sin, mask, *cache.past(i))[0]
                keep = score_stage["attrs"]["keep"]
                quota = np.maximum(np.ceil(real.astype(np.float64) * keep - 1e-9), 1).astype(np.int64)
                protected = np.take_along_axis(special, slots, 1) | (slots >= n - protect)
                idx, valid = select_tokens(scores, valid, protected, quota)
                hidden, cos, sin = self._run(drop_stage["name"], hidden, cos, sin, idx)
                slots = np.take_along_axis(slots, idx, 1)
                dropped = np.ones((batch, n), dtype=bool)
                np.put_along_axis(dropped, slots, ~valid, 1)  # kept passengers stay dropped
                dropped[~key_valid] = False
                kept_counts[i] = valid.sum(1).tolist()
                mask = _restrict(full, slots, valid)
            hidden, k, v = self._run(stage["name"], hidden, cos, sin, mask, *cache.past(i))
            if dropped is None:
                cache.write(i, k, v)
            else:
                cache.write_slots(i, k, v, slots, valid, n)
                cache.dropped[i] = dropped
        if stats is not None:
            stats["kept_tokens"] = kept_counts
        return self._head_logits(hidden[:, -1:], stats)[:, -1]

    # -- early exit (twins of effx.runtime.early_exit) ---------------------------------------------------
    def _exit_step(self, cache: _Cache, pending: dict, token, position, masks: _Masks, stats):
        """One lossy early-exit step with deferred KV; see ``ExitDecoder.step``."""
        slot = cache.lengths[0]
        hidden, cos, sin = self._run("embed", token, position)
        prev = hidden
        start = slot
        batch = token.shape[0]
        decided = np.zeros(batch, dtype=bool)
        depth = np.full(batch, self.info["num_layers"], dtype=np.int64)
        chosen = None
        ids = prev_logits = None
        for stage in self.layers:
            i = stage["layer"]
            first = cache.lengths[i]
            if first < start:  # tokens that stopped at this depth join the step here
                parts = [pending.pop(s) for s in range(first, start)]
                if any(d != i for d, *_ in parts):
                    raise RuntimeError(f"KV bookkeeping broken: pending slots of layer {i} at other depths")
                hidden = np.concatenate([p[1] for p in parts] + [hidden], 1)
                cos = np.concatenate([p[2] for p in parts] + [cos], 1)
                sin = np.concatenate([p[3] for p in parts] + [sin], 1)
                start = first
            hidden = self._run_layers(cache, (stage,), hidden, cos, sin, masks)
            ex = self.exits.get(i)
            if ex is None:
                continue
            last = hidden[:, -1:]
            pruned = ex["attrs"].get("vocab") == "pruned"
            ids = self._select_vocab(prev_logits, ex["attrs"], ids) if pruned else None
            logits, conf = self._exit(ex, last, prev, ids)
            prev, prev_logits = last, logits[:, -1]
            fire = (conf[:, -1] >= ex["attrs"]["threshold"]) & ~decided
            if fire.any():
                if chosen is None:
                    chosen = np.empty((batch, logits.shape[-1]), dtype=logits.dtype)
                chosen[fire] = logits[fire, -1]
                depth[fire] = i + 1
                decided |= fire
            if decided.all():
                for j in range(hidden.shape[1]):
                    pending[start + j] = (i + 1, hidden[:, j : j + 1], cos[:, j : j + 1], sin[:, j : j + 1])
                return chosen, depth
        logits = self._head_logits(hidden[:, -1:], stats)[:, -1]
        if chosen is None:
            return logits, depth
        chosen[~decided] = logits[~decided]
        return chosen, depth

    def _speculative_round(self, cache: _Cache, out: _Output, token, position, key_valid, draft, stats):
        """Draft with the shallowest exit, verify with the rest; see ``speculative_round``."""
        exit_layer = min(self.exits)
        ex = self.exits[exit_layer]
        shallow = [s for s in self.layers if s["layer"] <= exit_layer]
        deep = [s for s in self.layers if s["layer"] > exit_layer]
        base = cache.lengths[0]
        n = min(draft, out.remaining)
        drafts, hiddens, coss, sins = [], [], [], []
        tok, pos = token, position
        for j in range(n):
            masks = _Masks(key_valid[:, : base + j + 1], self.dtype)
            hidden, cos, sin = self._run("embed", tok[:, None], pos)
            prev = hidden
            hidden = self._run_layers(cache, shallow, hidden, cos, sin, masks)
            logits, conf = self._exit(ex, hidden, prev, None)
            tok = logits[:, -1].astype(np.float32).argmax(-1)
            drafts.append(tok)
            hiddens.append(hidden)
            coss.append(cos)
            sins.append(sin)
            pos = pos + 1
            if (conf[:, -1] < ex["attrs"]["threshold"]).any():
                break
        m = len(drafts)
        masks = _Masks(key_valid[:, : base + m], self.dtype)
        cat = np.concatenate
        hidden = self._run_layers(cache, deep, cat(hiddens, 1), cat(coss, 1), cat(sins, 1), masks)
        verified = self._head_logits(hidden, stats).astype(np.float32).argmax(-1)
        proposed = np.stack(drafts, 1)
        k = int(np.cumprod(proposed == verified, 1).sum(1).min())
        for j in range(k):
            out.emit(proposed[:, j])
            if out.done:
                break
        if k < m and not out.done:
            out.emit(verified[:, k])
        kept = min(k + 1, m)
        cache.truncate(base + kept)
        if stats is not None:
            stats["drafted"] += m
            stats["accepted"] += k
            stats["rounds"] += 1
        return position + kept

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
        stats: dict | None = None,
    ) -> np.ndarray:
        """``[batch, prompt + new]`` token ids, as the torch backend's ``Program.generate``. Pass a dict as
        ``stats`` to get what the runtime decided (the torch backend's keys: ``exit_layers``, ``drafted`` /
        ``accepted``, ``head_positions`` / ``head_fallbacks``, ``kept_tokens``)."""
        ids, mask = _check_inputs(input_ids, attention_mask, max_new_tokens, self.info["max_positions"])
        m = mask.astype(bool)
        batch, prompt = ids.shape
        total = prompt + max_new_tokens
        policy = self.policy.get("early_exit") if self.exits else None
        mode = policy["mode"] if policy else "dense"
        if mode == "self-speculative" and do_sample:
            raise GenerationInputError(
                "self-speculative early exit reproduces greedy decoding; call it with do_sample=False"
            )
        draft = int(policy["draft"]) if mode == "self-speculative" else 0
        eos, pad = self._stop_and_pad(eos_token_id, pad_token_id)
        rng = np.random.default_rng(seed)
        if mode == "dense" and self._bound_device is not None and self.bind_cache:
            info = self.info
            layers = [s["layer"] for s in self.layers]
            shape = (batch, info["num_kv_heads"], info["head_dim"])
            cache = _BoundCache(layers, *shape, self.dtype, self._bound_device)
        else:
            cache = self._new_cache(batch, total + draft)
        key_valid = np.ones((batch, total + draft), dtype=bool)
        key_valid[:, :prompt] = m
        positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int64)
        out = _Output(ids, max_new_tokens, eos, pad)
        if stats is not None and self.full_head is not None:
            stats.update(head_positions=0, head_fallbacks=0)
        logits = self._prefill(cache, ids, positions, key_valid[:, :prompt], stats)
        next_pos = positions[:, -1:] + 1
        token = out.emit(self._choose(logits, do_sample, temperature, top_k, rng))
        if mode == "self-speculative":
            if stats is not None:
                stats.update(drafted=0, accepted=0, rounds=0)
            while not out.done:
                next_pos = self._speculative_round(cache, out, token, next_pos, key_valid, draft, stats)
                token = out.tokens[:, out.length - 1]
            return out.tokens[:, : out.length]
        pending: dict = {}
        if stats is not None and mode == "lossy":
            stats["exit_layers"] = []
        while not out.done:
            valid = key_valid[:, : out.length]
            if mode == "lossy":
                masks = _Masks(valid, self.dtype)
                logits, depth = self._exit_step(cache, pending, token[:, None], next_pos, masks, stats)
                if stats is not None:
                    stats["exit_layers"].append(depth.tolist())
            else:
                logits = self._step(cache, token[:, None], next_pos, valid, stats)
            next_pos = next_pos + 1
            token = out.emit(self._choose(logits, do_sample, temperature, top_k, rng))
        return out.tokens[:, : out.length]

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


# -- cascades (twin of effx.runtime.cascade) ----------------------------------------------------------------


def _load_cascade(out_dir: Path, providers) -> OnnxCascade:
    manifest = _read_manifest(out_dir / CASCADE_FILE, CASCADE_FORMAT, CASCADE_SCHEMA_VERSION)
    parts = manifest.get("parts", {})
    gens = {}
    for role in ("small", "large"):
        name = parts.get(role, {}).get("dir")
        if not isinstance(name, str) or Path(name).name != name:
            raise ArtifactError(f"{out_dir / CASCADE_FILE} names no valid directory for the {role} model")
        plan = out_dir / name / "plan.json"
        if not plan.is_file():
            raise ArtifactError(f"{plan} is missing (the cascade's {role} model)")
        if _sha256(plan) != parts[role].get("plan_sha256"):
            raise ArtifactError(
                f"{plan} does not match its checksum in {CASCADE_FILE}: the artifact is corrupt"
            )
        gens[role] = _load_program(out_dir / name, providers)
    gate = manifest.get("gate")
    if gate is not None and (
        gate.get("kind") not in GATES or not isinstance(gate.get("threshold"), (int, float))
    ):
        raise ArtifactError(f"{out_dir / CASCADE_FILE} has a gate this runtime does not know: {gate!r}")
    if manifest.get("mode") not in ("gated", "verified"):
        raise ArtifactError(f"{out_dir / CASCADE_FILE} has an unknown cascade mode {manifest.get('mode')!r}")
    return OnnxCascade(gens["small"], gens["large"], manifest)


def _entropy(logits: np.ndarray) -> np.ndarray:
    p = _softmax(logits)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(-1)


# gate kind -> (measure of the small model's logits, fires when the measure is >= threshold)
GATES = {"entropy": (_entropy, True), "max-prob": (lambda x: _softmax(x).max(-1), False)}


class _Side:
    """One model's side of a cascade: its cache, the slots it has seen, the logits that predict the next
    (see ``effx.runtime.cascade.ModelState``)."""

    def __init__(self, gen: OnnxGenerator, positions: np.ndarray, key_valid: np.ndarray):
        self.gen, self.positions, self.key_valid = gen, positions, key_valid
        self.cache = gen._new_cache(key_valid.shape[0], key_valid.shape[1])
        self.seen = 0
        self.logits = None

    def prefill(self, ids: np.ndarray) -> None:
        n = ids.shape[1]
        self.logits = self.gen._prefill(self.cache, ids, self.positions[:, :n], self.key_valid[:, :n], None)
        self.seen = n

    def feed(self, tokens: np.ndarray, *, every: bool = False) -> np.ndarray:
        start, end = self.seen, self.seen + tokens.shape[1]
        logits = self.gen._step(
            self.cache,
            tokens,
            self.positions[:, start:end],
            self.key_valid[:, :end],
            None,
            last_only=not every,
        )
        self.seen = end
        self.logits = logits[:, -1] if every else logits
        return logits

    def logits_for(self, tokens: np.ndarray, slot: int) -> np.ndarray:
        if self.seen > slot:
            raise RuntimeError(
                f"cascade bookkeeping broken: model has seen {self.seen} slots, asked for {slot}"
            )
        if self.seen < slot:
            self.feed(tokens[:, self.seen : slot])
        return self.logits

    def truncate(self, length: int) -> None:
        if length < self.seen:
            self.cache.truncate(length)
            self.seen = length
            self.logits = None


class OnnxCascade:
    """A cascade artifact: the small and the large model's generators and the cascade's settings; decodes
    as ``effx.Cascade.generate`` (greedy; gated or verified mode)."""

    def __init__(self, small: OnnxGenerator, large: OnnxGenerator, manifest: dict):
        if small.info["vocab_size"] != large.info["vocab_size"]:
            raise ArtifactError("the cascade's models have different vocabularies")
        self.small, self.large = small, large
        self.mode = manifest["mode"]
        self.draft = int(manifest.get("draft", 4))
        self.adaptive = bool(manifest.get("adaptive", True))
        gate = manifest.get("gate")
        self.gate = None if gate is None else (*GATES[gate["kind"]], float(gate["threshold"]))
        self.plan = large.plan  # stop and pad tokens come from the large model, as in the torch backend

    def _fires(self, logits: np.ndarray) -> np.ndarray:
        measure, high, threshold = self.gate
        m = measure(logits)
        return m >= threshold if high else m <= threshold

    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        max_new_tokens: int = 32,
        eos_token_id=None,
        pad_token_id=None,
        stats: dict | None = None,
    ) -> np.ndarray:
        """``[batch, prompt + new]`` token ids, as ``effx.Cascade.generate``; ``stats`` receives
        ``small_tokens`` / ``large_tokens`` (and ``drafted`` / ``accepted`` / ``rounds`` in verified mode,
        ``large_steps`` / ``catch_up_tokens`` in gated mode)."""
        limit = min(self.small.info["max_positions"], self.large.info["max_positions"])
        ids, mask = _check_inputs(input_ids, attention_mask, max_new_tokens, limit)
        eos, pad = self.large._stop_and_pad(eos_token_id, pad_token_id)
        batch, prompt = ids.shape
        key_valid = np.ones((batch, prompt + max_new_tokens), dtype=bool)
        key_valid[:, :prompt] = mask.astype(bool)
        positions = np.clip(np.cumsum(key_valid, axis=-1) - 1, 0, None).astype(np.int64)
        run = {} if stats is None else stats
        run.update(small_tokens=0, large_tokens=0)
        out = _Output(ids, max_new_tokens, eos, pad)
        small, large = _Side(self.small, positions, key_valid), _Side(self.large, positions, key_valid)
        small.prefill(ids)
        large.prefill(ids)
        if self.mode == "verified":
            run.update(drafted=0, accepted=0, rounds=0)
            out.emit(large.logits.astype(np.float32).argmax(-1))
            run["large_tokens"] += batch
            self._verified(small, large, out, run)
        else:
            run.update(large_steps=0, catch_up_tokens=0)
            self._gated(small, large, out, run)
        return out.tokens[:, : out.length]

    def _gated(self, small: _Side, large: _Side, out: _Output, run: dict) -> None:
        while not out.done:
            cur = out.length
            s_logits = small.logits_for(out.tokens, cur)
            token = s_logits.astype(np.float32).argmax(-1)
            active = ~out.finished
            fire = self._fires(s_logits) & active
            if fire.any():
                run["large_steps"] += 1
                run["catch_up_tokens"] += cur - large.seen
                l_token = large.logits_for(out.tokens, cur).astype(np.float32).argmax(-1)
                token = np.where(fire, l_token, token)
            run["large_tokens"] += int(fire.sum())
            run["small_tokens"] += int((active & ~fire).sum())
            out.emit(token)

    def _verified(self, small: _Side, large: _Side, out: _Output, run: dict) -> None:
        length = self.draft
        while not out.done:
            cur = out.length
            active = ~out.finished
            n = min(length, out.remaining)
            drafts = []
            logits = small.logits_for(out.tokens, cur)
            for j in range(n):
                if j:
                    logits = small.feed(drafts[-1][:, None])
                drafts.append(logits.astype(np.float32).argmax(-1))
                if self.gate is not None and (self._fires(logits) & active).any():
                    break
            m = len(drafts)
            proposed = np.stack(drafts, 1)
            verify = large.feed(np.concatenate([out.tokens[:, cur - 1 : cur], proposed], 1), every=True)
            verified = verify.astype(np.float32).argmax(-1)
            agree = np.cumprod(proposed == verified[:, :m], 1).sum(1)
            k = int(np.where(active, agree, m).min())
            for j in range(k):
                was = ~out.finished
                out.emit(proposed[:, j])
                run["small_tokens"] += int(was.sum())
                if out.done:
                    break
            if not out.done:
                was = ~out.finished
                out.emit(verified[:, k])
                run["large_tokens"] += int(was.sum())
            large.truncate(cur + k)
            small.truncate(cur + k)
            run["drafted"] += m
            run["accepted"] += k
            run["rounds"] += 1
            if self.adaptive:
                length = min(self.draft, length + 1) if k >= m else max(1, length - 1)
