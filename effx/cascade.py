"""Cascades: a small Program decodes, and a large one that shares its vocabulary decides where it must.

::

    small, large = effx.transform(small_model), effx.transform(large_model)
    casc = effx.cascade(small, large, gate=effx.EntropyGate(percentile=81))   # the large model for ~19%
    casc, calib = casc.calibrate(texts, tokenizer)                              # threshold from the percentile
    out = casc.generate(ids, attention_mask=mask, max_new_tokens=64)
    casc.report()                                                               # share of tokens per model

    exact = effx.cascade(small, large, mode="verified", draft=4)   # speculative: the large model's greedy tokens

Two modes (see :mod:`effx.runtime.cascade` for the decode loops):

* ``"gated"`` (lossy): the small model proposes each token; where its gate fires (entropy at or above the
  threshold, or top probability at or below it) the large model decides that token, after catching up on
  its KV cache in one batched forward over the tokens it has not seen.
* ``"verified"`` (lossless): the small model drafts up to ``draft`` tokens and the large model verifies them
  in one pass; the output is token-identical to the large model's greedy decoding. A gate, if given, ends a
  draft early at a token the small model is unsure of.

Both decode greedily. The gate's threshold comes from calibration text, as a percentile of the small
model's measure there: ``EntropyGate(percentile=81)`` hands the 19% most uncertain tokens to the large model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import TextIO

import torch

from .data import token_chunks
from .errors import CascadeConfigError, CascadeError, GenerationInputError
from .gates import EntropyGate, Gate, MaxProbGate
from .program import Program
from .runtime.cascade import decode
from .runtime.forward import forward_logits
from .runtime.inputs import check_arguments
from .runtime.loop import check_inputs, stop_and_pad
from .runtime.torch_backend import XP

__all__ = ["Cascade", "EntropyGate", "Gate", "GateCalibration", "MaxProbGate", "cascade"]

MODES = ("gated", "verified")


@dataclass(frozen=True)
class GateCalibration:
    """What calibration found: the threshold for ``share``, and the share it gives on the calibration text
    (above ``share`` only where tokens tie at the threshold)."""

    gate: Gate
    share: float
    threshold: float
    observed_share: float
    tokens: int

    def format(self) -> str:
        return (
            f"{self.gate.name} gate calibrated on {self.tokens} tokens for a large-model share of {self.share:.1%}: "
            f"threshold {self.threshold:.4g}, observed share {self.observed_share:.1%}"
        )


def _unsupported(program: Program, role: str) -> None:
    if program.exits:
        raise CascadeError(
            f"the {role} Program has exit stages (EarlyExit, mode {program.plan.decode_mode!r}): the cascade runs every "
            "layer of both models and cannot honour them; transform that model without EarlyExit "
            "(NeuronMask, TokenDrop and VocabReduce(where='head') are supported)"
        )


def cascade(
    small: Program,
    large: Program,
    gate: Gate | None = None,
    *,
    mode: str = "gated",
    draft: int = 4,
    adaptive: bool = True,
) -> Cascade:
    """A :class:`Cascade` of two Programs with one vocabulary (e.g. two sizes of one model family).

    ``gate`` (an :class:`EntropyGate` or :class:`MaxProbGate`) is required in ``"gated"`` mode and optional in
    ``"verified"`` mode, where it ends a draft early. ``draft`` (verified mode) is the longest draft; with
    ``adaptive`` the length follows the acceptance of each round within ``[1, draft]``.
    """
    return Cascade(small, large, gate, mode=mode, draft=draft, adaptive=adaptive)


@dataclass
class _Totals:
    small_tokens: int = 0
    large_tokens: int = 0
    calls: int = 0
    extra: dict = field(default_factory=dict)


class Cascade:
    """Two Programs decoding together; see :func:`cascade` and the module docstring."""

    def __init__(
        self,
        small: Program,
        large: Program,
        gate: Gate | None = None,
        *,
        mode: str = "gated",
        draft: int = 4,
        adaptive: bool = True,
    ):
        for role, prog in (("small", small), ("large", large)):
            if not isinstance(prog, Program):
                raise CascadeConfigError(
                    f"the {role} model must be an effx Program (effx.transform(model)), got {type(prog).__name__}"
                )
            _unsupported(prog, role)
        vs, vl = small.info.vocab_size, large.info.vocab_size
        if vs != vl:
            raise CascadeError(
                f"the small model's vocabulary has {vs} tokens and the large model's {vl}: a cascade passes token "
                "ids between them, so both must use the same tokenizer"
            )
        if mode not in MODES:
            raise CascadeConfigError(f"unknown cascade mode {mode!r}; choose one of {MODES}")
        if gate is not None and not isinstance(gate, Gate):
            raise CascadeConfigError(
                f"gate must be an EntropyGate or a MaxProbGate, got {type(gate).__name__}"
            )
        if mode == "gated" and gate is None:
            raise CascadeConfigError(
                "gated mode needs a gate, e.g. gate=effx.EntropyGate(percentile=81) (then calibrate) or "
                "effx.EntropyGate(threshold=2.0)"
            )
        if isinstance(draft, bool) or not isinstance(draft, int) or draft < 1:
            raise CascadeConfigError(f"draft must be an integer >= 1 (the longest draft), got {draft!r}")
        limit = min(small.info.max_positions, large.info.max_positions) - 1
        if draft > limit:  # a draft longer than the context sizes caches for nothing
            raise CascadeConfigError(
                f"draft={draft} exceeds the models' max_positions - 1 ({limit}): a draft fits in the context"
            )
        if not isinstance(adaptive, bool):
            raise CascadeConfigError(f"adaptive must be True or False, got {adaptive!r}")
        self.small, self.large, self.gate = small, large, gate
        self.mode, self.draft, self.adaptive = mode, draft, adaptive
        self._totals = _Totals()

    def with_gate(self, gate: Gate) -> Cascade:
        """The same cascade with another gate (its report starts afresh)."""
        return Cascade(self.small, self.large, gate, mode=self.mode, draft=self.draft, adaptive=self.adaptive)

    # -- decoding --------------------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        do_sample: bool = False,
        stats: dict | None = None,
        streamer=None,
        on_token=None,
        progress: bool = False,
        **kwargs,
    ) -> torch.LongTensor:
        """Greedy generation with the cascade; inputs and output as :meth:`Program.generate`.

        ``input_ids [batch, prompt]`` (left-padded for batches, with ``attention_mask``); returns
        ``[batch, prompt + new]`` with rows that stopped early filled with ``pad_token_id``. Defaults for
        ``max_new_tokens``, ``eos_token_id`` and ``pad_token_id`` come from the large model (``eos_token_id=[]``
        turns stopping off); the models' own sampling settings are not used: cascades decode greedily.
        ``stats`` (a dict) receives what the cascade decided (see :func:`effx.runtime.cascade.decode`).
        """

        if do_sample:
            raise GenerationInputError(
                f"a cascade decodes greedily ({self.mode} mode compares greedy choices); call it with do_sample=False"
            )
        given = check_arguments(
            kwargs,
            implemented=("use_cache", "bos_token_id", "max_length"),
            front_end="Cascade.generate (greedy)",
        )
        if self.gate is not None:
            self.gate.require_threshold()
        max_new = self._max_new(input_ids, max_new_tokens, given.get("max_length"))
        limit = min(self.small.info.max_positions, self.large.info.max_positions)
        vocab = self.large.info.vocab_size
        input_ids, attention_mask = check_inputs(
            XP, input_ids, attention_mask, max_new, limit, vocab_size=vocab, what="the cascade's models"
        )
        eos, pad = stop_and_pad(self.large.plan, eos_token_id, pad_token_id, vocab)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_new, desc=f"cascade ({self.mode})", unit="tok")
        run = {} if stats is None else stats
        tokens, _, _ = decode(
            self.small,
            self.large,
            input_ids,
            attention_mask,
            mode=self.mode,
            max_new=max_new,
            eos=eos,
            pad=pad,
            fires=self.gate,
            draft=self.draft,
            adaptive=self.adaptive,
            stats=run,
            streamer=streamer,
            on_token=on_token,
            bar=bar,
        )
        if bar is not None:
            bar.close()
        self._tally(run)
        return tokens

    def _max_new(self, input_ids, max_new_tokens: int | None, max_length: int | None) -> int | None:
        """The tokens to generate: ``max_new_tokens``, else the large model's generation config's (unless
        ``max_length`` is given), else ``max_length`` (given, the config's, or 20) less the prompt."""
        config = self.large.generation_config
        max_new = max_new_tokens
        if max_new is None and max_length is None:
            max_new = getattr(config, "max_new_tokens", None)
        if max_new is None and getattr(input_ids, "ndim", None) == 2:
            max_length = max_length or getattr(config, "max_length", None) or 20
            max_new = max_length - input_ids.shape[1]
        return max_new

    def _tally(self, run: dict) -> None:
        """Add one call's decisions (``run``, the stats :func:`effx.runtime.cascade.decode` filled) to the
        cascade's running totals, which its report shows."""
        t = self._totals
        t.small_tokens += run["small_tokens"]
        t.large_tokens += run["large_tokens"]
        t.calls += 1
        for key in ("large_steps", "catch_up_tokens", "overridden", "drafted", "accepted", "rounds"):
            if key in run:
                t.extra[key] = t.extra.get(key, 0) + run[key]

    # -- calibration -----------------------------------------------------------------------------------
    def calibrate(
        self,
        texts,
        tokenizer,
        share: float | None = None,
        *,
        seq_len: int = 128,
        max_tokens: int = 2048,
        progress: bool = True,
    ) -> tuple[Cascade, GateCalibration]:
        """A cascade whose gate fires on ``share`` of the tokens of ``texts`` (default: the share that the
        gate's ``percentile`` stands for), and what calibration found.

        The percentile method: the small model reads the text teacher-forced in chunks of ``seq_len`` tokens
        (at most ``max_tokens`` in all), the gate's measure is taken at every position, and the threshold is
        the value at that percentile of the measure. With exact KV a position's measure depends only on the
        text before it, so these are the values the gate sees when decoding the same text.
        """

        if self.gate is None:
            raise CascadeConfigError("this cascade has no gate to calibrate; give gate= to effx.cascade")
        if share is None:
            if self.gate.percentile is None:
                raise CascadeConfigError(
                    "calibrate needs share= (the share of tokens for the large model) or a gate with a percentile"
                )
            share = self.gate.share_of_percentile()
        elif isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise CascadeConfigError(
                f"share must be in [0, 1] (of tokens for the large model), got {share!r}"
            )
        chunks = _chunks(tokenizer, texts, seq_len, max_tokens)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="calibrate gate", unit="chunk")
        with torch.inference_mode():
            measures = torch.cat([self.gate.measure(forward_logits(self.small, c)[0]) for c in chunks])
        threshold = self.gate.threshold_for_share(measures, share)
        gate = replace(
            self.gate, threshold=threshold, percentile=100 * (1 - share if self.gate.fires_high else share)
        )
        observed = float(gate.fires_at(measures, threshold).double().mean())
        report = GateCalibration(gate, float(share), threshold, observed, measures.numel())
        return self.with_gate(gate), report

    # -- reporting -------------------------------------------------------------------------------------
    def shares(self) -> dict[str, float]:
        """The share of tokens each model decided, over every ``generate`` call so far."""
        t = self._totals
        total = t.small_tokens + t.large_tokens
        if total == 0:
            return {"small": 0.0, "large": 0.0}
        return {"small": t.small_tokens / total, "large": t.large_tokens / total}

    def report(self, file: TextIO | None = sys.stdout) -> str:
        """Write (to ``file``, unless None) and return what the cascade did over every ``generate`` call:
        the share of tokens each model decided, and the work of the large model."""
        t = self._totals
        shares = self.shares()
        if self.gate is None:
            gate = "no gate"
        elif self.gate.threshold is None:
            gate = f"{self.gate.name} gate, not calibrated"
        else:
            gate = f"{self.gate.name} gate, threshold {self.gate.threshold:.4g}"
        lines = [
            f"cascade {self.mode} ({gate}): {self.small!r} -> {self.large!r}",
            f"  {t.calls} generate call(s), {t.small_tokens + t.large_tokens} tokens: "
            f"small {shares['small']:.1%} ({t.small_tokens}), large {shares['large']:.1%} ({t.large_tokens})",
        ]
        e = t.extra
        if self.mode == "gated" and t.calls:
            lines.append(
                f"  large model ran at {e['large_steps']} step(s), catching up on {e['catch_up_tokens']} token(s); "
                f"it changed {e['overridden']} of the small model's tokens"
            )
        if self.mode == "verified" and t.calls:
            rate = e["accepted"] / e["drafted"] if e["drafted"] else 0.0
            lines.append(
                f"  {e['rounds']} round(s): {e['accepted']} of {e['drafted']} drafted tokens accepted ({rate:.1%})"
            )
        text = "\n".join(lines)
        if file is not None:
            file.write(text + "\n")
        return text

    def __repr__(self) -> str:
        return f"Cascade({self.mode}, small={self.small!r}, large={self.large!r}, gate={self.gate!r})"


def _chunks(tokenizer, texts, seq_len: int, max_tokens: int) -> list[torch.Tensor]:
    """The calibration text as ``[1, seq_len]`` chunks of token ids (documents joined by end-of-sequence)."""

    try:
        return token_chunks(tokenizer, texts, seq_len, max_tokens)
    except ValueError as e:
        raise CascadeConfigError(f"calibration: {e}; give more text or a smaller seq_len") from None
