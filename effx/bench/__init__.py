"""``effx bench``: speed, FLOPs and quality of pass pipelines against the dense model, in one run.

Every technique in effx trades quality for speed; this package measures that trade on a model and data the
user chooses, the same way for every pass:

    configs = expand_configs("neuron-mask{keep=0.5 profile=p.safetensors layers=3,27}",
                             ["neuron-mask.keep=0.3:0.9:0.2"])
    result = run_bench(model, tokenizer, configs, load_samples("suite", 4), new_tokens=32)
    write_outputs(result, "results/")      # bench-<run>.json, bench-<run>.md, bench-<run>-pareto.png

Its modules, each importing only those above it in this list; every name below is importable from
``effx.bench`` itself:

* :mod:`effx.bench.errors`: :class:`BenchConfigError` (a malformed sweep or setting), :class:`BenchDataError`;
* :mod:`effx.bench.sweep`: the sweep grammar (:func:`parse_sweep`) and the configurations it makes
  (:class:`BenchConfig`, :func:`expand_configs`, :func:`pipeline_string`);
* :mod:`effx.bench.configs`: :func:`default_configs` and the cached artifacts they need
  (:func:`exit_heads`, :func:`vocab_file`, :func:`neuron_profile`);
* :mod:`effx.bench.samples`: the data (:class:`Sample`, :func:`load_samples`, :func:`data_choices`);
* :mod:`effx.bench.timing`: :func:`timed`, :func:`interleave`, :func:`total_seconds`, :func:`first_outputs`
  (the scripts in ``benchmarks/`` time with them too);
* :mod:`effx.bench.memory`: the peak resident memory of one call;
* :mod:`effx.bench.metrics`: pass statistics, shares of tokens per path (:func:`effx.bench.metrics.paths`,
  :func:`effx.bench.metrics.mean_paths`), ROUGE-L;
* :mod:`effx.bench.schema`: the result schema (:data:`SCHEMA`, :func:`validate_result`,
  :func:`load_result`);
* :mod:`effx.bench.report`: Markdown tables, Pareto plots, :func:`write_outputs`;
* :mod:`effx.bench.run`: :func:`run_bench` and its steps (prepare, time, score, assemble), and how it
  measures; agreement and perplexity come from :func:`effx.quality.teacher_forced`.
"""

from __future__ import annotations

from .configs import (
    default_configs,
    default_quantize,
    draft_branch,
    draft_vocab,
    exit_heads,
    neuron_profile,
    own_states,
    vocab_file,
)
from .errors import BenchConfigError, BenchDataError
from .report import (
    format_path_table,
    format_stacked_table,
    format_table,
    pareto_front,
    plot_pareto,
    stacked_rows,
    write_outputs,
)
from .run import run_bench
from .samples import ACLSUM_PROMPT as ACLSUM_PROMPT
from .samples import Sample, data_choices, load_samples
from .schema import SCHEMA, VERSION, load_result, validate_result
from .sweep import MAX_CONFIGS, BenchConfig, Sweep, expand_configs, parse_sweep, pipeline_string
from .timing import Timed, first_outputs, interleave, timed, total_seconds

__all__ = [
    "MAX_CONFIGS",
    "SCHEMA",
    "VERSION",
    "BenchConfig",
    "BenchConfigError",
    "BenchDataError",
    "Sample",
    "Sweep",
    "Timed",
    "data_choices",
    "default_configs",
    "default_quantize",
    "draft_vocab",
    "expand_configs",
    "first_outputs",
    "draft_branch",
    "exit_heads",
    "own_states",
    "format_path_table",
    "format_table",
    "format_stacked_table",
    "stacked_rows",
    "interleave",
    "load_result",
    "load_samples",
    "neuron_profile",
    "parse_sweep",
    "pareto_front",
    "pipeline_string",
    "plot_pareto",
    "run_bench",
    "timed",
    "total_seconds",
    "validate_result",
    "vocab_file",
    "write_outputs",
]
