"""Cascade gates: rules on the small model's next-token distribution that hand a token to the large model.

Torch-free: a gate measures logits of any array API namespace, so the torch cascade (``effx.cascade``) and
an ONNX cascade artifact (``effx.runtime.onnx``) decide with the same code.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from .arrays import namespace, softmax
from .errors import CascadeConfigError, CascadeError

__all__ = ["GATES", "EntropyGate", "Gate", "MaxProbGate"]


def _check_number(name: str, value, low: float, high: float, gate: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise CascadeConfigError(f"{gate}: {name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise CascadeConfigError(f"{gate}: {name} must be in [{low:g}, {high:g}], got {value!r}")


@dataclass(frozen=True)
class Gate(ABC):
    """A rule on the small model's next-token distribution that hands the token to the large model.

    ``threshold`` is the decision value; ``percentile`` (0-100) says where calibration puts it in the
    distribution of the small model's measure on calibration text. A gate needs a threshold to decode, and
    either one to be calibrated.
    """

    threshold: float | None = None
    percentile: float | None = None

    name = "gate"
    fires_high = True  # fires when the measure is >= threshold (else <=)
    threshold_range = (0.0, math.inf)

    def __post_init__(self):
        low, high = self.threshold_range
        _check_number("threshold", self.threshold, low, high, type(self).__name__)
        _check_number("percentile", self.percentile, 0.0, 100.0, type(self).__name__)
        if self.threshold is None and self.percentile is None:
            raise CascadeConfigError(
                f"{type(self).__name__} needs a threshold or a percentile (to calibrate the threshold from text)"
            )

    @abstractmethod
    def measure(self, logits):
        """The gate's measure of each distribution in ``logits [..., vocab]`` (float32, ``[...]``)."""

    def fires_at(self, measure, threshold: float):
        return measure >= threshold if self.fires_high else measure <= threshold

    def require_threshold(self) -> float:
        if self.threshold is None:
            raise CascadeError(
                f"{self!r} has no threshold yet: calibrate the cascade on text "
                "(casc, report = casc.calibrate(texts, tokenizer)) or give threshold="
            )
        return self.threshold

    def __call__(self, logits):
        """Which rows of ``logits [batch, vocab]`` go to the large model (bool ``[batch]``)."""
        return self.fires_at(self.measure(logits), self.require_threshold())

    def share_of_percentile(self) -> float:
        """The share of tokens that a threshold at ``percentile`` hands to the large model."""
        p = self.percentile / 100
        return 1 - p if self.fires_high else p

    def threshold_for_share(self, measures, share: float) -> float:
        """The threshold at which the gate fires on ``share`` of ``measures`` (ties fire together)."""
        xp = namespace(measures)
        flat = xp.reshape(xp.astype(measures, xp.float64), (-1,))
        count = round(share * flat.shape[0])
        ranked = xp.sort(flat, descending=self.fires_high)
        if count == 0:  # fire on nothing
            return math.inf if self.fires_high else 0.0
        value = float(ranked[count - 1])
        low, high = self.threshold_range
        return min(max(value, low), high)


@dataclass(frozen=True)
class EntropyGate(Gate):
    """Fires when the entropy (nats) of the small model's next-token distribution is at or above
    ``threshold``: 0 always fires, ``math.inf`` never does. ``percentile=81`` calibrates the threshold to the
    81st percentile of the entropy on calibration text, so about 19% of tokens go to the large model."""

    name = "entropy"
    fires_high = True
    threshold_range = (0.0, math.inf)

    def measure(self, logits):
        xp = namespace(logits)
        p = softmax(xp, logits)
        # 0 log 0 = 0: reduced heads give -inf logits, whose p log p would be nan
        terms = xp.where(p > 0, -p * xp.log(xp.where(p > 0, p, xp.ones_like(p))), xp.zeros_like(p))
        return xp.sum(terms, axis=-1)


@dataclass(frozen=True)
class MaxProbGate(Gate):
    """Fires when the small model's top next-token probability is at or below ``threshold`` (in [0, 1]):
    0 never fires, 1 always does. ``percentile=19`` calibrates the threshold to the 19th percentile of the top
    probability on calibration text, so about 19% of tokens go to the large model."""

    name = "max-prob"
    fires_high = False
    threshold_range = (0.0, 1.0)

    def measure(self, logits):
        xp = namespace(logits)
        return xp.max(softmax(xp, logits), axis=-1)


# gate name (as artifacts record it) -> class
GATES: dict[str, type[Gate]] = {g.name: g for g in (EntropyGate, MaxProbGate)}
