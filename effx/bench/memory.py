"""The process's resident memory around one call, for ``effx bench``'s peak-memory figures: the peak
resident set size (Linux ``VmHWM``, reset before each call through ``/proc/self/clear_refs``; elsewhere
``ru_maxrss``, the peak over the process's life) and the resident size before the call."""

from __future__ import annotations

import os
import re
import resource
import sys


def _rss_reset() -> bool:
    """Reset the peak-RSS counter (Linux); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"{field}:\s+(\d+)\s+kB", f.read())
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def _peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _rss_mb() -> float:
    rss = _status_mb("VmRSS")
    return _peak_rss_mb() if rss is None else rss


def _memory_method() -> str:
    if _rss_reset() and os.path.exists("/proc/self/status"):
        return "peak RSS per generate call (Linux VmHWM, reset through /proc/self/clear_refs)"
    return "ru_maxrss: the peak RSS over the process's life (no per-call reset on this platform)"
