"""effx's CPU kernels for the torch backend: products whose cost follows the bytes of weight they read.

torch's default float32 ``F.linear`` (MKL) reaches about a third of this kind of machine's read bandwidth
for one token and doubles in cost from one token to two (it repacks the weight for every multi-row
product). A decode step, a batch of decode steps and a verification of a few drafted tokens all multiply a
few rows of activations by every weight once, so they should cost what reading the weights costs. The
kernels here (``cpu.c``) do that on the weights' own row-major layout, on the CPUs users have: AVX-512,
AVX2 + FMA (x86-64), Advanced SIMD (aarch64), and portable C elsewhere (see :data:`ISAS`):

* :func:`linear`: ``x @ w.T (+ b)``; :func:`linear_many`: several products of one input in one parallel
  loop (a layer's q, k and v); :func:`linear_rows`: a product with a gathered subset of weight rows (a pruned
  exit's per-token vocabulary, without copying the rows);
* :func:`gated`: ``silu(x @ wg.T) * (x @ wu.T)``, the gated MLP's input side in one pass;
* :func:`rms_norm`, and the rotary embedding inside :func:`qkv_rope`.

Every product takes a float32 ``[n, k]`` weight or a quantized one, ``(q, scale, minimum)`` in
:mod:`effx.quant`'s format (4-bit, int8 or bfloat16 values), read directly and de-quantized in registers
exactly as :func:`effx.quant.dequantize` computes it: a quantized product equals the float product over the
de-quantized weight bit for bit (for k a multiple of 32). Quantized products of more than :data:`MAX_ROWS`
rows run as calls of :data:`MAX_ROWS` rows (the reference op would de-quantize the whole weight).

Numerics: float32 throughout, every output one dot product in a fixed order (16 lanes of fused
multiply-adds, then a fixed tree), so the kernels are batch invariant (a token's row is bitwise the same
computed alone or with others) and give the same bits on every target, but differ from MKL in the last bits
(about 1e-6 relative; tests bound the logits). Products of more than :data:`MAX_ROWS`
activation rows (a prefill) go to torch's ``F.linear``, which is compute-bound there and faster.

The library is compiled for the best target this CPU runs (:func:`isas`; ``EFFX_KERNELS=avx2`` or another
target's name forces one, ``EFFX_KERNELS=off`` none) with the C compiler (``$CC``, else ``cc``/``gcc``) at
first use into the effx cache directory (``<cache>/kernels``, which must be this user's and not writable by
others; a few seconds, once). Where it cannot be (no compiler, an x86 CPU without AVX2/FMA, not Linux),
:func:`available` is False, :func:`unavailable_reason` says why, and the torch backend runs the reference
ATen ops. :func:`describe` says which target runs, for reports and benchmarks.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "ISAS",
    "MAX_ROWS",
    "act8",
    "append_kv",
    "available",
    "cpu_features",
    "describe",
    "gated",
    "isa",
    "isas",
    "linear",
    "linear_many",
    "linear_rows",
    "qkv_rope",
    "rms_norm",
    "round_int8",
    "unavailable_reason",
    "use",
]

# products with more activation rows than this go to F.linear (a prefill is compute-bound, not memory-bound)
MAX_ROWS = 32

#: The targets ``cpu.c`` builds for, best first; :func:`isas` says which of them this machine runs.
ISAS = ("avx512", "avx2", "neon", "generic")
# compiler flags per target (the source picks its vector code from the macros these define)
_ISA_FLAGS = {
    "avx512": ("-mavx512f", "-mavx512bw", "-mfma", "-mf16c"),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "neon": (),
    "generic": ("-DEFFX_FORCE_GENERIC", "-O2"),  # (-O3 takes 20 s to compile the scalar lanes; tests only)
}
# instructions a target uses where the CPU has them (int8 dot products): /proc/cpuinfo's flag -> compiler flag
_ISA_EXTRAS = {
    "avx512": (("avx512_vnni", "-mavx512vnni"),),
    "neon": (("asimddp", "-march=armv8.2-a+dotprod"),),
}


def _isa_flags(isa: str) -> tuple[str, ...]:
    """The compiler flags of ``isa``'s build on this CPU: the target's own, and its extras this CPU has."""
    have = cpu_features()
    return (*_ISA_FLAGS[isa], *(flag for need, flag in _ISA_EXTRAS.get(isa, ()) if need in have))


# what each x86 target needs of the CPU (/proc/cpuinfo's flag names)
_X86_NEEDS = {"avx512": {"avx512f", "avx512bw", "fma", "f16c"}, "avx2": {"avx2", "fma", "f16c"}}

_SOURCE = Path(__file__).with_name("cpu.c")
_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off")
_P = ctypes.c_void_p
_I = ctypes.c_int


def _cache_dir() -> Path:
    from ..models import cache_dir

    return cache_dir() / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _arch() -> str:
    """``x86_64``, ``aarch64`` or what else the machine says."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU's instruction-set flags as Linux reports them (``/proc/cpuinfo``: ``flags`` on x86,
    ``Features`` on ARM); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def isas() -> tuple[str, ...]:
    """The kernel targets this machine can build and run, best first (the first is what runs by default,
    except ``generic`` on x86-64, which only tests use: there torch's own ops are faster)."""
    if not sys.platform.startswith("linux"):
        return ()
    arch, flags = _arch(), cpu_features()
    if arch == "x86_64":
        return (*(isa for isa, needs in _X86_NEEDS.items() if needs <= flags), "generic")
    if arch == "aarch64":
        return ("neon", "generic")
    return ("generic",)


def _default_isa() -> tuple[str | None, str]:
    """The target to run when none is asked for, or None and why."""
    if not sys.platform.startswith("linux"):
        return (
            None,
            f"effx's CPU kernels are built for Linux (x86-64, aarch64 and others), not {sys.platform}",
        )
    best = isas()[0]
    if best == "generic" and _arch() == "x86_64":
        return None, "this CPU lacks AVX2/FMA/F16C (flags: avx512f+avx512bw or avx2, with fma and f16c)"
    return best, ""


def _private_dir(path: Path) -> str:
    """'' if ``path`` is a folder owned by this user that no one else can write to (where a shared library
    may be loaded from; one of ours that others may write to is made private first), else why not."""
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} is owned by another user (set EFFX_CACHE to a folder of your own)"
    if st.st_mode & 0o022:
        path.chmod(st.st_mode & 0o755)  # ours: no one else may write here (what is in it is checked below)
    return ""


def _trusted(path: Path) -> bool:
    """Whether a compiled library in the cache is this user's own and writable by no one else."""
    st = path.stat()
    return (not hasattr(os, "getuid") or st.st_uid == os.getuid()) and not st.st_mode & 0o022


def _build(isa: str) -> Path:
    """Compile ``cpu.c`` for ``isa`` (once per source, flags and compiler) and return the library's path."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (set $CC, or install gcc)")
    flags = (*_FLAGS, *_isa_flags(isa))
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((cc, *flags)).encode()).hexdigest()[:16]
    folder = _cache_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    unsafe = _private_dir(folder)
    if unsafe:
        raise OSError(f"refusing to load compiled kernels from {folder}: {unsafe}")
    target = folder / f"effx_cpu_{isa}_{key}.so"
    if target.exists():
        if _trusted(target):
            return target
        target.unlink()  # planted or loosened: never loaded, built again
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    if sys.stderr is not None and sys.stderr.isatty():  # a pause of tens of seconds deserves a word
        sys.stderr.write(
            f"effx: compiling its {isa} CPU kernels (once per version and CPU, under a minute)\n"
        )
    try:
        run = subprocess.run([cc, *flags, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if run.returncode != 0:
            raise OSError(f"{cc} failed to compile {_SOURCE.name} for {isa}: {run.stderr.strip()[-400:]}")
        os.replace(tmp, target)  # atomic: a concurrent build writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _load(isa: str) -> tuple[ctypes.CDLL | None, str]:
    """The kernel library built for ``isa``, or None and why not."""
    if isa not in isas():
        return None, f"this machine cannot run effx's {isa} kernels (it runs: {', '.join(isas()) or 'none'})"
    try:
        lib = ctypes.CDLL(str(_build(isa)))
    except OSError as e:
        return None, str(e)
    lib.effx_isa.restype = ctypes.c_char_p
    if lib.effx_isa().decode() != isa or not lib.effx_supported():
        return None, f"the {isa} build of effx's kernels does not run on this CPU"
    lib.effx_linear.argtypes = [_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _I]
    lib.effx_linear1.argtypes = [_P, _I, _I, _P, _P, _I, _P, _I, _I]
    lib.effx_qkv_rope.argtypes = [_P, _I, _I, _P, _P, _P, _P, _P, _P, _I, _I, _P, _P, _P, _I, _I]
    lib.effx_linear_rows.argtypes = [_P, _I, _I, _P, _P, _I, _P, _I]
    lib.effx_gated.argtypes = [_P, _I, _I, _P, _P, _I, _P, _I]
    lib.effx_rms_norm.argtypes = [_P, _P, _P, _I, _I, ctypes.c_float]
    lib.effx_rope.argtypes = [_P, _I, _I, _I, _I, _P, _P]
    lib.effx_round_int8.argtypes = [_P, _P, _I, _I, _I]
    lib.effx_layer_work.argtypes = [_P, _I]
    lib.effx_layer_work.restype = ctypes.c_long
    lib.effx_layer.argtypes = [
        _P, _P, _I, _I, _P, _P, _P, _P, _I, _I, _P, ctypes.c_long, ctypes.c_long, _P, _P, _P, _I,
    ]  # fmt: skip
    lib.effx_layers.argtypes = [
        _P, _I, _P, _I, _I, _P, _P, _P, _P, _I, _I, _P, ctypes.c_long, ctypes.c_long, _P, _P, _P, _P, _I,
    ]  # fmt: skip
    lib.effx_linear_w.argtypes = [_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _I]
    lib.effx_qlinear.argtypes = [_P, _I, _I, _P, _P, _I, _P, _I]
    lib.effx_qkv_rope_w.argtypes = [_P, _I, _I, _P, _P, _P, _P, _I, _I, _P, _P, _P, _I, _I]
    lib.effx_linear_rows_w.argtypes = [_P, _I, _I, _P, _P, _I, _P, _I]
    lib.effx_gated_w.argtypes = [_P, _I, _I, _P, _P, _I, _P, _I]
    for name in (
        "linear", "linear1", "qkv_rope", "linear_rows", "gated", "rms_norm", "rope", "round_int8", "layer",
        "layers", "linear_w", "qlinear", "qkv_rope_w", "linear_rows_w", "gated_w",
    ):  # fmt: skip
        getattr(lib, f"effx_{name}").restype = None
    return lib, ""


# the target forced by use() (tests, benchmarks); None: EFFX_KERNELS, else the best this CPU runs
_forced: list[str] = []


def _library() -> tuple[ctypes.CDLL | None, str]:
    """The kernel library the torch backend runs now, or None and why not. ``EFFX_KERNELS`` chooses:
    unset or ``auto`` for the best target this CPU runs, ``off`` (or ``0``, ``reference``) for torch's own
    ops, or a target's name (``avx2``, ...) to run that one."""
    if _forced:
        return _load(_forced[-1])
    return _chosen(os.environ.get("EFFX_KERNELS", ""))


@functools.cache
def _chosen(setting: str) -> tuple[ctypes.CDLL | None, str]:
    choice = setting.strip().lower()
    if choice in ("0", "off", "reference"):
        return None, "disabled by EFFX_KERNELS"
    if choice in ("", "auto", "fast"):
        isa, why = _default_isa()
        return (None, why) if isa is None else _load(isa)
    if choice not in ISAS:
        return None, f"EFFX_KERNELS={choice!r} is not one of auto, off, {', '.join(ISAS)}"
    return _load(choice)


@contextlib.contextmanager
def use(isa: str):
    """Run the kernels built for ``isa`` (one of :data:`ISAS`) inside the ``with`` block, in this thread
    and every other (tests and benchmarks compare targets in one process); ValueError if this machine
    cannot run it."""
    if isa not in ISAS:
        raise ValueError(f"kernel target must be one of {', '.join(ISAS)}, got {isa!r}")
    lib, why = _load(isa)
    if lib is None:
        raise ValueError(why)
    _forced.append(isa)
    try:
        yield
    finally:
        _forced.pop()


def available() -> bool:
    """Whether effx's CPU kernels run on this machine (built and loaded at the first call)."""
    return _library()[0] is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False ('' when it is True)."""
    return _library()[1]


def isa() -> str:
    """The target the kernels run now (``avx512``, ``avx2``, ``neon``, ``generic``), '' if they do not."""
    lib = _library()[0]
    return "" if lib is None else lib.effx_isa().decode()


def describe() -> str:
    """One line for reports and benchmarks: the kernel target that runs (or why none does) and the CPU's
    vector instruction sets."""
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "asimd",
              "asimddp", "sve", "i8mm")  # fmt: skip
    shown = [f for f in wanted if f in cpu_features()]
    cpu = f"{_arch()}: {' '.join(shown) if shown else 'no vector flags read'}"
    which = isa()
    return f"effx kernels {which} ({cpu})" if which else f"effx kernels off: {unavailable_reason()} ({cpu})"


class _Weight(ctypes.Structure):
    """``effx_weight`` of cpu.c: how the kernels read a float32 or quantized weight."""

    _fields_ = [
        ("kind", _I), ("data", _P), ("scale", _P), ("min", _P),
        ("scale_f16", _I), ("gshift", _I), ("ngroups", _I), ("ld", _I), ("act8", _I),
    ]  # fmt: skip


_KIND = {torch.uint8: 4, torch.int8: 8, torch.bfloat16: 16}


def rows_of(w) -> int:
    """The output size of a weight operand: a float ``[n, k]`` tensor or a quantized ``(q, scale, minimum)``."""
    return (w[0] if isinstance(w, tuple) else w).shape[0]


def dense(w, k: int) -> torch.Tensor:
    """A weight operand as a float32 ``[n, k]`` tensor (de-quantized if it is quantized; see effx.quant)."""
    if not isinstance(w, tuple):
        return w
    from ..quant import dequantize

    return dequantize(*w, k)


# descriptors made once per weight tensor (a decode step asks for every weight's each time): keyed by the
# identity of the float weight or the quantized values (an entry leaves when that tensor dies), checked
# against the other tensors, k and the data pointer
_DESCS: dict[int, tuple] = {}


def _weight(w, k: int, grad: bool) -> _Weight | None:
    """The kernels' view of a weight operand, or None if they do not take it (then the caller runs the
    reference op): a contiguous float32 ``[n, k]`` tensor, or effx.quant's ``(q, scale, minimum)``."""
    parts = w if isinstance(w, tuple) else (w, None, None)
    if len(parts) != 3 or not isinstance(parts[0], torch.Tensor):
        return None
    if grad and any(t is not None and t.requires_grad for t in parts):
        return None
    key = parts[0]
    hit = _DESCS.get(id(key))
    if (
        hit is not None
        and hit[0]() is key
        and hit[1] == k
        and hit[2] is parts[1]
        and hit[3] is parts[2]
        and hit[4] == key.data_ptr()
    ):
        return hit[5]
    desc = _make_weight(w, k, grad)
    if desc is not None:
        ident = id(key)
        ref = weakref.ref(key, lambda _, i=ident: _DESCS.pop(i, None))
        _DESCS[ident] = (ref, k, parts[1], parts[2], key.data_ptr(), desc)
    return desc


def _make_weight(w, k: int, grad: bool) -> _Weight | None:
    if not isinstance(w, tuple):
        if w.dim() != 2 or w.shape[1] != k or not _plain(w, grad):
            return None
        return _Weight(0, w.data_ptr(), None, None, 0, 0, 0, k)
    q, scale, minimum = w
    kind = _KIND.get(q.dtype)
    if kind is None or q.dim() != 2 or q.device.type != "cpu" or not q.is_contiguous():
        return None
    kp = q.shape[1] * (2 if kind == 4 else 1)
    if kp < k or kp % 32:
        return None
    if kind == 16:
        if scale is not None or minimum is not None:
            return None
        return _Weight(16, q.data_ptr(), None, None, 0, 0, 0, q.shape[1])
    for t in (scale, minimum):
        if t is None:
            continue
        if (
            t.dtype not in (torch.float16, torch.float32)
            or t.dtype != scale.dtype
            or t.shape != scale.shape
            or t.dim() != 2
            or t.shape[0] != q.shape[0]
            or not t.is_contiguous()
            or t.device.type != "cpu"
            or (grad and t.requires_grad)
        ):
            return None
    if scale is None or scale.shape[1] == 0 or kp % scale.shape[1]:
        return None
    group = kp // scale.shape[1]
    if group < 16 or group & (group - 1):
        return None
    return _Weight(
        kind, q.data_ptr(), scale.data_ptr(), None if minimum is None else minimum.data_ptr(),
        int(scale.dtype == torch.float16), group.bit_length() - 1, scale.shape[1], q.shape[1],
    )  # fmt: skip


def _fits_x(x: torch.Tensor) -> bool:
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.dim() < 1:
        return False
    k = x.shape[-1]
    if k < 1 or x.numel() > MAX_ROWS * k:
        return False
    return not (torch.is_grad_enabled() and x.requires_grad)


def _chunked(x: torch.Tensor, weights) -> bool:
    """Whether a product is better run as kernel calls over ``MAX_ROWS`` rows at a time than by the
    reference op: quantized weights, which the reference op would de-quantize whole, and a float32 input of
    more rows than the kernels take at once (a prefill)."""
    return (
        any(isinstance(w, tuple) for w in weights)
        and _library()[0] is not None
        and x.dtype == torch.float32
        and x.dim() >= 1
        and x.shape[-1] >= 1
        and x.numel() > MAX_ROWS * x.shape[-1]
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def _by_rows(fn, x: torch.Tensor, *args):
    """``fn(x, *args)`` computed ``MAX_ROWS`` rows of ``x`` at a time (fn is row-wise); fn returns one tensor
    or a tuple of them."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    parts = [fn(flat[i : i + MAX_ROWS], *args) for i in range(0, flat.shape[0], MAX_ROWS)]
    shape = x.shape[:-1]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(col).reshape(*shape, -1) for col in zip(*parts, strict=True))
    return torch.cat(parts).reshape(*shape, -1)


def _descs(x: torch.Tensor, weights, biases=()) -> list[_Weight] | None:
    """The kernels' views of ``weights`` if the kernels take these operands (else None: the caller runs the
    reference op, which also raises the reference error for operands that do not fit together): a float32
    CPU input, contiguous, of at most ``MAX_ROWS`` rows of ``k >= 1`` values; weights as :func:`_weight`
    takes them; ``[n]`` float32 biases or None; nothing that autograd must see (the kernels have no
    backward)."""
    if not _fits_x(x):
        return None
    grad = torch.is_grad_enabled()
    descs = []
    for w in weights:
        d = _weight(w, x.shape[-1], grad)
        if d is None:
            return None
        descs.append(d)
    for w, b in zip(weights, biases, strict=False):  # no biases: ()
        if b is not None and (b.dim() != 1 or b.shape[0] != rows_of(w) or not _plain(b, grad)):
            return None
    return descs


def _fits(x: torch.Tensor, weights, biases=()) -> bool:
    return _descs(x, weights, biases) is not None


def act8(desc: _Weight, group: int) -> _Weight | None:
    """``desc`` multiplying int8 activations rounded per ``group`` values in integer arithmetic (see
    ``cpu.c``), or None where the kernels cannot: a float or bf16 weight, or a group other than the weight's
    own or below 32. Made once per descriptor."""
    if desc.kind not in (4, 8) or group < 32 or 1 << desc.gshift != group:
        return None
    twin = getattr(desc, "twin", None)
    if twin is None:
        twin = desc.twin = _Weight.from_buffer_copy(desc)
        twin.act8 = 1
    return twin


def _int8_input(x: torch.Tensor, weights, biases, group: int):
    """How a product with int8 activations (``effx.round_int8(x, group)`` as its input) runs: ``(x, descs)``
    with the weights' integer-path descriptors where the kernels take them all, else ``(round_int8(x,
    group), None)``, the rounded input for the float path (what the unlowered graph computes)."""
    descs = _descs(x, weights, biases) if _library()[0] is not None else None
    if descs is not None:
        twins = [act8(d, group) for d in descs]
        if all(t is not None for t in twins):
            return x, twins
    return round_int8(x, group), None


def _plain(t: torch.Tensor, grad: bool) -> bool:
    return (
        t.dtype == torch.float32
        and t.device.type == "cpu"
        and t.is_contiguous()
        and not (grad and t.requires_grad)
    )


def _ptrs(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[0 if t is None else t.data_ptr() for t in tensors])


def linear_many(x: torch.Tensor, weights, biases=None, int8: int | None = None) -> tuple[torch.Tensor, ...]:
    """``F.linear(x, w, b)`` for each weight operand (and bias), computed in one parallel loop; ``int8``: the
    products take ``effx.round_int8(x, int8)`` (int8 activations: integer dot products where the kernels
    can, see :func:`act8`)."""
    biases = list(biases) if biases is not None else [None] * len(weights)
    lib = _library()[0]
    descs = None
    if int8 is not None:
        x, descs = _int8_input(x, weights, biases, int8) if len(weights) <= 4 else (round_int8(x, int8), None)
    if descs is None:
        descs = None if lib is None or len(weights) > 4 else _descs(x, weights, biases)
    if descs is None:
        if _chunked(x, weights):
            return _by_rows(linear_many, x, weights, biases)
        k = x.shape[-1]
        return tuple(F.linear(x, dense(w, k), b) for w, b in zip(weights, biases, strict=True))
    k = x.shape[-1]
    m = x.numel() // k
    sizes = [rows_of(w) for w in weights]
    out = torch.empty(*x.shape[:-1], sum(sizes), dtype=x.dtype)
    total = sum(sizes)
    views, start = [], 0
    for n in sizes:
        views.append(out.narrow(-1, start, n))
        start += n
    lib.effx_linear_w(
        x.data_ptr(),
        m,
        k,
        k,
        len(weights),
        (_Weight * len(descs))(*descs),
        _ptrs(biases),
        (ctypes.c_int * len(sizes))(*sizes),
        _ptrs(views),
        (ctypes.c_int * len(sizes))(*([total] * len(sizes))),
        torch.get_num_threads(),
    )
    return tuple(views)


def linear(
    x: torch.Tensor, weight, bias: torch.Tensor | None = None, int8: int | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; ``weight`` a float tensor or a quantized ``(q, scale, minimum)``;
    ``int8``: the product takes ``effx.round_int8(x, int8)`` (see :func:`linear_many`)."""
    lib = _library()[0]
    k = x.shape[-1]
    descs = None
    if int8 is not None:
        x, descs = _int8_input(x, (weight,), (bias,), int8)
    if isinstance(weight, tuple):
        if descs is None:
            descs = None if lib is None else _descs(x, (weight,), (bias,))
        if descs is None:
            if _chunked(x, (weight,)):
                return _by_rows(linear, x, weight, bias)
            return F.linear(x, dense(weight, k), bias)
        n = rows_of(weight)
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
        lib.effx_qlinear(
            x.data_ptr(), x.numel() // k, k, ctypes.byref(descs[0]), None if bias is None else bias.data_ptr(),
            n, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out
    if lib is None or not _fits(x, (weight,), (bias,)):
        return F.linear(x, weight, bias)
    n = weight.shape[0]
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    lib.effx_linear1(
        x.data_ptr(), x.numel() // k, k, weight.data_ptr(), None if bias is None else bias.data_ptr(), n,
        out.data_ptr(), n, torch.get_num_threads(),
    )  # fmt: skip
    return out


def _take(w, ids):
    return (
        tuple(None if t is None else t.index_select(0, ids) for t in w)
        if isinstance(w, tuple)
        else (w.index_select(0, ids))
    )


def linear_rows(x: torch.Tensor, weight, ids: torch.Tensor, int8: int | None = None) -> torch.Tensor:
    """``F.linear(x, weight[ids])`` without gathering the rows: ``ids`` is a 1-D int64 tensor; ``int8``: the
    product takes ``effx.round_int8(x, int8)`` (see :func:`linear_many`)."""
    lib = _library()[0]
    descs = None
    if int8 is not None:
        x, descs = _int8_input(x, (weight,), (), int8)
    if descs is None:
        descs = None if lib is None else _descs(x, (weight,))
    fits = descs is not None and ids.dtype == torch.int64 and ids.ndim == 1
    if not fits or (ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < rows_of(weight))):
        if descs is not None and descs[0].act8:  # the rounding the integer path would have done
            x = round_int8(x, int8)
        if _chunked(x, (weight,)) and ids.dtype == torch.int64 and ids.ndim == 1:
            return _by_rows(linear, x, _take(weight, ids))
        return F.linear(x, dense(_take(weight, ids), x.shape[-1]))
    ids = ids.contiguous()
    k = x.shape[-1]
    out = torch.empty(*x.shape[:-1], ids.shape[0], dtype=x.dtype)
    lib.effx_linear_rows_w(
        x.data_ptr(), x.numel() // k, k, ctypes.byref(descs[0]), ids.data_ptr(), ids.shape[0], out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def gated(x: torch.Tensor, w_gate, w_up, int8: int | None = None) -> torch.Tensor:
    """``silu(F.linear(x, w_gate)) * F.linear(x, w_up)``; ``int8``: the products take
    ``effx.round_int8(x, int8)`` (see :func:`linear_many`)."""
    lib = _library()[0]
    descs = None
    if int8 is not None:
        x, descs = (
            _int8_input(x, (w_gate, w_up), (), int8)
            if rows_of(w_gate) == rows_of(w_up)
            else (round_int8(x, int8), None)
        )
    if descs is None:
        descs = None if lib is None or rows_of(w_gate) != rows_of(w_up) else _descs(x, (w_gate, w_up))
    if descs is None:
        if _chunked(x, (w_gate, w_up)) and rows_of(w_gate) == rows_of(w_up):
            return _by_rows(gated, x, w_gate, w_up)
        k = x.shape[-1]
        return F.silu(F.linear(x, dense(w_gate, k))) * F.linear(x, dense(w_up, k))
    k = x.shape[-1]
    n = rows_of(w_gate)
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    lib.effx_gated_w(
        x.data_ptr(), x.numel() // k, k, ctypes.byref(descs[0]), ctypes.byref(descs[1]), n, out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x**2, -1) + eps))`` over the last axis."""
    lib = _library()[0]
    if (
        lib is None
        or not _fits(x, ())
        or weight.shape != x.shape[-1:]
        or not _plain(weight, torch.is_grad_enabled())
    ):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    out = torch.empty_like(x)
    d = x.shape[-1]
    lib.effx_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // d, d, eps)
    return out


def round_int8(x: torch.Tensor, group: int) -> torch.Tensor:
    """:func:`effx.quant.round_int8_reference` (``x`` rounded per block to ``scale * int8``), bitwise."""
    lib = _library()[0]
    if lib is None or not _plain(x, torch.is_grad_enabled()) or x.dim() < 1 or x.shape[-1] < 1 or group < 1:
        from ..quant import round_int8_reference

        return round_int8_reference(x, group)
    out = torch.empty_like(x)
    k = x.shape[-1]
    lib.effx_round_int8(x.data_ptr(), out.data_ptr(), x.numel() // k, k, group)
    return out


def append_kv(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``torch.cat([past, new], dim=2)`` for ``[batch, heads, slots, dim]`` keys or values, without copying
    ``past`` when it is the filled front of a larger buffer (the runtime's KV cache, whose slots after the
    filled ones are free): ``new`` is written into the slots right after ``past`` and the longer view of the
    buffer is returned. Anything else (``past`` not such a view, no room left) is a plain ``cat``."""
    if past.dim() == 4 and new.dim() == 4 and past.dtype == new.dtype and past.shape[2] > 0:
        b, h, n, d = past.shape
        s = new.shape[2]
        sb, sh, sn, sd = past.stride()
        room = past.untyped_storage().nbytes() // past.element_size() - past.storage_offset()
        last = (
            (b - 1) * sb + (h - 1) * sh + (n + s - 1) * sn + (d - 1) * sd
        )  # the extended view's last element
        if (
            sd == 1
            and sn == d
            and sh >= (n + s) * d
            and sb >= h * sh
            and last < room
            and new.shape[:2] == (b, h)
        ):
            out = past.as_strided((b, h, n + s, d), past.stride(), past.storage_offset())
            out[:, :, n:] = new
            return out
    return torch.cat([past, new], dim=2)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding on ``[batch, heads, seq, dim]`` with ``cos``/``sin`` ``[batch, seq, dim]``."""
    half = t.shape[-1] // 2
    rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return t * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def qkv_rope(x, wq, wk, wv, bq, bk, bv, cos, sin, head_dim: int, int8: int | None = None):
    """A Llama attention's input side: the q, k and v projections of ``x [batch, seq, hidden]`` as
    ``[batch, heads, seq, head_dim]`` views, with the rotary embedding (``cos``/``sin`` ``[batch, seq,
    head_dim]``) applied to q and k; the three products run as one parallel loop, the rope in place.
    ``int8``: the products take ``effx.round_int8(x, int8)`` (see :func:`linear_many`)."""
    batch, seq = x.shape[0], x.shape[1]
    lib = _library()[0]
    descs = pending = None  # pending: int8 rounding the products still owe x (integer path descriptors)
    if int8 is not None:
        x, descs = _int8_input(x, (wq, wk, wv), (bq, bk, bv), int8)
        pending = int8 if descs is not None else None
    if descs is None:
        descs = None if lib is None or x.dim() != 3 else _descs(x, (wq, wk, wv), (bq, bk, bv))
    nq, nkv = rows_of(wq), rows_of(wk)
    fused = (
        descs is not None
        and head_dim % 2 == 0
        and nkv == rows_of(wv)
        and nq % head_dim == 0
        and nkv % head_dim == 0
        and all(_plain(t, False) and tuple(t.shape) == (batch, seq, head_dim) for t in (cos, sin))
    )
    if not fused:
        q, k, v = linear_many(x, (wq, wk, wv), (bq, bk, bv), pending)
        q, k, v = (t.view(batch, seq, -1, head_dim).transpose(1, 2) for t in (q, k, v))
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v
    out = torch.empty(batch, seq, nq + 2 * nkv, dtype=x.dtype)
    lib.effx_qkv_rope_w(
        x.data_ptr(), batch * seq, x.shape[-1], (_Weight * 3)(*descs),
        None if bq is None else bq.data_ptr(), None if bk is None else bk.data_ptr(),
        None if bv is None else bv.data_ptr(), nq, nkv, out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        head_dim, torch.get_num_threads(),
    )  # fmt: skip
    q, k, v = out.split((nq, nkv, nkv), dim=-1)
    return tuple(t.view(batch, seq, -1, head_dim).transpose(1, 2) for t in (q, k, v))
