"""One stage graph to ONNX: ``torch.onnx.export`` (dynamo) with named dynamic axes.

The exporters (``effx.exporters.onnx`` for decoder artifacts, ``effx.exporters.onnx_seq2seq`` for
encoder-decoder ones) export every stage through :func:`export_onnx`; capture produces the graphs and knows
nothing of ONNX.
"""

from __future__ import annotations

import logging
import warnings

import torch

from ..fx import Dim

__all__ = ["export_onnx"]


def export_onnx(
    gm: torch.nn.Module,
    args: tuple,
    axes: tuple[dict[int, str | None], ...],
    opset: int = 18,
    *,
    optimize: bool = False,
    translations: dict | None = None,
):
    """Export one stage graph to an ``onnx.ModelProto`` with named dynamic axes (``None``: let export infer
    the dimension, e.g. a mask's key axis that is ``past + seq``). ``"past"`` may be 0, other axes >= 1.
    ``optimize=False`` (stages) keeps initializers under their state-dict names, so that one layer's export
    can take another layer's weights; ONNX Runtime folds what the optimizer would have at load time.
    ``translations``: ``torch.onnx.export``'s ``custom_translation_table`` (ops effx registers itself, such as
    the quantized ones: ``effx.exporters.onnx_quant``)."""
    dims: dict[str, Dim] = {}
    spec = tuple(
        {
            axis: (
                Dim.AUTO if name is None else dims.setdefault(name, Dim(name, min=0 if name == "past" else 1))
            )
            for axis, name in a.items()
        }
        for a in axes
    )
    # the exporter logs a warning per torchvision op it cannot register when torchvision is absent
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on renamed axes
        program = torch.onnx.export(
            gm,
            args,
            dynamic_shapes=spec,
            dynamo=True,
            opset_version=opset,
            verbose=False,
            optimize=optimize,
            custom_translation_table=translations,
        )
    return program.model_proto
