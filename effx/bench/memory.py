"""The process's resident memory around one call, for ``effx bench``'s peak-memory figures: the peak
resident set size (Linux ``VmHWM``, reset before each call through ``/proc/self/clear_refs``; elsewhere
``ru_maxrss``, the peak over the process's life) and the resident size before the call."""

from __future__ import annotations

import os
import re
import resource
import sys


def rss_reset() -> bool:
    """Reset the peak-RSS counter (Linux); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` field in MB; None where the file or the field is missing."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"{field}:\s+(\d+)\s+kB", f.read())
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def peak_rss_mb() -> float:
    """The peak resident set size in MB: ``VmHWM`` since the last :func:`rss_reset` (Linux), else the
    process's life-time peak (``ru_maxrss``)."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float:
    """The resident set size now in MB (``VmRSS``; the peak where it is unavailable)."""
    rss = _status_mb("VmRSS")
    return peak_rss_mb() if rss is None else rss


def memory_method() -> str:
    """How :func:`peak_rss_mb` measures on this platform, in words (``settings.memory`` of a result)."""
    if rss_reset() and os.path.exists("/proc/self/status"):
        return "peak RSS per generate call (Linux VmHWM, reset through /proc/self/clear_refs)"
    return "ru_maxrss: the peak RSS over the process's life (no per-call reset on this platform)"
