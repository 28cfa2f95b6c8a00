"""Writing an artifact folder without ever losing what was there.

An export writes into a new hidden folder beside the target, then swaps it in:

* the target must be a new path, an empty folder, or an effx artifact (a folder whose top holds
  ``plan.json``, ``seq2seq.json`` or ``cascade.json``); anything else, a file, the current directory or
  a folder above it is refused before any work (:func:`check_target`), and only ``overwrite=True`` replaces a
  folder that is not an artifact (never the current directory, a parent of it, or a file);
* an existing target is swapped with the new folder in one atomic ``renameat2(RENAME_EXCHANGE)`` where
  the system has it (Linux), so at every instant the path holds the old or the new complete artifact;
  elsewhere the old folder is first moved aside (``.NAME.effx-old-PID-*``), the new one renamed in, and
  the old one removed: a crash between the two renames leaves the old artifact aside, and the next export
  to the same path puts it back first;
* a failure or interruption while writing removes the new folder; what a killed process leaves
  (``.NAME.effx-new-PID-*``) is removed by the next export to the same path, once that process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import shutil
import tempfile
from pathlib import Path

from ..artifact import CASCADE_FILE, PLAN_FILE, SEQ2SEQ_FILE, TOKENIZER_DIR
from ..errors import ArtifactError

__all__ = ["check_target", "is_artifact", "replacing"]

MARKERS = (PLAN_FILE, SEQ2SEQ_FILE, CASCADE_FILE)


def is_artifact(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder that an effx export wrote (its top holds a plan or manifest file)."""
    path = Path(path)
    return path.is_dir() and any((path / m).is_file() for m in MARKERS)


def check_target(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """``out_dir`` as an absolute path if an export may write it, else :class:`ArtifactError` saying why:
    never the current directory or a folder above it, nor an existing file; a folder that holds anything but
    an effx artifact only with ``overwrite``."""
    given = Path(out_dir)
    out = given.expanduser().absolute()
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or cwd.is_relative_to(resolved):
        where = "the current directory" if resolved == cwd else "a folder above the current directory"
        raise ArtifactError(
            f"cannot export to {str(given)!r}: it is {where}; name a new folder, e.g. out/model"
        )
    if resolved.parent == resolved:
        raise ArtifactError(f"cannot export to {str(given)!r}: it is the root of the file system")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"cannot export to {str(given)!r}: it is a file, not a folder")
    if out.is_dir() and not overwrite and not is_artifact(out) and any(out.iterdir()):
        raise ArtifactError(
            f"cannot export to {str(given)!r}: it is a folder that holds other files, not an effx artifact; "
            "choose a new or empty folder (or pass overwrite=True / --force to replace it and all it holds)"
        )
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _leftovers(out: Path, kind: str) -> list[Path]:
    """Folders a dead process left beside ``out``: ``.NAME.effx-KIND-PID-*``."""
    prefix = f".{out.name}.effx-{kind}-"
    found = []
    if not out.parent.is_dir():
        return []
    for p in out.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        pid = p.name[len(prefix) :].split("-", 1)[0]
        if p.is_dir() and not p.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            found.append(p)
    return found


def _recover(out: Path) -> None:
    """Put back an old artifact that an interrupted replacement left aside (if the path is empty), and remove
    the half-written and superseded folders of exports that were killed."""
    for old in _leftovers(out, "old"):
        if not out.exists() and is_artifact(old):
            old.rename(out)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for new in _leftovers(out, "new"):
        shutil.rmtree(new, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.cache
def _renameat2():
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or the file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(new: Path, out: Path) -> None:
    """Put the complete folder ``new`` at ``out``, the old one (if any) removed after."""
    if not out.exists():
        new.rename(out)
        return
    if _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # now the old artifact
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.effx-old-{os.getpid()}-", dir=out.parent))
    aside.rmdir()
    out.rename(aside)
    try:
        new.rename(out)
    except BaseException:
        aside.rename(out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def replacing(out_dir: str | os.PathLike, tokenizer=None, *, overwrite: bool = False):
    """A new folder beside ``out_dir`` to write an artifact into, ``tokenizer`` already saved under
    ``tokenizer/`` (so that the manifest written into it lists the tokenizer's checksums); on success it
    takes ``out_dir``'s place, on any failure it is removed and ``out_dir`` is left as it was. ``out_dir`` is
    checked first (:func:`check_target`)."""
    out = check_target(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _recover(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.effx-new-{os.getpid()}-", dir=out.parent))
    try:
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)  # an artifact folder as any other folder the user makes (mkdtemp: 0700)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        yield tmp
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
