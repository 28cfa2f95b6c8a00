"""The export side of quantized weights in ONNX artifacts: ``torch.onnx.export`` translates effx's quantized
ops (``effx.qlinear``, ``effx.qembedding``, ``effx.round_int8``: :mod:`effx.quant`) into placeholder nodes
of the domain :data:`DOMAIN` (``QLinear``, ``QEmbedding``, ``RoundInt8``) over the stage's quantized
initializers, which :func:`effx.exporters.onnx_quant.lower` then rewrites into standard ONNX and
``com.microsoft`` nodes (see :mod:`effx.exporters.onnx_quant`, which re-exports these names).
"""

from __future__ import annotations

from .. import quant  # noqa: F401  (registers the two ops)

__all__ = ["DOMAIN", "translations"]

DOMAIN = "effx"  # the placeholders' domain: between export and lower only, never in an artifact


def _schemas():
    """The placeholders' ONNX schemas: ``QLinear``, ``QEmbedding`` and ``RoundInt8`` of :data:`DOMAIN`."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    types = [
        ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
        ("Q", ["tensor(uint8)", "tensor(int8)", "tensor(bfloat16)"], "quantized values"),
        ("S", ["tensor(float)", "tensor(float16)"], "scales and minimums"),
        ("I", ["tensor(int64)", "tensor(int32)"], "row ids"),
    ]
    k = OpSchema.Attribute("k", OpSchema.AttrType.INT, "the weight's input size")
    rank = OpSchema.Attribute("rank", OpSchema.AttrType.INT, "the input's rank", required=False)
    tensors = [
        param("q", "Q"),
        param("scale", "S", param_option=optional),
        param("minimum", "S", param_option=optional),
    ]
    qlinear = OpSchema(
        "QLinear",
        DOMAIN,
        1,
        inputs=[param("x", "T"), *tensors, param("bias", "T", param_option=optional)],
        outputs=[param("y", "T")],
        type_constraints=types,
        attributes=[k, rank],
    )
    qembedding = OpSchema(
        "QEmbedding",
        DOMAIN,
        1,
        inputs=[param("ids", "I"), *tensors],
        outputs=[param("rows", "T")],
        type_constraints=types,
        attributes=[k],
    )
    round_int8 = OpSchema(
        "RoundInt8",
        DOMAIN,
        1,
        inputs=[param("x", "T")],
        outputs=[param("y", "T")],
        type_constraints=types[:1],
        attributes=[
            OpSchema.Attribute("group", OpSchema.AttrType.INT, "values per block"),
            k,
            OpSchema.Attribute("rank", OpSchema.AttrType.INT, "the input's rank"),
        ],
    )
    return qlinear, qembedding, round_int8


def translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: the two ops as ``effx`` placeholder nodes."""
    import onnxscript
    import torch

    opset = onnxscript.values.Opset(DOMAIN, 1)
    qlinear_schema, qembedding_schema, round_schema = _schemas()
    qlinear_op = onnxscript.values.Op(opset, "QLinear", qlinear_schema)
    qembedding_op = onnxscript.values.Op(opset, "QEmbedding", qembedding_schema)
    round_op = onnxscript.values.Op(opset, "RoundInt8", round_schema)

    def qlinear(x, q, scale, minimum, bias):
        return qlinear_op(x, q, scale, minimum, bias, k=int(x.shape[-1]), rank=len(x.shape))

    def qembedding(ids, q, scale, minimum, k: int):
        return qembedding_op(ids, q, scale, minimum, k=k)

    def round_int8(x, group: int):
        return round_op(x, group=group, k=int(x.shape[-1]), rank=len(x.shape))

    return {
        torch.ops.effx.qlinear.default: qlinear,
        torch.ops.effx.qembedding.default: qembedding,
        torch.ops.effx.round_int8.default: round_int8,
    }
