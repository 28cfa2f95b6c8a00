"""The errors of ``effx bench``: a malformed sweep or setting, and data or a result file that cannot be
read."""

from __future__ import annotations

from ..errors import EffxError, PassConfigError


class BenchConfigError(PassConfigError):
    """A sweep or a bench setting is malformed (the message names the sweep and what is wrong)."""


class BenchDataError(EffxError, ValueError):
    """Benchmark data cannot be loaded (missing file, no "prompt" field, no rows), or a result file does not
    follow the effx-bench schema."""
