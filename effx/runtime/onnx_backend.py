"""The ONNX Runtime backend: an artifact's stages as onnxruntime sessions, on numpy arrays (no torch).

* Sessions: their threads spin between the ops of a run and stop when the run ends
  (``session.force_spinning_stop``): spinning throughout let idle stages' threads take the cores from the
  running one (decode about 2x slower on 2 cores), no spinning at all woke threads for every op (15%
  slower). ONNX Runtime's global thread pool is not used: it forces every session in the process, the user's
  own included, onto it.
* Memory: effx's sessions take CPU memory from one arena registered with ONNX Runtime's environment
  (``session.use_env_allocators``, set on effx's sessions only).
* Segments (the manifest's ``segments``, checked by ``effx.runtime.onnx.load``): where one covers every
  layer and the program has no exits or token drop and one attention window, every layer runs as that one
  session; plain decoding (no slot ever rolled back) then keeps the segment's KV cache where the session
  runs (on the GPU under CUDA) and binds it as the next step's past. Otherwise each segment is a run of
  layers between decision points (a program with exits or token drop has one for each run of two or more
  layers between them): ``run_layers`` runs such a run as its one session whenever the loop asks for
  exactly it with one mask for all its layers, and layer by layer otherwise (those layers' own sessions
  are then opened on first use).
* Providers: CPU by default; CUDA first when onnxruntime-gpu sees a GPU, with full float32 products.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import array_api_compat.numpy as XP
import numpy as np

from .. import techniques
from ..artifact import fused_inputs, one_block
from ..errors import ArtifactError
from ..plan import Plan, StageLike
from .backend import Backend
from .forward import KVCache, MaskCache, layer_mask, run_layer_stages

__all__ = ["XP", "OnnxBackend", "default_providers"]

# ONNX Runtime ships no type information: its sessions, values and bindings are Any to the type checker
Session = Any
# what a session's run returns: its outputs, numpy arrays
Outputs = list[np.ndarray[Any, Any]]
# a manifest's segment: name, stages (layer names) and onnx (its file)
Segment = dict[str, Any]
# execution providers as onnxruntime takes them: names, or (name, options) pairs
Providers = Sequence[str | tuple[str, dict[str, Any]]]

_CUDA_LIBRARIES_LOADED = False
_FUSED = "fused:"  # the prefix of a fused graph's session name


def session_providers(providers: Providers | None) -> Providers:
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


def _share_cpu_arena(ort: Any, opts: Any) -> None:
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


def default_providers() -> list[str | tuple[str, dict[str, Any]]]:
    """The execution providers ``load`` uses unless told otherwise: CUDA (full float32 products) first when
    onnxruntime-gpu sees a GPU, then CPU."""
    import onnxruntime as ort

    providers: list[str | tuple[str, dict[str, Any]]] = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        # full float32 matrix products, as torch computes them by default: ONNX Runtime's CUDA provider
        # uses TF32 unless told not to, which changes logits enough to change greedy tokens
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0"}))
    return providers


class _BoundCache:
    """The KV cache of a segment that returns each layer's past-and-new keys and values: kept as ONNX
    Runtime values where the session runs (on the GPU under CUDA) and bound as the next step's past, so
    no cache crosses between host and device. Only for plain decoding (no rollback, no dropped slots)."""

    def __init__(
        self, num_layers: int, batch: int, kv_heads: int, head_dim: int, dtype: np.dtype[Any], device: str
    ) -> None:
        self.empty = np.zeros((batch, kv_heads, 0, head_dim), dtype)
        self.k: list[Any] = [None] * num_layers  # OrtValues once a step has run
        self.v: list[Any] = [None] * num_layers
        self.lengths = [0] * num_layers
        self.dropped: dict[int, Any] = {}
        self.device = device


class OnnxBackend(Backend):
    """The stages of an artifact (``out_dir``, with its checked ``plan`` and manifest ``files``) as
    onnxruntime sessions. ``segments``: the manifest's checked segments, each a dict with ``name``,
    ``stages`` (two or more consecutive layers with one attention window, no two overlapping) and
    ``onnx``."""

    name = "ONNX Runtime"
    xp = XP

    def __init__(
        self,
        out_dir: Path,
        plan: Plan,
        files: dict[str, Any],
        *,
        providers: Providers | None = None,
        segments: Sequence[Segment] = (),
        fused: dict[str, Any] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.plan = plan
        self.info = plan.model
        self.dtype = np.dtype(self.info.dtype)
        out_dir = Path(out_dir)
        layers = plan.layers
        # a program whose steps always run every layer back to back runs them as the artifact's whole-model
        # segment, one session, instead of a session per layer (which then are not opened)
        segments = list(segments)
        every = [s.name for s in layers]
        self._segment: Segment | None = None
        if one_block(plan.stages):
            self._segment = next((seg for seg in segments if list(seg["stages"]) == every), None)
        # otherwise each segment is a run of layers between decision points
        runs = [self._segment] if self._segment else segments
        self._segments = {seg["stages"][0]: seg for seg in runs}  # by the name of their first layer
        skip = {name for seg in runs for name in seg["stages"]}
        # every graph by the name the backend runs it under; those in `opened` get a session now, the others
        # on first use
        self._paths = {s.name: files[s.name]["onnx"] for s in plan.stages}
        self._paths.update((seg["name"], seg["onnx"]) for seg in segments)
        opened = [s.name for s in plan.stages if s.name not in skip] + [seg["name"] for seg in runs]
        self._segment_names = {seg["name"] for seg in segments}

        self._out_dir = out_dir
        self._providers = session_providers(providers)
        # fused layer graphs (in-place cache, GroupQueryAttention: effx.exporters.onnx_attention) run where
        # the session runs on the CPU, whose memory the cache's arrays are; their plain graphs then open
        # only when a step needs them (a multi-token step over a past at batch > 1)
        first = self._providers[0]
        self._fused: dict[str, str] = {}
        if (first[0] if isinstance(first, tuple) else first) == "CPUExecutionProvider":
            self._fused = {name: _FUSED + name for name in (fused or {})}
            self._paths.update((_FUSED + name, entry["onnx"]) for name, entry in (fused or {}).items())
            opened = [_FUSED + n if n in self._fused else n for n in opened]
        # cache -> {name: binding}
        self._bindings: weakref.WeakKeyDictionary[KVCache, dict[str, Any]] = weakref.WeakKeyDictionary()
        self._hidden_out: dict[str, str] = {}  # fused session name -> its hidden-state output
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: its notes on nodes it cannot constant-fold are noise
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        _share_cpu_arena(ort, opts)
        self._opts = opts
        self.sessions: dict[str, Session] = {}
        # each session's input and output names once, and its own run: the Python wrapper's checks on every
        # call were 2% of a SmolLM2 decode step (ONNX Runtime copies non-contiguous arrays, such as a
        # cache's past, itself)
        self._calls: dict[str, tuple[list[str], list[str], Callable[..., Outputs]]] = {}
        for name in opened:
            self._open(name)
        # where the segment returns each layer's past-and-new cache, plain decoding keeps the cache in the
        # segment session's memory (the GPU's under CUDA) instead of host arrays
        self.bind_cache = True  # False: host arrays even where the segment could keep the cache
        self._bound_device: str | None = None
        if self._segment is not None and self._segment["name"] not in self._fused:
            seg = self.sessions[self._segment["name"]]
            if any(o.name.startswith("present_") for o in seg.get_outputs()):
                self._bound_device = "cuda" if seg.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._layer_ids = [cast(int, s.layer) for s in layers]  # layer stages: each has its layer

    def _open(self, name: str) -> tuple[list[str], list[str], Callable[..., Outputs]]:
        """Open the session ``name`` and note how to call it. Host-array runs never ask for a segment's
        past-and-new cache outputs (``present_*``, the bound cache's): fetching them would copy every
        layer's whole cache out of the session at every step."""
        import onnxruntime as ort

        path = self._out_dir / self._paths[name]
        try:
            sess = ort.InferenceSession(str(path), sess_options=self._opts, providers=self._providers)
        except (ValueError, TypeError):  # the Python wrapper's own checks of the arguments (providers)
            raise
        except Exception as e:  # ONNX Runtime's Fail, InvalidProtobuf, InvalidGraph, NoSuchFile...
            text = (str(e).strip().splitlines() or [""])[0][:300]
            raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: {text})") from None
        check_shapes(self.plan, name.removeprefix(_FUSED), sess, path)
        self.sessions[name] = sess
        self._calls[name] = call = (
            [i.name for i in sess.get_inputs()],
            [o.name for o in sess.get_outputs() if not o.name.startswith("present_")],
            getattr(sess, "_sess", sess).run,
        )
        return call

    def _run(self, name: str, *args: np.ndarray[Any, Any]) -> Outputs:
        # a layer inside a segment has no session until a step runs it alone (see run_layers)
        inputs, outputs, run = self._calls.get(name) or self._open(name)
        return run(outputs, dict(zip(inputs, args, strict=True)), None)

    def run(self, stage: StageLike, *inputs: np.ndarray[Any, Any]) -> Outputs:
        return self._run(stage.name, *inputs)

    def new_cache(self, batch: int, capacity: int, *, rollback: bool = True) -> KVCache:
        if not rollback and self._bound_device is not None and self.bind_cache:
            info = self.info
            shape = (batch, info.num_kv_heads, info.head_dim)
            # duck-typed: plain decoding reads only lengths and dropped of a cache, and run_layers binds it
            return cast(KVCache, _BoundCache(info.num_layers, *shape, self.dtype, self._bound_device))
        return super().new_cache(batch, capacity, rollback=rollback)

    def run_layers(
        self,
        cache: KVCache,
        layers: Sequence[StageLike],
        hidden: np.ndarray[Any, Any],
        cos: np.ndarray[Any, Any],
        sin: np.ndarray[Any, Any],
        masks: MaskCache,
    ) -> np.ndarray[Any, Any]:
        """Run ``layers``: each part that is exactly a segment's layers, filled to one length and with one
        dropped set (so one mask serves them all), as that segment's one session; every other layer as its
        own session."""
        if isinstance(cache, _BoundCache):  # only plain decoding, which runs every layer each step
            ids = self._layer_ids
            window = next(iter(self.plan.windows))
            mask = masks.get(cache.lengths[ids[0]], hidden.shape[1], window)
            return self._run_bound(cache, ids, hidden, cos, sin, mask)
        layers = tuple(layers)
        p = 0
        while p < len(layers):
            seg = self._segments.get(layers[p].name)
            run = layers[p : p + len(seg["stages"])] if seg is not None else ()
            if seg is not None and _one_mask(cache, seg, run):
                hidden = self._run_segment(seg, cache, run, hidden, cos, sin, masks)
                p += len(run)
            elif self._fusable(layers[p].name, cache, cast(int, layers[p].layer), hidden):
                mask = layer_mask(masks, cache, layers[p], hidden.shape[1])
                hidden = self._run_fused(
                    layers[p].name, cache, [cast(int, layers[p].layer)], hidden, cos, sin, mask
                )
                p += 1
            else:
                hidden = run_layer_stages(self, cache, layers[p : p + 1], hidden, cos, sin, masks)
                p += 1
        return hidden

    def _fusable(self, name: str, cache: KVCache, first: int, hidden: np.ndarray[Any, Any]) -> bool:
        """Whether the graph ``name`` has a fused form that this step can run: the cache is host arrays, and
        the step is not several tokens over a past at batch > 1 (which ONNX Runtime's CPU attention refuses)."""
        if name not in self._fused or not isinstance(cache, KVCache):
            return False
        return hidden.shape[0] == 1 or hidden.shape[1] == 1 or cache.lengths[first] == 0

    def _run_fused(
        self,
        name: str,
        cache: KVCache,
        ids: list[int],
        hidden: np.ndarray[Any, Any],
        cos: np.ndarray[Any, Any],
        sin: np.ndarray[Any, Any],
        mask: np.ndarray[Any, Any],
    ) -> np.ndarray[Any, Any]:
        """The layers ``ids`` as the fused graph of ``name``: each layer's cache arrays are bound as both its
        past and its present, so the attention node writes the step's keys and values into their slots."""
        start = cache.lengths[ids[0]]
        total = start + hidden.shape[1]
        if total > cache.capacity:
            raise RuntimeError(f"KV cache overflow: {total} > capacity {cache.capacity}")
        key = _FUSED + name
        if key not in self._calls:
            self._open(key)
        bindings = self._bindings.setdefault(cache, {})
        binding = bindings.get(key)
        if binding is None:
            import onnxruntime as ort

            sess = self.sessions[key]
            binding = bindings[key] = sess.io_binding()
            self._hidden_out[key] = sess.get_outputs()[0].name
            suffix: Callable[[int], str] = (
                (lambda j: f".{j}") if name in self._segment_names else (lambda j: "")
            )
            for j, i in enumerate(ids):
                for kv, store in (("k", cache.k), ("v", cache.v)):
                    value = ort.OrtValue.ortvalue_from_numpy(store[i])
                    binding.bind_ortvalue_input(f"past_{kv}{suffix(j)}", value)
                    binding.bind_ortvalue_output(f"present_{kv}{suffix(j)}", value)
        # the hidden state into an array of ours (fetching it through get_outputs would wrap every bound
        # output, the caches included: 2% of a SmolLM2 step)
        out = np.empty(hidden.shape, hidden.dtype)
        binding.bind_output(self._hidden_out[key], "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
        feed = {"hidden": hidden, "cos": cos, "sin": sin, "mask": mask}
        feed.update(fused_inputs(cos, sin, start, hidden.shape[1]))
        for input_name, value in feed.items():
            binding.bind_cpu_input(input_name, np.ascontiguousarray(value))
        self.sessions[key].run_with_iobinding(binding)
        for i in ids:
            cache.lengths[i] = total
        return out

    def _run_segment(
        self,
        seg: Segment,
        cache: KVCache,
        run: Sequence[StageLike],
        hidden: np.ndarray[Any, Any],
        cos: np.ndarray[Any, Any],
        sin: np.ndarray[Any, Any],
        masks: MaskCache,
    ) -> np.ndarray[Any, Any]:
        """The layers ``run`` as the one session of ``seg`` (see ``effx.exporters.onnx._fuse_layers``)."""
        ids = [cast(int, s.layer) for s in run]  # layer stages: each has its layer
        first = ids[0]
        mask = layer_mask(masks, cache, run[0], hidden.shape[1])
        if self._fusable(seg["name"], cache, first, hidden):
            return self._run_fused(seg["name"], cache, ids, hidden, cos, sin, mask)
        out = self._run(seg["name"], hidden, cos, sin, mask, *(x for i in ids for x in cache.past(i)))
        for j, i in enumerate(ids):
            cache.write(i, out[1 + 2 * j], out[2 + 2 * j])
        return out[0]

    def _run_bound(
        self,
        cache: _BoundCache,
        ids: list[int],
        hidden: np.ndarray[Any, Any],
        cos: np.ndarray[Any, Any],
        sin: np.ndarray[Any, Any],
        mask: np.ndarray[Any, Any],
    ) -> np.ndarray[Any, Any]:
        # a bound cache is made only where the whole-model segment runs (new_cache)
        sess = self.sessions[cast(Segment, self._segment)["name"]]
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
        return cast("np.ndarray[Any, Any]", out[0].numpy())


_ELEMENT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)"}


def check_shapes(plan: Plan, name: str, sess: Session, path: Path) -> None:
    """The sizes that the graph ``name`` (a stage, a segment or their fused form) fixes in its inputs and
    outputs, checked against the plan's: the hidden size, the rotary width, the KV heads and head size of
    every past, the vocabulary of every head's logits, the float type. A plan that disagrees with its own
    graphs (an edited ``num_kv_heads=10**9`` would size the cache at hundreds of GiB) is an
    ``ArtifactError`` before anything is allocated. Dynamic axes are not checked."""
    info = plan.model
    stage = next((s for s in plan.stages if s.name == name), None)
    kind = stage.kind if stage is not None else "layer"  # segments are runs of layers
    wanted: list[tuple[str, Any, int, int]] = []  # (what, dims, axis, size)
    for i in sess.get_inputs():
        if i.name == "hidden":
            wanted.append((f"input {i.name}", i.shape, -1, info.hidden_size))
            if i.type != _ELEMENT_TYPES.get(info.dtype):
                raise ArtifactError(f"{path} takes {i.type} hidden states; the plan says {info.dtype}")
        elif i.name in ("cos", "sin"):
            wanted.append((f"input {i.name}", i.shape, -1, info.rope_width))
        elif i.name.startswith(("past_k", "past_v")):
            wanted += [
                (f"input {i.name}", i.shape, 1, info.num_kv_heads),
                (f"input {i.name}", i.shape, 3, info.head_dim),
            ]
    sizes = {"hidden": info.hidden_size, "rope": info.rope_width, "vocab": info.vocab_size}
    declared = techniques.stage_kind(kind).signature(stage.attrs if stage is not None else {})[1]
    for o, name in zip(sess.get_outputs(), declared, strict=False):  # the last axis where the model fixes it
        last = techniques.TENSORS[name][0][-1]
        if last in sizes:
            wanted.append((f"output {name}", o.shape, -1, sizes[last]))
    for what, dims, axis, size in wanted:
        found = dims[axis] if isinstance(dims, list) and len(dims) > max(axis, -axis - 1) else None
        if isinstance(found, int) and found != size:
            raise ArtifactError(f"{path}: its {what} has size {found} on axis {axis}; the plan says {size}")


def _one_mask(cache: KVCache, seg: Segment, run: Sequence[StageLike]) -> bool:
    """Whether the layers ``run`` are exactly ``seg``'s and one mask serves them: the same filled length
    and the same TokenDrop dropped set (the same array, as ``drop_prefill`` stores it) in each. A deferred
    token joining inside the run, or a drop inside it, sends the run layer by layer instead."""
    if tuple(s.name for s in run) != tuple(seg["stages"]):
        return False
    ids = [cast(int, s.layer) for s in run]  # layer stages: each has its layer
    length, dropped = cache.lengths[ids[0]], cache.dropped.get(ids[0])
    return all(cache.lengths[i] == length and cache.dropped.get(i) is dropped for i in ids)
