"""The typed errors effx raises. Every message says what is wrong and what fixes it."""

from __future__ import annotations


class EffxError(Exception):
    """Base class of every error effx raises on purpose."""


class UnsupportedModelError(EffxError):
    """The model (its class, an op, or a step of capture) is not supported."""


class ModelLoadError(EffxError):
    """A model could not be found or loaded (missing package, wrong path, missing extra)."""


class PassError(EffxError):
    """A pass failed, was misordered, or broke the promise it states."""


class PassPreconditionError(PassError):
    """A pass cannot apply to the Program it is given (an earlier pass conflicts with it, or what it needs
    is missing); raised before the pass runs."""


class PassConfigError(PassError, ValueError):
    """A pass was given an invalid argument, or a pipeline string is malformed."""


class PlanError(EffxError):
    """A plan is malformed, inconsistent, or from an unknown schema version."""


class ArtifactError(EffxError):
    """An exported artifact is missing a file, fails its checksum, or is otherwise unusable."""


class GenerationInputError(EffxError, ValueError):
    """The inputs of generate() are invalid (empty prompt, bad mask, bad generation settings)."""


class BackendCapabilityError(EffxError):
    """The plan asks for something this backend cannot run (e.g. per-prompt core neurons on ONNX Runtime)."""


class CascadeError(EffxError):
    """Two Programs cannot run as a cascade (different vocabularies, a pass whose runtime the cascade loop does
    not run), or its gate has no threshold yet."""


class CascadeConfigError(CascadeError, ValueError):
    """A cascade or its gate was given an invalid argument (mode, draft length, percentile, threshold, share)."""


class DataLoadError(EffxError):
    """An offline data set could not be found or read (missing package, unknown split, malformed file)."""
