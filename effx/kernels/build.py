"""Building and loading effx's CPU kernel library (``cpu.c``): the targets this CPU runs, the compile into
the effx cache, and which build runs now (``EFFX_KERNELS``, :func:`use`).

The products themselves are in :mod:`effx.kernels`; this module only finds, builds and loads the library
they call (:func:`library`), and says which target runs (:func:`describe`).
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
from pathlib import Path

from ..models import cache_dir

__all__ = [
    "ISAS",
    "available",
    "cpu_features",
    "describe",
    "isa",
    "isas",
    "library",
    "unavailable_reason",
    "use",
]

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


def library() -> tuple[ctypes.CDLL | None, str]:
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
    return library()[0] is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False ('' when it is True)."""
    return library()[1]


def isa() -> str:
    """The target the kernels run now (``avx512``, ``avx2``, ``neon``, ``generic``), '' if they do not."""
    lib = library()[0]
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
