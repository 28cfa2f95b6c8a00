"""``effx chat``: an interactive terminal chat over any pipeline (torch) or exported artifact (ONNX Runtime).

The conversation is kept as chat messages and rendered with the tokenizer's chat template every turn (a
tokenizer without one gets the turns as plain lines). Replies stream as they are generated; Ctrl-C stops a
reply, keeps what was said so far, and leaves the session running. Commands:

* ``/reset``: forget the conversation;
* ``/passes``: the pipeline the model runs;
* ``/stats``: the last reply's tokens, tokens/s and the run-time decisions (exit depths, accepted drafts,
  reduced-head fallbacks, kept prompt tokens);
* ``/help``, ``/quit`` (or end of input).

``--prompts builtin`` (effx's prompt suite) or ``--prompts FILE`` (one prompt per line) runs a predefined
prompt set non-interactively, each prompt a conversation of its own, as PartInfer's predefined prompts.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from . import show
from .data import PROMPTS
from .errors import EffxError
from .runtime.stats import DecodeStats

__all__ = [
    "TEMPLATE_CHARS",
    "TEMPLATE_SECONDS",
    "ChatSession",
    "Reply",
    "TemplateError",
    "TemplateLimitError",
    "format_stats",
    "load_prompts",
    "render_template",
]

HELP = "commands: /reset (forget the conversation), /passes, /stats (last reply), /help, /quit"


# A chat template renders a prompt: a few kilobytes in milliseconds. These bound what a hostile or broken one
# may ask for ({{ 'x' * 10**9 }}, nested loops): characters (at least, and 4x the messages' own) and seconds.
TEMPLATE_CHARS = 1 << 20
TEMPLATE_SECONDS = 5.0
_WIDTH = re.compile(r"%[-#0 +]*(\d+)")  # a printf-style width


# the filters whose arguments and results the sandbox checks against the render's limit
_CHECKED_FILTERS = ("center", "indent", "wordwrap", "truncate", "format", "batch", "slice", "join", "tojson")


def _raise_exception(message):
    """The templates' ``raise_exception``, as transformers gives it to them."""
    raise TemplateError(f"the chat template refused the prompt: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """The templates' ``tojson``, as transformers gives it to them: non-ASCII text kept."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _check_binop(operator: str, left, right, chars: int) -> None:
    """Refuse, before it is computed, a ``*``, ``**``, ``+`` or ``%`` whose result would be over ``chars``
    characters or items (:class:`TemplateLimitError`)."""
    seq = (str, list, tuple)
    if operator == "*":
        n, item = (right, left) if isinstance(left, seq) else (left, right)
        if isinstance(item, seq) and isinstance(n, int) and len(item) * n > chars:
            raise TemplateLimitError(f"'*' asks for {len(item)} x {n} items, over the limit of {chars}")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int):
        if right > 0 and abs(left) > 1 and right * abs(left).bit_length() > 8 * chars:
            raise TemplateLimitError(f"'**' asks for {left}**{right}, over the limit of {chars} characters")
    elif operator == "+" and isinstance(left, seq) and isinstance(right, seq):
        if len(left) + len(right) > chars:
            raise TemplateLimitError(f"'+' makes {len(left) + len(right)} items, over the limit of {chars}")
    elif operator == "%" and isinstance(left, str):
        widths = [int(w) for w in _WIDTH.findall(left)]
        if widths and max(widths) > chars:
            raise TemplateLimitError(f"'%' asks for a width of {max(widths)}, over the limit of {chars}")


@functools.cache
def _bounded_environment():
    """An immutable Jinja sandbox that refuses, before computing it, any value over the render's character
    limit (``*``, ``**``, ``+`` and ``%`` on strings and sequences, a call or filter given a count or a string
    over it, an attribute or item that holds one), and gives up at its deadline; its ``range`` checks the
    deadline as it counts. Templates see what transformers gives them (``raise_exception``, ``strftime_now``,
    a ``tojson`` that keeps non-ASCII text, ``break`` and ``continue``), so they render as
    ``apply_chat_template`` renders them."""
    from datetime import datetime

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def __init__(self):
            super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            self.globals["range"] = self._range
            self.globals["raise_exception"] = _raise_exception
            self.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
            self.filters["tojson"] = _tojson
            for name in _CHECKED_FILTERS:
                self.filters[name] = self._checked(name, self.filters[name])

        # the limits of the render on this thread, set by render_template
        def _limits(self):
            return getattr(_LIMITS, "chars", TEMPLATE_CHARS), getattr(_LIMITS, "deadline", float("inf"))

        def _check(self, value, what: str, count: bool = False):
            """``value`` unless it is over the limit: a string or sequence longer than it, or with ``count``
            (an argument: a width, a repeat) an integer above it."""
            chars, deadline = self._limits()
            if time.monotonic() > deadline:
                raise TemplateLimitError(f"it ran for more than {TEMPLATE_SECONDS:g} s")
            if count and isinstance(value, int) and not isinstance(value, bool) and abs(value) > chars:
                raise TemplateLimitError(f"{what} asks for {value}, over the limit of {chars} characters")
            if isinstance(value, (str, list, tuple)) and len(value) > chars:
                raise TemplateLimitError(f"{what} is {len(value)} long, over the limit of {chars} characters")
            return value

        def _checked(self, name, f):
            @functools.wraps(f)
            def checked(*args, **kwargs):
                for a in (*args, *kwargs.values()):
                    self._check(a, f"the filter {name}", count=True)
                return self._check(f(*args, **kwargs), f"the filter {name}'s result")

            return checked

        def _range(self, *args):
            from jinja2.sandbox import safe_range

            for i, x in enumerate(safe_range(*args)):
                if i % 1024 == 0:
                    self._check(None, "range")
                yield x

        def call_binop(self, context, operator, left, right):
            chars, _ = self._limits()
            self._check(None, operator)
            _check_binop(operator, left, right, chars)
            return self._check(super().call_binop(context, operator, left, right), f"'{operator}''s result")

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            for a in (*args, *kwargs.values()):
                __self._check(a, "a call's argument", count=True)
            return __self._check(super().call(__context, __obj, *args, **kwargs), "a call's result")

        def getattr(self, obj, attribute):
            return self._check(super().getattr(obj, attribute), f"the attribute {attribute!r}")

        def getitem(self, obj, argument):
            return self._check(super().getitem(obj, argument), "an item")

    return Bounded()


class TemplateError(EffxError, ValueError):
    """A chat template did not render: it refused the prompt (``raise_exception``), is not valid Jinja, or
    asked for more than a prompt needs (:class:`TemplateLimitError`)."""


class TemplateLimitError(TemplateError):
    """A chat template asked for more characters or time than a prompt needs."""


_LIMITS = threading.local()  # the limits of the render running on this thread


def render_template(template: str, where: str, **context) -> str:
    """``template`` (a chat template, from ``where``) rendered in an immutable Jinja sandbox with ``context``,
    within :data:`TEMPLATE_CHARS` characters (or 4x the messages' own, if more) and :data:`TEMPLATE_SECONDS`
    seconds: a template that asks for more is refused with one line naming ``where`` and what it asked for,
    before the memory or the time is spent; a template that is not valid Jinja or fails is a
    :class:`TemplateError` naming ``where``. Needs jinja2."""
    from jinja2 import TemplateError as JinjaError

    env = _bounded_environment()
    own = sum(len(str(m.get("content", ""))) for m in context.get("messages", ()) if isinstance(m, dict))
    chars = max(TEMPLATE_CHARS, 4 * own)
    _LIMITS.chars, _LIMITS.deadline = chars, time.monotonic() + TEMPLATE_SECONDS
    out: list[str] = []
    total = 0
    try:
        for piece in env.from_string(template).generate(**context):
            total += len(piece)
            if total > chars:
                raise TemplateLimitError(f"its output passed the limit of {chars} characters")
            env._check(None, "the output")
            out.append(piece)
    except TemplateLimitError as e:
        raise TemplateLimitError(f"the chat template in {where} was stopped: {e}") from None
    except RecursionError:
        raise TemplateLimitError(f"the chat template in {where} was stopped: it recursed too deep") from None
    except JinjaError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TemplateError(f"the chat template in {where} failed: {first}") from None
    finally:
        del _LIMITS.chars, _LIMITS.deadline
    return "".join(out)


@dataclass
class Reply:
    """One reply: its text, how many tokens, how long it took, what the runtime decided."""

    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    interrupted: bool = False


def format_stats(reply: Reply | None) -> str:
    """One line about a reply: tokens, tokens/s and the decisions the runtime reported."""
    if reply is None:
        return "no reply yet"
    rate = reply.tokens / reply.seconds if reply.seconds > 0 else 0.0
    parts = [f"{reply.tokens} tokens in {reply.seconds:.2f} s ({rate:.1f} tokens/s)"]
    decisions = DecodeStats.from_dict(reply.stats).summary()
    if decisions:
        parts.append(decisions)
    if reply.interrupted:
        parts.append("interrupted")
    return "; ".join(parts)


class ChatSession:
    """A conversation over an engine.

    ``render(messages) -> prompt ids`` applies the chat template; ``generate(ids, on_token, stats) -> None``
    generates a reply, calling ``on_token(token_id)`` for each new token; ``decode(ids) -> str`` turns ids
    into text. ``passes`` describes the pipeline (for ``/passes``).
    """

    def __init__(
        self,
        render: Callable[[list[dict]], object],
        generate: Callable[[object, Callable[[int], None], dict], None],
        decode: Callable[[list[int]], str],
        *,
        passes: str = "",
        out: TextIO | None = None,
        show: str | None = None,
        num_layers: int = 0,
    ):
        self.render, self.generate, self.decode = render, generate, decode
        self.passes = passes
        self.show, self.num_layers = show, num_layers
        self.out = out if out is not None else sys.stdout
        self.messages: list[dict] = []
        self.last: Reply | None = None

    def reset(self) -> None:
        self.messages = []

    def ask(self, text: str) -> Reply:
        """Send ``text`` as the user's turn; stream the reply to ``out``; keep both in the history."""
        self.messages.append({"role": "user", "content": text})
        ids = self.render(self.messages)
        reply = Reply()
        new: list[int] = []
        shown = ""
        tracer = show.Tracer(reply.stats, self.num_layers) if self.show else None
        colour = show.use_colour(self.out)

        def on_token(token: int) -> None:
            nonlocal shown
            new.append(token)
            mark = tracer.on_token() if tracer is not None else None
            text = self.decode(new)
            if text.startswith(shown):  # print what the new token added (tokens may merge into characters)
                piece = text[len(shown) :]
                if mark is not None:
                    piece = show.render([piece], [mark], self.show, num_layers=self.num_layers, colour=colour)
                self.out.write(piece)
                self.out.flush()
                shown = text

        start = time.perf_counter()
        try:
            self.generate(ids, on_token, reply.stats)
        except KeyboardInterrupt:
            reply.interrupted = True
        reply.seconds = time.perf_counter() - start
        reply.tokens = len(new)
        reply.text = self.decode(new)
        if reply.text.startswith(shown):
            self.out.write(reply.text[len(shown) :])
        self.out.write("\n[interrupted]\n" if reply.interrupted else "\n")
        if tracer is not None:
            self.out.write(
                show.legend(tracer.marks, self.show, num_layers=self.num_layers, colour=colour) + "\n"
            )
        self.out.flush()
        self.messages.append({"role": "assistant", "content": reply.text})
        self.last = reply
        return reply

    def command(self, line: str) -> bool:
        """Run a ``/command``; returns False when the session should end."""
        name = line.strip().split()[0].lower()
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.reset()
            self.out.write("[conversation cleared]\n")
        elif name == "/passes":
            self.out.write(f"[passes] {self.passes or 'none (dense)'}\n")
        elif name == "/stats":
            self.out.write(f"[stats] {format_stats(self.last)}\n")
        elif name == "/help":
            self.out.write(HELP + "\n")
        else:
            self.out.write(f"[unknown command {name}] {HELP}\n")
        return True

    def run(self, lines, *, prompt: str = "you> ") -> None:
        """The interactive loop over ``lines`` (an iterator of input lines, e.g. from :func:`input_lines`)."""
        while True:
            try:
                line = next(lines)
            except StopIteration:
                break
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as shells do
                self.out.write("\n")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    break
                continue
            self.ask(line)

    def run_prompts(self, prompts: Sequence[str]) -> None:
        """Each prompt as a conversation of its own, with its reply and stats."""
        for text in prompts:
            self.reset()
            self.out.write(f"> {text}\n")
            self.ask(text)
            self.out.write(f"[stats] {format_stats(self.last)}\n")


def input_lines(prompt: str = "you> "):
    """Lines typed at the terminal (``input``), until end of input."""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return


def load_prompts(spec: str) -> list[str]:
    """``builtin`` (effx's prompt suite) or a text file with one prompt per line (blank lines skipped)."""
    from pathlib import Path

    if spec == "builtin":
        return list(PROMPTS)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"--prompts {spec}: no such file (give a text file, one prompt per line, or 'builtin')"
        )
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {spec}: the file holds no prompt")
    return prompts
