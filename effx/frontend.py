"""The front end that the command line, ``effx chat`` and the lm-eval model share: a source (a known model
name, a local Hugging Face model directory or an artifact directory) and an optional pipeline string become
something runnable, with its tokenizer and its chat template.

    source = resolve("smollm2-135m", "early-exit{layers=10,20}")  # checks the arguments, loads nothing
    run = load(source)                                             # a Program, or an artifact's generator
    ids = run.tokenizer.encode_chat([{"role": "user", "content": "Explain tides."}])
    out = run.generate(run.batch(ids), max_new_tokens=32)

:func:`resolve` finds what can be wrong with the arguments before any work is done: a source that is neither
a known name, a model directory nor an artifact, a pipeline or kernels given with an artifact, or a pipeline
the model's config refutes (:class:`UsageError`); a malformed pipeline (``PassConfigError``).
:func:`load` does the work (converting, capturing, transforming, or opening and checking an artifact).

Chat templates render in one place, :meth:`ChatTemplate.render`, in effx's bounded Jinja sandbox
(:func:`effx.chat.render_template`), whether they come from a Hugging Face tokenizer or from an artifact's
``tokenizer/`` folder: ``effx generate``, ``effx run``, ``effx chat`` and ``effx eval`` render a
conversation the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import models
from .artifact import CASCADE_FILE, PLAN_FILE, SEQ2SEQ_FILE, TOKENIZER_DIR
from .chat import render_template
from .errors import ArtifactError, EffxError, PassError

__all__ = [
    "DEFAULT_MODEL",
    "ChatTemplate",
    "Runnable",
    "Source",
    "Tokenizer",
    "UsageError",
    "chat_prompt",
    "chat_template",
    "load",
    "resolve",
]

DEFAULT_MODEL = "smollm2-135m"


class UsageError(EffxError):
    """The arguments name something that does not exist or cannot go together (an unknown model, a folder
    that is neither a model nor an artifact, a pipeline given with an artifact): the command line's usage
    error (exit 2), found before any work."""


@dataclass(frozen=True)
class Source:
    """A checked source: ``kind`` is ``"name"`` (a known model, converted and cached on first use), ``"hf"``
    (a local Hugging Face model directory) or ``"artifact"`` (a directory written by ``effx export``);
    ``path`` the name or directory; ``passes`` the parsed pipeline and ``kernels`` the torch kernels (both
    empty for an artifact, which holds its own)."""

    kind: str
    path: str
    passes: tuple = ()
    kernels: str | None = None


_CONFLICT = (
    "--artifact runs the artifact's own model and passes; leave out --model, --passes and --kernels "
    "(or drop --artifact)"
)


def _is_artifact(path: Path) -> bool:
    return any((path / name).is_file() for name in (PLAN_FILE, CASCADE_FILE, SEQ2SEQ_FILE))


def resolve(
    model: str | None = None,
    passes: str = "",
    *,
    artifact: str | None = None,
    kernels: str | None = None,
    program: bool = False,
) -> Source:
    """Check a source before any work: ``artifact`` (a directory written by ``effx export``) or ``model`` (a
    known name, a local Hugging Face model directory, or an artifact directory too; default
    :data:`DEFAULT_MODEL`) with the pipeline string ``passes`` and ``kernels``.

    ``program=True`` asks for a Program (a command that captures or transforms): an artifact is then refused.
    Raises :class:`UsageError` for a source that is none of these, arguments that do not go together, or a
    pipeline the model's config refutes (layer ranges, files, sizes, pass pairs: the passes'
    ``check_model``, read from the config without loading the weights), and ``PassConfigError`` for a
    malformed pipeline."""
    if artifact is not None:
        if model is not None or passes or kernels is not None:
            raise UsageError(_CONFLICT)
        path = Path(artifact).expanduser()
        if not path.is_dir():
            raise UsageError(
                f"{artifact}: no such directory, so no {PLAN_FILE}: give an artifact written by 'effx export'"
            )
        if not _is_artifact(path):
            raise UsageError(f"{artifact} has no {PLAN_FILE}: not an artifact written by 'effx export'")
        return Source("artifact", str(artifact))
    spec = DEFAULT_MODEL if model is None else str(model)
    path = Path(spec).expanduser()
    if path.is_dir() and _is_artifact(path):
        if program:
            raise UsageError(
                f"{spec} is an artifact written by 'effx export'; this command needs a model: run the "
                f"artifact with 'effx run {spec} PROMPT' or 'effx chat --artifact {spec}'"
            )
        if passes or kernels is not None:
            raise UsageError(_CONFLICT.replace("--artifact runs", f"{spec} is an artifact: it runs"))
        return Source("artifact", spec)

    if spec not in models.KNOWN_MODELS and not path.is_dir():
        raise UsageError(
            f"unknown model '{spec}': give a known name ({', '.join(sorted(models.KNOWN_MODELS))}), the path of a "
            "local Hugging Face model directory, or an artifact directory written by 'effx export'"
        )
    if spec not in models.KNOWN_MODELS and not (path / "config.json").is_file():
        raise UsageError(
            f"{spec} is a directory but has neither config.json (a Hugging Face model) nor {PLAN_FILE} "
            "(an artifact written by 'effx export')"
        )
    pipeline = _checked_pipeline(spec, passes)
    return Source("name" if spec in models.KNOWN_MODELS else "hf", spec, pipeline, kernels)


def _checked_pipeline(model: str, passes: str) -> tuple:
    """The parsed pipeline, checked against what the model's config alone refutes, so that a bad pipeline
    fails in a config parse and not after the load: ``PassConfigError`` for a malformed pipeline,
    :class:`UsageError` for one this model's config refutes."""
    from .passes import PassManager, parse_pipeline

    pipeline = tuple(parse_pipeline(passes))
    config = models.config(model) if pipeline else None
    if config is not None:
        from .capture import info_from_config

        try:
            PassManager(list(pipeline)).check_model(info_from_config(config))
        except PassError as e:  # what the arguments asked of this model: a usage error, as a malformed one
            raise UsageError(str(e)) from e
    return pipeline


# -- the tokenizer and its chat template ---------------------------------------------------------------------


def _default_template(template: Any) -> str | None:
    """Of named templates (a list of ``{"name", "template"}`` in ``tokenizer_config.json``, a dict in
    transformers), the default one."""
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    elif isinstance(template, dict):
        template = template.get("default")
    return template or None


def _token_text(value: Any) -> str | None:
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer's chat template: its Jinja ``text``, the file it came from (``where``, named in errors)
    and the special tokens it is rendered with (``bos_token``, ``eos_token``, ... as transformers passes
    them)."""

    text: str
    where: str
    tokens: dict

    @classmethod
    def from_dir(cls, directory: str | Path) -> ChatTemplate | None:
        """The template of a saved tokenizer (an artifact's ``tokenizer/``): ``chat_template.jinja``, else
        ``chat_template`` in ``tokenizer_config.json``; None when it has none (a base model)."""
        directory = Path(directory)
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            text, where = jinja_file.read_text(), jinja_file
        else:
            text, where = _default_template(config.get("chat_template")), config_file
        if not text:
            return None
        tokens = {
            k: t for k, v in config.items() if k.endswith("_token") and (t := _token_text(v)) is not None
        }
        return cls(text, str(where), tokens)

    @classmethod
    def from_hf(cls, tokenizer) -> ChatTemplate | None:
        """The template of a Hugging Face tokenizer, with its ``special_tokens_map``; None when it has none."""
        text = _default_template(getattr(tokenizer, "chat_template", None))
        if not text:
            return None
        home = Path(getattr(tokenizer, "name_or_path", "") or ".")
        where = next(
            (str(home / f) for f in ("chat_template.jinja", "tokenizer_config.json") if (home / f).is_file()),
            f"the tokenizer of {home}",
        )
        tokens = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        return cls(text, where, tokens)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """``messages`` in the template, with the assistant's generation prompt, in the bounded sandbox (see
        :func:`effx.chat.render_template`): a template that refuses the prompt, fails, or asks for more
        memory or time than a prompt needs is one ``TemplateError`` line naming its file."""
        return render_template(
            self.text,
            self.where,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **{"bos_token": "", "eos_token": "", **self.tokens},
        )


class Tokenizer:
    """One tokenizer over a Hugging Face tokenizer (``hf``) or a saved one (``directory``, an artifact's
    ``tokenizer/``, read with the ``tokenizers`` library, no transformers): encode, decode, its end and start
    tokens, and its chat template (``template``, None without one)."""

    def __init__(self, hf=None, *, directory: str | Path | None = None):
        self.hf = hf
        if hf is not None:
            self.eos, self.bos = hf.eos_token_id, hf.bos_token_id
            self.name = getattr(hf, "name_or_path", "") or ""
            self.template = ChatTemplate.from_hf(hf)
            return
        from tokenizers import Tokenizer as Fast

        directory = Path(directory)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise ArtifactError(f"{file} is missing: export the artifact with its tokenizer")
        self.tok = Fast.from_file(str(file))
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}

        def special(name):
            value = _token_text(config.get(name))
            return self.tok.token_to_id(value) if value else None

        self.eos, self.bos = special("eos_token"), special("bos_token")
        self.name = str(directory)
        self.template = ChatTemplate.from_dir(directory)

    def encode(self, text: str, special: bool = False) -> list[int]:
        if self.hf is not None:
            return self.hf(text, add_special_tokens=special).input_ids
        return self.tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=skip_special)
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def encode_chat(self, messages: list[dict] | str, *, chat: bool = True) -> list[int]:
        """A conversation (or one user prompt) as prompt ids: rendered in the chat template with the
        generation prompt when there is one and ``chat``, else the turns' contents one a line. A template
        writes its own special tokens; plain text gets the tokenizer's (a base model's ``<bos>``)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        templated = chat and self.template is not None
        text = self.template.render(messages) if templated else "\n".join(m["content"] for m in messages)
        return self.encode(text, special=not templated)


def chat_template(tokenizer_dir: str | Path) -> str | None:
    """The chat template of a saved tokenizer (``chat_template.jinja``, or ``chat_template`` in
    ``tokenizer_config.json``; of named templates, the default one), or None: a base model has none."""
    template = ChatTemplate.from_dir(tokenizer_dir)
    return None if template is None else template.text


def chat_prompt(tokenizer_dir: str | Path, prompt: str) -> str:
    """``prompt`` as one user message in a saved tokenizer's chat template, with the generation prompt;
    ``prompt`` unchanged when there is no template."""
    template = ChatTemplate.from_dir(tokenizer_dir)
    return prompt if template is None else template.render([{"role": "user", "content": prompt}])


# -- something runnable --------------------------------------------------------------------------------------


@dataclass
class Runnable:
    """An opened source: a ``program`` (torch; ``model`` is the Hugging Face model it was captured from) or
    an artifact's ``generator`` (ONNX Runtime), with its ``tokenizer``."""

    source: Source
    tokenizer: Tokenizer
    program: Any = None
    model: Any = None
    generator: Any = None

    @property
    def engine(self):
        return self.program if self.program is not None else self.generator

    @property
    def plan(self):
        return self.engine.plan

    @property
    def num_layers(self) -> int:
        return self.plan.model.num_layers

    @property
    def passes(self) -> str:
        """The pipeline it runs, as ``/passes`` and reports show it."""
        if self.program is not None:
            from .passes.base import pipeline_string

            return pipeline_string(list(self.source.passes))
        return ", ".join(p["name"] for p in self.plan.passes)

    def backend(self):
        """What :mod:`effx.runtime.score` and the lm-eval model run on (its ``xp`` makes arrays)."""
        if self.program is None:
            return self.generator
        from .runtime.torch_backend import torch_backend

        return torch_backend(self.program)

    def batch(self, ids: list[int]):
        """One prompt's ids as a batch of one, in the array type the engine takes."""
        if self.program is not None:
            import torch

            return torch.tensor([ids], dtype=torch.long)
        import numpy as np

        return np.array([ids], dtype=np.int64)

    def generate(self, *args, **kwargs):
        """The engine's own ``generate`` (``Program.generate`` or the ONNX generator's)."""
        return self.engine.generate(*args, **kwargs)


def load(source: Source, *, providers=None) -> Runnable:
    """Open a source checked by :func:`resolve`: a model is loaded (a known one converted and cached on first
    use), captured and transformed by its pipeline; an artifact is opened on ONNX Runtime with ``providers``
    (default: the runtime's choice) and checked whole."""
    if source.kind == "artifact":
        from .runtime import onnx as rt

        generator = rt.load(source.path, providers=providers)
        tokenizer = Tokenizer(directory=Path(source.path) / TOKENIZER_DIR)
        return Runnable(source, tokenizer, generator=generator)
    import effx

    model, hf = effx.models.load(source.path)
    program = effx.transform(model, passes=list(source.passes), kernels=source.kernels)
    return Runnable(source, Tokenizer(hf), program=program, model=model)
