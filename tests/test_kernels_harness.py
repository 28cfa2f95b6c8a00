"""effx's kernels on every target, including those this machine cannot run natively: the torch-free harness
(tests/kernels_harness.c) built for each x86 target this CPU runs and for aarch64 NEON
under user-mode emulation, each checked against the defining order bitwise, and all giving the same bits;
and the run-time choice of target (which loads, what EFFX_KERNELS forces, where the library may come from)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from effx import kernels
from effx.kernels import build

HARNESS = os.path.join(os.path.dirname(__file__), "kernels_harness.c")
# -O1: the bits do not depend on it (IEEE operations, no contraction), and the unrolled blocks compile in
# seconds where -O2 takes a minute for aarch64
FLAGS = ("-O1", "-fopenmp", "-std=gnu11", "-ffp-contract=off")
CROSS_CC, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
SYSROOT = "/usr/aarch64-linux-gnu"


def _harness(tmp_path, name: str, cc: str, flags=(), runner=()) -> list[str]:
    """Build the harness with ``cc`` and ``flags``, run it (under ``runner``), and return its output lines
    past the first (the target's name): one line of output bits per product."""
    exe = tmp_path / name
    build = subprocess.run(
        [cc, *FLAGS, *flags, HARNESS, "-o", str(exe), "-lm"], capture_output=True, text=True
    )
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{name}: {run.stderr[-2000:]}"
    lines = run.stdout.splitlines()
    assert lines[0] == f"isa {name.split('-')[-1]} supported 1", lines[0]
    assert len(lines) > 100
    return lines[1:]


def _native(tmp_path) -> dict[str, list[str]]:
    """Each target as effx builds it on this CPU, and without its extras where it has some (AVX-512 without
    VNNI's int8 dot products: the byte multiply-adds of older AVX-512 CPUs)."""
    cc = build._compiler()
    assert cc is not None, "no C compiler: the kernels cannot be built here"
    out = {}
    for isa in kernels.isas():
        out[isa] = _harness(tmp_path, f"native-{isa}", cc, build._isa_flags(isa))
        if build._isa_flags(isa) != build._ISA_FLAGS[isa]:
            out[f"{isa} (plain)"] = _harness(tmp_path, f"plain-{isa}", cc, build._ISA_FLAGS[isa])
    return out


def test_every_native_target_keeps_the_contract_and_gives_the_same_bits(tmp_path):
    outputs = _native(tmp_path)
    assert outputs, "this machine runs no kernel target"
    first = next(iter(outputs.values()))
    for isa, lines in outputs.items():
        assert lines == first, f"{isa} gives other bits than {next(iter(outputs))}"


def test_aarch64_targets_under_emulation_give_the_native_bits(tmp_path):
    """NEON, compiled for aarch64 and run under qemu-aarch64 (CI installs both tools:
    `make install-cross`); on an aarch64 machine the native test above runs NEON itself."""
    if build._arch() == "aarch64":
        pytest.skip("aarch64 runs its targets natively (the test above)")
    if not (CROSS_CC and QEMU and os.path.isdir(SYSROOT)):
        if os.environ.get("CI"):
            pytest.fail(
                "CI must build and run the aarch64 kernels: `make install-cross` (gcc-aarch64-linux-gnu, qemu-user)"
            )
        pytest.skip("no aarch64 cross compiler or qemu-aarch64 (`make install-cross`)")
    # (the portable C under emulation takes minutes of emulated fmaf calls: its bits are checked natively)
    runner = (QEMU, "-L", SYSROOT)
    neon = _harness(tmp_path, "aarch64-neon", CROSS_CC, (), runner)
    assert neon == _harness(tmp_path, "native-generic", build._compiler(), build._ISA_FLAGS["generic"])
    # with the dot-product instructions (sdot) of ARMv8.2 CPUs
    assert neon == _harness(tmp_path, "dotprod-neon", CROSS_CC, ("-march=armv8.2-a+dotprod",), runner)


def test_kernels_load_on_every_cpu_that_has_a_vector_unit():
    """x86-64 with AVX2 (or AVX-512) and aarch64: the kernels must load, not fall back."""
    if not sys.platform.startswith("linux") or build._compiler() is None:
        pytest.skip("the kernels are built on Linux with a C compiler")
    arch, flags = build._arch(), kernels.cpu_features()
    for isa in kernels.isas():
        lib, why = build._load(isa)
        assert lib is not None, f"{isa}: {why}"
    if (arch == "x86_64" and {"avx2", "fma", "f16c"} <= flags) or arch == "aarch64":
        assert kernels.available(), kernels.unavailable_reason()
        assert kernels.isa() == kernels.isas()[0]
        assert kernels.describe().startswith(f"effx kernels {kernels.isa()} (")


def test_effx_kernels_chooses_a_target_or_none(monkeypatch):
    for isa in kernels.isas():
        monkeypatch.setenv("EFFX_KERNELS", isa)
        assert kernels.isa() == isa
    monkeypatch.setenv("EFFX_KERNELS", "off")
    assert not kernels.available() and kernels.unavailable_reason() == "disabled by EFFX_KERNELS"
    assert kernels.describe().startswith("effx kernels off: disabled by EFFX_KERNELS")
    monkeypatch.setenv("EFFX_KERNELS", "sse9")
    assert not kernels.available() and "not one of" in kernels.unavailable_reason()
    other = "neon" if build._arch() == "x86_64" else "avx2"
    monkeypatch.setenv("EFFX_KERNELS", other)
    assert not kernels.available() and "cannot run" in kernels.unavailable_reason()
    with pytest.raises(ValueError, match="cannot run"):
        with kernels.use(other):
            pass
    with pytest.raises(ValueError, match="must be one of"):
        with kernels.use("sse9"):
            pass


def test_kernels_are_never_loaded_from_a_folder_or_file_others_can_write(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    folder = shared / "kernels"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    monkeypatch.setenv("EFFX_CACHE", str(shared))
    source = tmp_path / "tiny.c"  # the same build path over a one-line source: seconds, not a full build
    source.write_text("int effx_tiny(void) { return 1; }\n")
    monkeypatch.setattr(build, "_SOURCE", source)
    first = build._build("generic")
    assert not folder.stat().st_mode & 0o022  # our own folder: made private before anything is built
    first.chmod(0o666)  # a library others could have rewritten: built again, not loaded
    planted = first.read_bytes()
    first.write_bytes(b"not a library")
    again = build._build("generic")
    assert again == first and again.read_bytes() == planted and not again.stat().st_mode & 0o022
    if hasattr(os, "getuid") and os.getuid() == 0:  # a folder of another user: refused
        os.chown(folder, 65534, 65534)
        with pytest.raises(OSError, match="owned by another user"):
            build._build("generic")
