"""Graph passes. Each pass is a registered, frozen dataclass; see :mod:`effx.passes.base`."""

from .base import (
    PHASES,
    Pass,
    PassManager,
    PassReport,
    PassResult,
    get_pass,
    parse_pipeline,
    pipeline_string,
    register_pass,
    registered_passes,
)
from .draft_branch import DraftBranch
from .early_exit import EarlyExit
from .lower import Lower
from .neuron_mask import NeuronMask
from .prompt_lookup import PromptLookup
from .quantize import Quantize
from .token_drop import TokenDrop
from .vocab_reduce import VocabReduce

__all__ = [
    "PHASES",
    "DraftBranch",
    "EarlyExit",
    "Lower",
    "Quantize",
    "NeuronMask",
    "Pass",
    "PassManager",
    "PassReport",
    "PassResult",
    "PromptLookup",
    "get_pass",
    "parse_pipeline",
    "pipeline_string",
    "register_pass",
    "registered_passes",
    "TokenDrop",
    "VocabReduce",
]
