"""effx: rewrite a language model's graph before it runs, and run the result.

import effx
model, tokenizer = effx.models.load("smollm2-135m")
prog = effx.transform(model, passes=[])          # a dense Program, token-identical to model.generate
out = prog.generate(tokenizer("Explain tides", return_tensors="pt").input_ids, max_new_tokens=64)
prog.report()
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import models
from ._about import __version__ as __version__
from ._about import torch_available
from .errors import (
    ArtifactError,
    CascadeConfigError,
    CascadeError,
    EffxError,
    GenerationInputError,
    ModelLoadError,
    PassConfigError,
    PassError,
    PassPreconditionError,
    PlanError,
    UnsupportedModelError,
)

# Without torch (a deployment that only runs ONNX artifacts) ``import effx.runtime.onnx`` must still work:
# the torch-based API is imported only where torch is installed.
if TYPE_CHECKING or torch_available():
    # the package itself, before its function ``capture`` takes the name effx.capture: transform looks the
    # capture functions up on it when called (as a test that replaces effx.capture.capture expects)
    from . import capture as _capture
    from .capture import (
        capture,
        capture_encoder,
        capture_mamba,
        capture_seq2seq,
        transform_encoder,
        transform_mamba,
        transform_seq2seq,
    )
    from .cascade import Cascade, EntropyGate, MaxProbGate, cascade
    from .draft_branch import train_draft_branch
    from .encoder import EncoderProgram
    from .exit_heads import train_exit_heads
    from .neurons import profile_neurons
    from .passes import (
        DraftBranch,
        EarlyExit,
        Lower,
        NeuronMask,
        Pass,
        PassManager,
        PromptLookup,
        TokenDrop,
        VocabReduce,
        parse_pipeline,
    )
    from .passes.base import as_passes
    from .program import Plan, Program
    from .recurrent import RecurrentProgram
    from .seq2seq import Seq2SeqProgram
    from .vocab import calibrate_vocab


def __getattr__(name: str):
    try:  # submodules: effx.flops, effx.quality, effx.exporters, ...
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        if name in __all__ and not torch_available():  # the torch API, in an artifact-only install
            raise ModuleNotFoundError(
                f'effx.{name} needs torch, which this install lacks: pip install "effx[torch]"', name="torch"
            ) from None
        raise AttributeError(f"module 'effx' has no attribute {name!r}") from None


__all__ = [
    "ArtifactError",
    "Cascade",
    "CascadeConfigError",
    "CascadeError",
    "DraftBranch",
    "EarlyExit",
    "EncoderProgram",
    "RecurrentProgram",
    "Seq2SeqProgram",
    "EffxError",
    "EntropyGate",
    "GenerationInputError",
    "MaxProbGate",
    "ModelLoadError",
    "NeuronMask",
    "Pass",
    "PassConfigError",
    "PassError",
    "PassManager",
    "PassPreconditionError",
    "Plan",
    "PlanError",
    "Program",
    "PromptLookup",
    "TokenDrop",
    "UnsupportedModelError",
    "VocabReduce",
    "calibrate_vocab",
    "capture",
    "capture_encoder",
    "capture_mamba",
    "capture_seq2seq",
    "cascade",
    "models",
    "parse_pipeline",
    "profile_neurons",
    "train_draft_branch",
    "train_exit_heads",
    "transform",
    "transform_encoder",
    "transform_mamba",
    "transform_seq2seq",
]


def transform(
    model,
    passes: str | Pass | Sequence[Pass | str] | None = None,
    *,
    kernels: str | None = None,
    progress: bool = False,
) -> Program:
    """Capture ``model`` and apply ``passes`` (Pass objects and/or a pipeline string) in order.

    The pipeline is validated before capture starts. The user's model is never modified: the Program shares
    its weights read-only, and passes build new tensors for whatever they change.

    ``kernels`` chooses how the torch backend runs the products (a last ``lower`` step, recorded in the
    plan): "fast" (the default) runs effx's CPU kernels, float32 with last-bit differences from torch's;
    "reference" runs the captured ATen ops, bitwise equal to ``model.generate`` on CPU. A pipeline that has
    its own ``lower`` step decides for itself.
    """
    steps = as_passes(passes)
    own = [p for p in steps if isinstance(p, Lower)]
    if own and kernels is not None and own[-1].kernels != kernels:
        raise PassConfigError(
            f"the pipeline lowers with kernels={own[-1].kernels} but transform() was given kernels={kernels}"
        )
    if not own:
        steps.append(Lower("fast" if kernels is None else kernels))
    manager = PassManager(steps)
    manager.check_family("decoder", type(model).__name__)
    # every refusal that needs no weights comes before capture (layer ranges, files, sizes, pass pairs)
    try:
        info = _capture.info_from_config(model.config)
    except (AttributeError, TypeError, ZeroDivisionError):  # not a config capture reads: capture says why
        info = None
    if info is not None:
        manager.check_model(info)
    program = _capture.capture(model, progress=progress)
    return manager.run(program)
