"""Recurrent (Mamba) programs, and early exits on them.

``effx.transform_mamba(model, passes=[EarlyExit(...)])`` captures a ``MambaForCausalLM``
(:func:`effx.capture.capture_mamba`: the conv and SSM states are the cache) and adds exits after chosen
layers: the final norm and LM head on the layer's hidden state, with a confidence (``softmax-max``,
``top2-gap`` or ``entropy``). ``lossy`` lets a token leave at the first exit that is confident enough and
applies the layers it skipped to the state later, with the next token that goes deeper, so every state is
the dense one; ``self-speculative`` drafts with the shallowest exit, verifies with the rest of the model and
rolls the states back to the last kept token: the output is the dense greedy output. The loop is
:mod:`effx.runtime.recurrent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .errors import GenerationInputError, PassError
from .fx import export_function
from .passes import EarlyExit
from .passes.base import PassReport, register_family_apply
from .passes.early_exit import MEASURES
from .runtime.inputs import check_arguments, check_ids, check_max_new, token_id, token_ids
from .runtime.recurrent import CHUNK, States, decode_row, generate_dense, prefill, run_layer
from .runtime.stats import DecodeStats, collecting

__all__ = ["RecurrentInfo", "RecurrentProgram", "apply_early_exit"]


@dataclass(frozen=True)
class RecurrentInfo:
    family: ClassVar[str] = "recurrent"

    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    state_size: int
    conv_kernel: int
    vocab_size: int
    dtype: str


@dataclass(frozen=True)
class RecurrentExits:
    """Exit layers and thresholds, the run-time mode and the exit stage ``(hidden) -> (logits, confidence)``."""

    thresholds: dict[int, float]
    mode: str
    draft: int
    measure: str
    stage: torch.fx.GraphModule


class RecurrentProgram:
    """Stages ``embed``, ``layers[i]`` and ``head``, and optionally exits (:class:`RecurrentExits`)."""

    def __init__(
        self,
        embed,
        layers,
        head,
        info: RecurrentInfo,
        *,
        eos_token_ids=(),
        pad_token_id=None,
        exits: RecurrentExits | None = None,
        reports=(),
        passes=(),
    ):
        self.embed = embed
        self.layers = list(layers)
        self.head = head
        self.info = info
        self.eos_token_ids = tuple(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.exits = exits
        self.reports = tuple(reports)
        self.passes = tuple(passes)  # the passes applied, as JSON records (Pass.to_json)

    def _replace(self, **changes) -> RecurrentProgram:
        fields = dict(
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            exits=self.exits,
            reports=self.reports,
            passes=self.passes,
        )
        fields.update(changes)
        return RecurrentProgram(self.embed, self.layers, self.head, self.info, **fields)

    def with_exits(self, exits: RecurrentExits) -> RecurrentProgram:
        return self._replace(exits=exits)

    def with_pass(self, record: dict[str, Any], report: PassReport) -> RecurrentProgram:
        """The same program with a pass recorded and its report kept (the PassManager's job)."""
        return self._replace(passes=self.passes + (record,), reports=self.reports + (report,))

    def __repr__(self) -> str:
        exits = "" if self.exits is None else f", exits={sorted(self.exits.thresholds)} ({self.exits.mode})"
        return f"RecurrentProgram({self.info.architecture}, {self.info.num_layers} layers{exits})"

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.info.dtype)

    def run(self, name: str, *args) -> tuple:
        if name == "embed":
            return self.embed(*args)
        if name == "head":
            return self.head(*args)
        if name == "exit" and self.exits is not None:
            return self.exits.stage(*args)
        if name.startswith("layer."):
            return self.layers[int(name.removeprefix("layer."))](*args)
        raise KeyError(f"no stage named {name!r}")

    def new_states(self, batch: int):
        """Zero states for ``batch`` rows (:class:`effx.runtime.recurrent.States`)."""
        import array_api_compat.torch as xp

        i = self.info
        return States.zeros(
            xp, batch, i.num_layers, i.intermediate_size, i.conv_kernel, i.state_size, self.dtype
        )

    def logits(self, input_ids, attention_mask=None):
        """Logits ``[batch, seq, vocab]`` of every position (a dense run in chunks, from zero state)."""
        import array_api_compat.torch as xp

        valid = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        states = self.new_states(input_ids.shape[0])
        out = []
        with torch.inference_mode():
            for start in range(0, input_ids.shape[1], CHUNK):
                hidden = self.embed(input_ids[:, start : start + CHUNK])[0]
                v = xp.astype(valid[:, start : start + CHUNK], self.dtype)
                for i in range(self.info.num_layers):
                    hidden = run_layer(self.run, states, i, hidden, v)[0]
                out.append(self.head(hidden)[0])
        return torch.cat(out, dim=1)

    def prefill_states(self, input_ids):
        """The states after a dense run over ``input_ids`` (no padding): what any decode of these tokens
        must leave behind."""
        import array_api_compat.torch as xp

        states = self.new_states(input_ids.shape[0])
        with torch.inference_mode():
            prefill(
                self.run, xp, states, input_ids, torch.ones_like(input_ids), self.info.num_layers, self.dtype
            )
        return states

    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        max_new_tokens: int | None = None,
        eos_token_id=None,
        pad_token_id: int | None = None,
        stats: dict | None = None,
        **kwargs,
    ):
        """Greedy decoding like ``model.generate``: ``[batch, prompt + new]`` (left-padded prompts; rows that
        stopped are padded). With exits, each row decodes on its own; ``stats`` gets ``exits`` (tokens per
        layer they left after) and, self-speculative, ``drafted``/``accepted``/``rounds``; ``states`` the rows'
        final states and ``run_tokens`` the new tokens they hold (every one run through every layer; a round
        may have run past the last token returned)."""
        import array_api_compat.torch as xp

        given = check_arguments(
            kwargs,
            implemented=("use_cache", "bos_token_id", "max_length"),
            front_end="Mamba generate (greedy)",
        )
        ids, mask, max_new_tokens, eos, pad = self._generation_inputs(
            xp, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, given.get("max_length")
        )
        with torch.inference_mode():
            if self.exits is not None:
                return self._generate_with_exits(xp, self.exits, ids, mask, max_new_tokens, eos, pad, stats)
            states = self.new_states(ids.shape[0])
            new = generate_dense(
                self.run,
                xp,
                states,
                ids,
                mask.bool(),
                num_layers=self.info.num_layers,
                max_new=max_new_tokens,
                eos=eos,
                pad=pad,
                dtype=self.dtype,
            )
            with collecting(stats) as typed:
                if typed is not None:
                    typed.set(states=[states])
            return torch.cat([ids, new], dim=1)

    def _generation_inputs(
        self, xp, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, max_length
    ):
        """:meth:`generate`'s arguments checked and defaulted: ``(ids, mask, max_new, eos, pad)``; a row with
        no tokens or padding after tokens (recurrent models take left-padded batches) is refused."""

        vocab = self.info.vocab_size
        ids, mask = check_ids(xp, input_ids, attention_mask, vocab)
        if bool((mask.sum(1) == 0).any()):
            raise GenerationInputError("a row of attention_mask has no tokens")
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise GenerationInputError("recurrent models take left-padded batches: padding must come first")
        if max_new_tokens is None:
            max_new_tokens = max_length - ids.shape[1] if max_length is not None else 20
        max_new_tokens = check_max_new(max_new_tokens)
        eos = (
            list(self.eos_token_ids)
            if eos_token_id is None
            else token_ids("eos_token_id", eos_token_id, vocab)
        )
        if pad_token_id is not None:
            pad = token_id("pad_token_id", pad_token_id, vocab)
        else:
            pad = self.pad_token_id if self.pad_token_id is not None else 0
        return ids, mask, max_new_tokens, eos, pad

    def _generate_with_exits(
        self, xp, e: RecurrentExits, ids, mask, max_new_tokens: int, eos, pad: int, stats
    ):
        """:meth:`generate` with exits: each row prefilled and decoded on its own (:func:`decode_row`), the
        rows' tokens cut at their first stop token and padded to one width."""

        n, dt = self.info.num_layers, self.dtype
        rows, all_states = [], []
        with collecting(stats) as typed:
            record = DecodeStats() if typed is None else typed
            for r in range(ids.shape[0]):
                prompt = ids[r : r + 1, mask[r].bool()]
                states = self.new_states(1)
                hidden = prefill(self.run, xp, states, prompt, torch.ones_like(prompt), n, dt)
                first = int(self.head(hidden)[0][0, -1].argmax())
                rows.append(
                    decode_row(
                        self.run,
                        xp,
                        states,
                        first,
                        num_layers=n,
                        exits=e.thresholds,
                        mode=e.mode,
                        draft=e.draft,
                        max_new=max_new_tokens,
                        eos=eos,
                        dtype=dt,
                        stats=record,
                    )
                )
                all_states.append(states)
                record.set(run_tokens=[*(record.run_tokens or []), rows[-1][:-1]])
                rows[-1] = _cut(rows[-1][:max_new_tokens], eos)
            record.set(states=all_states)
        width = max(len(t) for t in rows)
        new = torch.full((ids.shape[0], width), pad, dtype=torch.long)
        for r, tokens in enumerate(rows):
            new[r, : len(tokens)] = torch.tensor(tokens)
        return torch.cat([ids, new], dim=1)


def _cut(tokens: list[int], eos) -> list[int]:
    """``tokens`` up to and including the first stop token."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@register_family_apply(EarlyExit, "recurrent")
def apply_early_exit(p: EarlyExit, program: RecurrentProgram) -> tuple[RecurrentProgram, PassReport]:
    """EarlyExit ``p`` on a recurrent program, and its report: exits after ``p``'s layers (the shared head),
    with its measure, thresholds, mode and draft length. What only attention programs have is refused."""

    arch = program.info.architecture
    where = f"on {arch} (a recurrent state-space model)"
    if program.exits is not None:
        raise PassError(f"early-exit {where}: the program already has exits")
    if p.measure == "saturation":
        raise PassError(
            f"early-exit measure 'saturation' is not supported {where}: use softmax-max, top2-gap or entropy"
        )
    if p.head != "shared" or p.heads:
        raise PassError(f"early-exit trained heads are not supported {where}: exits use the shared head")
    if p.kv != "deferred":
        raise PassError(
            f"early-exit kv={p.kv!r} {where}: there is no KV cache; skipped layers' states are deferred"
        )
    try:
        thresholds = p.thresholds_by_layer(program.info.num_layers)
    except PassError as e:
        raise type(e)(f"{e} {where}") from e
    measure = MEASURES[p.measure]
    head = program.head

    def exit_stage(hidden):
        logits = head(hidden)[0]
        return logits, measure(logits, hidden, hidden)

    d = program.info.hidden_size
    stage = export_function(
        exit_stage, (torch.randn(2, 3, d, dtype=program.dtype),), ({0: "batch", 1: "seq"},)
    )
    exits = RecurrentExits(thresholds=thresholds, mode=p.mode, draft=p.draft, measure=p.measure, stage=stage)
    report = p.new_report()
    for x, t in exits.thresholds.items():
        report.change(f"layer.{x}", f"exit after it ({p.measure} >= {t:g}, {p.mode})")
    return program.with_exits(exits), report
