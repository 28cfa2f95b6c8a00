"""effx as an lm-evaluation-harness model: ``lm_eval --model effx --model_args ... --tasks ...``.

    lm_eval --model effx \\
        --model_args model=smollm2-135m,passes="early-exit(layers=10,20 thresholds=0.9)" \\
        --include_path effx/lm_eval_tasks --tasks effx_aclsum_title --limit 20

(a pipeline's arguments in parentheses there: lm-eval reads any model argument holding a brace as JSON.)

Model arguments (``--model_args key=value,...``):

* ``model``: a known model name or a local HF model directory (as ``effx generate --model``);
* ``passes``: a pipeline string (as ``effx generate --passes``); the default is the dense Program;
* ``backend``: ``torch`` (the default) or ``onnx``; ``artifact=DIR`` runs an artifact written by
  ``effx export`` on ONNX Runtime (``backend=onnx`` is then implied; ``model`` and ``passes`` come from the
  artifact);
* ``kernels``: ``fast`` or ``reference`` (torch), as ``--kernels`` of the effx CLI;
* ``max_length``: the longest window scored or generated in (default: the model's positions, at most
  4096); ``max_gen_toks``: the default generation length (256); ``chunk``: positions per scoring step.

``loglikelihood`` scores each continuation the way the Program decodes it (:mod:`effx.runtime.score`):
with lossy early exits every token's log-probability comes from the head that produced it at that
position; lossless drafting scores as the dense Program. ``generate_until`` runs the Program's own
``generate`` (left-padded batches of ``--batch_size``), greedy unless the task samples; a row stops once
its text holds a stop sequence, and the text is cut there. The run-time decisions (exit depths, accepted
drafts, kept prompt tokens, reduced-head fallbacks) are summed over the run, printed after each request type, and written into the
results' ``config`` (``effx_stats``) by ``get_model_info``.

lm-eval 0.4 has no plugin discovery for models: effx installs a start-up hook (``effx-lm-eval.pth`` and
``_effx_lm_eval.py`` in site-packages) that registers ``effx`` when lm-eval loads its model registry.
Importing this module registers it too (for the Python API, ``lm_eval.simple_evaluate(model="effx")``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from . import frontend
from .errors import EffxError
from .runtime.onnx import OnnxGenerator
from .runtime.score import score
from .runtime.stats import DecodeStats, drafts_part, fallbacks_part

__all__ = ["TASKS_DIR", "EffxLM", "RunTotals", "format_stats"]

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
"""effx's local lm-eval tasks (``--include_path`` this directory); they read data that ships offline."""

_IGNORED = {"trust_remote_code", "max_batch_size"}  # lm-eval passes these to every model


class HarnessError(EffxError):
    """Bad model arguments for the lm-eval model."""


def _cli() -> bool:
    """Whether this process is lm-eval's command line (where an error should be one line, not a traceback)."""
    return Path(sys.argv[0]).name in ("lm_eval", "lm-eval") or sys.argv[0].endswith(
        os.path.join("lm_eval", "__main__.py")
    )


def format_stats(totals: dict) -> str:
    """One paragraph about what the runtime decided over a run (see :meth:`EffxLM.stats`)."""
    parts = [f"{totals.get('scored', 0)} positions scored, {totals.get('generated', 0)} tokens generated"]
    depths = totals.get("exit_depths") or {}
    if depths:
        count = sum(depths.values())
        mean = sum(int(d) * c for d, c in depths.items()) / count
        layers = totals["layers"]
        shares = ", ".join(
            f"{c / count:.0%} " + (f"left at layer {int(d) - 1}" if int(d) < layers else "ran every layer")
            for d, c in sorted(depths.items(), key=lambda x: int(x[0]))
        )
        parts.append(f"exit depth {mean:.1f} of {layers} layers on average ({shares})")
    if totals.get("drafted"):
        parts.append(drafts_part(totals["accepted"], totals["drafted"]))
    if totals.get("head_positions"):
        parts.append(fallbacks_part(totals["head_fallbacks"], totals["head_positions"]))
    if totals.get("prompt_tokens") and totals.get("kept_tokens"):
        parts.append(
            f"prompt tokens kept at the last drop layer {totals['kept_tokens'] / totals['prompt_tokens']:.0%}"
        )
    return "; ".join(parts)


@dataclass
class RunTotals:
    """What the runtime decided over a run's requests, summed from each batch's :class:`DecodeStats`. A
    counter stays None until a batch reports it (:meth:`as_dict` leaves it out)."""

    layers: int
    exit_depths: Counter[int] = field(default_factory=Counter)  # layers run -> tokens
    drafted: int | None = None
    accepted: int | None = None
    head_positions: int | None = None
    head_fallbacks: int | None = None
    kept_tokens: int | None = None  # prompt tokens kept at each batch's last drop layer
    prompt_tokens: int | None = None  # the prompt tokens of those batches
    scored: int | None = None
    generated: int | None = None

    def add(self, stats: DecodeStats, prompts: list[int], lengths: list[int], *, scoring: bool) -> None:
        """Fold one batch's ``stats`` in; ``prompts`` are the rows' prompt (context) lengths, ``lengths`` the
        tokens each row really scored or generated (steps past a row's end, which padding forced, are not
        counted)."""
        for step, depths in enumerate(stats.exit_layers or []):
            # scoring: decode step ``step`` gives continuation token ``step + 1``; generating: token ``step + 1``
            for b, d in enumerate(depths):
                if step + 1 < lengths[b]:
                    self.exit_depths[int(d)] += 1
        for name in ("drafted", "accepted", "head_positions", "head_fallbacks"):
            value = getattr(stats, name)
            if value:
                setattr(self, name, (getattr(self, name) or 0) + int(value))
        kept = stats.kept_tokens
        if kept:
            last = max(kept)
            self.kept_tokens = (self.kept_tokens or 0) + int(sum(kept[last]))
            self.prompt_tokens = (self.prompt_tokens or 0) + sum(prompts)
        if scoring:
            self.scored = (self.scored or 0) + sum(lengths)
        else:
            self.generated = (self.generated or 0) + sum(lengths)

    def as_dict(self) -> dict[str, Any]:
        """The totals as JSON (exit depths keyed by their string), counters never reported left out."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        out["exit_depths"] = {str(k): v for k, v in sorted(self.exit_depths.items())}
        return out


@register_model("effx")
class EffxLM(TemplateLM):
    """An effx Program (torch) or artifact (ONNX Runtime) as an lm-eval model; see the module's doc."""

    def __init__(
        self,
        model: str = "smollm2-135m",
        passes: str = "",
        backend: str = "torch",
        artifact: str | None = None,
        kernels: str | None = None,
        batch_size: int | str = 1,
        device: str
        | None = None,  # lm-eval's --device (cuda:0 by default): the torch backend runs on the CPU
        max_length: int | None = None,
        max_gen_toks: int = 256,
        chunk: int = 256,
        **kwargs,
    ):
        super().__init__()
        try:
            self._setup(model, passes, backend, artifact, kernels, batch_size, device, max_length, max_gen_toks, chunk, kwargs)  # fmt: skip
        except (EffxError, OSError) as e:
            if _cli():
                raise SystemExit(f"effx: error: {e}") from None
            raise

    def _setup(self, model, passes, backend, artifact, kernels, batch_size, device, max_length, max_gen_toks, chunk, kwargs):  # fmt: skip
        unknown = sorted(set(kwargs) - _IGNORED)
        if unknown:
            raise HarnessError(
                f"unknown model argument(s) {unknown}; effx takes model, passes, backend, artifact, kernels, "
                "max_length, max_gen_toks, chunk"
            )
        if backend not in ("torch", "onnx"):
            raise HarnessError(f"backend must be torch or onnx, got {backend!r}")
        if str(batch_size).startswith("auto"):
            batch_size = 8
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise HarnessError(f"batch_size must be a positive integer, got {batch_size!r}") from None
        for name, value in (
            ("batch_size", self.batch_size),
            ("max_gen_toks", max_gen_toks),
            ("chunk", chunk),
        ):
            if not isinstance(value, int) or value < 1:
                raise HarnessError(f"{name} must be a positive integer, got {value!r}")
        self.max_gen_toks, self.chunk = max_gen_toks, chunk
        if backend == "onnx" and artifact is None:
            raise HarnessError("backend=onnx needs artifact=DIR (a directory written by 'effx export')")
        self._load(model, str(passes or ""), kernels, artifact)
        positions = self.backend.plan.model.max_positions
        self._max_length = min(positions, 4096) if max_length is None else int(max_length)
        if not 2 <= self._max_length <= positions:
            raise HarnessError(f"max_length must be in [2, {positions}], got {max_length}")
        self.totals = RunTotals(layers=self.backend.plan.model.num_layers)
        self.seconds = 0.0

    def _load(self, model, passes, kernels, artifact) -> None:
        """Open the source through effx's front end (as ``effx eval`` does): the model and ``passes``, or
        the artifact (whose own model and passes are used; ``model`` and ``passes`` are then ignored)."""

        if artifact is None:
            source = frontend.resolve(model, passes, kernels=kernels)
        else:
            try:
                source = frontend.resolve(artifact=artifact)
            except frontend.UsageError as e:
                raise HarnessError(str(e)) from None
        run = frontend.load(source)
        if run.program is None and not isinstance(run.generator, OnnxGenerator):
            raise HarnessError(f"artifact={artifact} is a cascade; the lm-eval model runs single Programs")
        self.program = run.program
        self.backend = run.backend()
        self._generate = run.generate
        self.tok = run.tokenizer
        self.tokenizer = run.tokenizer.hf  # the Hugging Face tokenizer (None for an artifact)
        self.description = {"model": source.path, "passes": run.passes}
        if run.program is None:
            self.description["backend"] = "onnx"
        else:
            self.description |= {"backend": "torch", "kernels": self.backend.kernels}

    # -- what lm-eval asks of a model ----------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos

    @property
    def prefix_token_id(self) -> int:
        # as lm-eval's HF model: the BOS token where there is one, else the end of text
        return self.tok.bos if self.tok.bos is not None else self.tok.eos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, bool(add_special_tokens))

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tok.decode(tokens, skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        # the template effx chat and effx run render, in the same bounded sandbox (effx.frontend)
        if self.tok.template is None:
            raise HarnessError("this model has no chat template: run without --apply_chat_template")
        return self.tok.template.render(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if self.tok.template is None or not chat_template:
            return None
        return self.tok.template.text

    def get_model_info(self) -> dict:
        return {f"effx_{k}": v for k, v in self.description.items()} | {"effx_stats": self.stats()}

    def stats(self) -> dict:
        """What the runtime decided over every request so far, and the time spent in it."""
        return self.totals.as_dict() | {"seconds": round(self.seconds, 2)}

    def _report(self, what: str) -> None:
        sys.stderr.write(
            f"[effx] after {what}: {format_stats(self.stats())} ({self.seconds:.1f} s in effx)\n"
        )

    def _add(
        self, stats: DecodeStats | dict, prompts: list[int], lengths: list[int], *, scoring: bool
    ) -> None:
        """Fold one batch's run-time stats into the totals (see :meth:`RunTotals.add`)."""
        typed = stats if isinstance(stats, DecodeStats) else DecodeStats.from_dict(stats)
        self.totals.add(typed, prompts, lengths, scoring=scoring)

    def _arrays(self, rows: list[list[int]], *, left: bool, pad: int = 0):
        """``rows`` padded to one length (on the left, or the right) as the backend's int64 arrays, with the
        mask of real tokens."""
        xp = self.backend.xp
        width = max(len(r) for r in rows)
        ids, mask = [], []
        for r in rows:
            fill = [pad] * (width - len(r))
            ids.append(fill + r if left else r + fill)
            ones, zeros = [1] * len(r), [0] * (width - len(r))
            mask.append(zeros + ones if left else ones + zeros)
        return xp.asarray(ids, dtype=xp.int64), xp.asarray(mask, dtype=xp.int64)

    def _window(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """The tokens a request is scored on: the model reads the context and every continuation token but
        the last, at most ``max_length`` of them (the context is cut on the left, as lm-eval's HF model)."""
        if not continuation:
            raise HarnessError("an empty continuation cannot be scored")
        continuation = continuation[-self.max_length :]
        room = self.max_length + 1 - len(continuation)
        context = context[-room:] if room > 0 else []
        if not context:  # the window must start somewhere: its first token becomes the context
            context, continuation = continuation[:1], continuation[1:]
            if not continuation:
                raise HarnessError("a request with a single token and no context has nothing to score")
        return context, continuation

    def _batches(self, pairs):
        """Indices of ``pairs`` in batches of at most ``batch_size``, longest first, such that the padded
        batch (left-padded contexts, right-padded continuations) fits the model's positions."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        limit = self.backend.plan.model.max_positions
        batch, c, n = [], 0, 0
        for i in order:
            ci, ni = max(c, len(pairs[i][0])), max(n, len(pairs[i][1]))
            if batch and (len(batch) == self.batch_size or ci + ni - 1 > limit):
                yield batch
                batch, ci, ni = [], len(pairs[i][0]), len(pairs[i][1])
            batch.append(i)
            c, n = ci, ni
        if batch:
            yield batch

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, *, what: str = "loglikelihood", **kwargs
    ):
        pairs = [self._window(list(r[1]), list(r[2])) for r in requests]
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc=f"effx {what}", disable=disable_tqdm)
        for idx in self._batches(pairs):
            contexts = [pairs[i][0] for i in idx]
            continuations = [pairs[i][1] for i in idx]
            lengths = [len(c) for c in continuations]
            ctx, mask = self._arrays(contexts, left=True)
            cont, _ = self._arrays(continuations, left=False)
            stats = DecodeStats()
            start = time.perf_counter()
            logp, greedy = score(self.backend, ctx, mask, cont, chunk=self.chunk, stats=stats)
            self.seconds += time.perf_counter() - start
            logp, greedy = logp.tolist(), greedy.tolist()
            for row, i in enumerate(idx):
                n = lengths[row]
                answer = (float(sum(logp[row][:n])), bool(all(greedy[row][:n])))
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            self._add(stats, [len(c) for c in contexts], lengths, scoring=True)
            bar.update(len(idx))
        bar.close()
        self._report(what)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm, what="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, scores, strict=True):
            totals[i] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def _stopper(self, prompt: int, until: list[str]):
        """The loop's stop rule for ``until``: a row ends once its new text holds a stop sequence (the text
        is cut there afterwards)."""
        stops = [u for u in until if u]
        if not stops:
            return None

        def stop(tokens):
            rows = tokens[:, prompt:].tolist()
            return [any(u in self.tok_decode(row) for u in stops) for row in rows]

        return stop

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="effx generate_until", disable=disable_tqdm)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise HarnessError(f"max_gen_toks {max_gen} must be below max_length {self.max_length}")
            sampling = {}
            if kwargs.pop("do_sample", False):
                sampling = {"do_sample": True, "temperature": float(kwargs.pop("temperature", 1.0) or 1.0)}
                for key in ("top_k", "top_p", "seed"):
                    if key in kwargs:
                        sampling[key] = kwargs.pop(key)
            kwargs.pop("temperature", None)
            if kwargs:
                raise HarnessError(f"generation argument(s) {sorted(kwargs)} are not supported by effx")
            encoded = {
                i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen) :] for i in members
            }
            members = sorted(members, key=lambda i: -len(encoded[i]))
            for lo in range(0, len(members), self.batch_size):
                idx = members[lo : lo + self.batch_size]
                ids, mask = self._arrays([encoded[i] for i in idx], left=True, pad=self.eot_token_id)
                stats = DecodeStats()
                start = time.perf_counter()
                out = self._generate(
                    ids,
                    mask,
                    max_new_tokens=max_gen,
                    pad_token_id=self.eot_token_id,
                    stats=stats,
                    stop=self._stopper(ids.shape[1], until),
                    **sampling,
                )
                self.seconds += time.perf_counter() - start
                lengths = []
                for row, i in enumerate(idx):
                    new = [t for t in out[row, ids.shape[1] :].tolist()]
                    if self.eot_token_id in new:
                        new = new[: new.index(self.eot_token_id)]
                    lengths.append(len(new))
                    text = self.tok_decode(new)
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                self._add(stats, [len(encoded[i]) for i in idx], lengths, scoring=False)
                bar.update(len(idx))
        bar.close()
        self._report("generate_until")
        return results


def _register_builtins() -> None:
    # lm-eval fills its registry of built-in models only when the registry is empty; registering effx
    # first would hide them, so load them now
    import lm_eval.models  # noqa: F401


_register_builtins()
