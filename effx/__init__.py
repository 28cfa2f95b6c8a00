"""effx: rewrite a language model's graph before it runs, and run the result.

import effx
model, tokenizer = effx.models.load("smollm2-135m")
prog = effx.transform(model, passes=[])          # a dense Program, token-identical to model.generate
out = prog.generate(tokenizer("Explain tides", return_tensors="pt").input_ids, max_new_tokens=64)
prog.report()
"""

from __future__ import annotations

from collections.abc import Sequence

from . import models
from .capture import capture, capture_encoder
from .encoder import EncoderProgram, transform_encoder
from .errors import (
    ArtifactError,
    EffxError,
    GenerationInputError,
    ModelLoadError,
    PassConfigError,
    PassError,
    PlanError,
    UnsupportedModelError,
)
from .exit_heads import train_exit_heads
from .neurons import profile_neurons
from .passes import EarlyExit, NeuronMask, Pass, PassManager, TokenDrop, VocabReduce, parse_pipeline
from .program import Plan, Program
from .vocab import calibrate_vocab

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "EarlyExit",
    "EncoderProgram",
    "EffxError",
    "GenerationInputError",
    "ModelLoadError",
    "NeuronMask",
    "Pass",
    "PassConfigError",
    "PassError",
    "PassManager",
    "Plan",
    "PlanError",
    "Program",
    "TokenDrop",
    "UnsupportedModelError",
    "VocabReduce",
    "calibrate_vocab",
    "capture",
    "capture_encoder",
    "models",
    "parse_pipeline",
    "profile_neurons",
    "train_exit_heads",
    "transform",
    "transform_encoder",
]


def transform(
    model, passes: str | Pass | Sequence[Pass | str] | None = None, *, progress: bool = False
) -> Program:
    """Capture ``model`` and apply ``passes`` (Pass objects and/or a pipeline string) in order.

    The pipeline is validated before capture starts. The user's model is never modified: the Program shares
    its weights read-only, and passes build new tensors for whatever they change.
    """
    manager = PassManager(passes)
    program = capture(model, progress=progress)
    return manager.run(program)
