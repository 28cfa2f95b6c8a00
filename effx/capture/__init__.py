"""Capture a Hugging Face model as staged ``torch.fx`` graphs: the one package that reaches into
transformers internals. It exports through ``effx.fx`` (the one module that calls ``torch.export``),
non-strict, with the attention function it registers with transformers (``"effx"``: SDPA with the explicit
mask the runtime builds, no shape-dependent branches, bitwise equal on CPU to the ``sdpa`` path that
``model.generate`` takes).

One module per family, each a kind of program:

* :mod:`~effx.capture.decoder`: decoder-only LMs of the Llama family (``capture``, a
  :class:`~effx.program.Program`: ``embed``, ``layer.i`` with its KV cache explicit, ``head``), and
  ``info_from_config``, the shapes passes check their settings against before capture;
* :mod:`~effx.capture.encoder`: BERT-style encoders (``capture_encoder``,
  :class:`~effx.encoder.EncoderProgram`);
* :mod:`~effx.capture.seq2seq`: BART and T5 encoder-decoders (``capture_seq2seq``,
  :class:`~effx.seq2seq.Seq2SeqProgram`: encoder stages, decoder stages with explicit self-attention cache
  and once-per-prompt cross-attention K/V);
* :mod:`~effx.capture.recurrent`: Mamba (``capture_mamba``, :class:`~effx.recurrent.RecurrentProgram`: the
  conv and SSM states as the cache).

``capture`` refuses the other families with the function to use; ``transform_encoder``,
``transform_seq2seq`` and ``transform_mamba`` are capture followed by the one pass each family takes.
:mod:`~effx.capture.common` holds what the families share. Capture checks its stages against the model's
own logits with the runtime, so it sits above the runtime and the encoder, encoder-decoder and recurrent
programs; the ONNX export of stage graphs is :mod:`effx.exporters.onnx_stage`, above capture.
"""

from .common import ENCODER_MODEL_TYPES, RECURRENT_MODEL_TYPES, SEQ2SEQ_MODEL_TYPES, SUPPORTED_MODEL_TYPES
from .decoder import capture, info_from_config, tag_roles
from .encoder import capture_encoder, transform_encoder
from .recurrent import capture_mamba, transform_mamba
from .seq2seq import capture_seq2seq, transform_seq2seq

__all__ = [
    "ENCODER_MODEL_TYPES",
    "RECURRENT_MODEL_TYPES",
    "SEQ2SEQ_MODEL_TYPES",
    "SUPPORTED_MODEL_TYPES",
    "capture",
    "capture_encoder",
    "capture_mamba",
    "capture_seq2seq",
    "info_from_config",
    "tag_roles",
    "transform_encoder",
    "transform_mamba",
    "transform_seq2seq",
]
