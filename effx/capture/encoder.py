"""Capture a BERT-style encoder as an :class:`~effx.encoder.EncoderProgram`, and ``transform_encoder``:
capture followed by encoder token drop, the one pass an encoder takes.

:func:`tag_encoder` writes the node roles of encoder stages; the encoder-decoder capture
(:mod:`effx.capture.seq2seq`) tags its stages with it too, and exports BART's encoder layers with
:class:`EncoderLayer`.
"""

from __future__ import annotations

import copy

import torch

from ..encoder import EncoderInfo, EncoderProgram
from ..fx import Dim, export_module, rebind
from ..passes import PassManager
from .common import (
    ENCODER_MODEL_TYPES,
    export_step,
    fail,
    private_copy,
    register_attention,
    require_type,
    structure,
)

__all__ = ["EncoderLayer", "capture_encoder", "tag_encoder", "transform_encoder"]

_ENCODER_ROLES = {
    "word_embeddings": "embed",
    "embed_tokens": "embed",
    "query": "attn.q",
    "key": "attn.k",
    "value": "attn.v",
    "q_proj": "attn.q",
    "k_proj": "attn.k",
    "v_proj": "attn.v",
    "out_proj": "attn.o",
    "fc1": "mlp.up",
    "fc2": "mlp.down",
    "q": "attn.q",  # T5
    "k": "attn.k",
    "v": "attn.v",
    "o": "attn.o",
    "wi": "mlp.up",
    "wo": "mlp.down",
    "lm_head": "lm_head",
}


class _EncoderEmbed(torch.nn.Module):
    def __init__(self, embeddings):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids, token_type_ids):
        return (self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids),)


class EncoderLayer(torch.nn.Module):
    """An encoder layer ``(hidden, mask) -> hidden`` with an explicit additive mask (BERT, BART)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, mask):
        out = self.layer(hidden, attention_mask=mask)
        return (out[0] if isinstance(out, tuple) else out,)


def capture_encoder(model, *, verify: bool = True):
    """Capture a BERT-style encoder (``BertModel``) as an :class:`~effx.encoder.EncoderProgram`.

    Stages: ``embed (input_ids, token_type_ids) -> hidden`` (word, position and type embeddings, layer norm)
    and ``layer.i (hidden, mask) -> hidden`` with an explicit additive mask ``[batch, 1, seq, seq]``
    (bidirectional: padding keys are masked). Batch and sequence are dynamic.
    """
    config = require_type(model, ENCODER_MODEL_TYPES, "an encoder")
    base = getattr(model, "bert", model)
    if not (hasattr(base, "embeddings") and hasattr(base, "encoder")):
        raise fail(model, "check architecture", "expected .embeddings and .encoder.layer (a BERT encoder)")
    register_attention()
    clone = private_copy(base)
    b, s, d = 2, 7, config.hidden_size
    seq = Dim("seq", min=1, max=config.max_position_embeddings)  # position embeddings bound the length
    batch = Dim("batch", min=1)
    ids = torch.randint(0, config.vocab_size, (b, s))
    types = torch.zeros(b, s, dtype=torch.long)
    with export_step(model, "export"):
        embed = export_module(
            _EncoderEmbed(clone.embeddings), (ids, types), ({0: batch, 1: seq}, {0: batch, 1: seq})
        )
        hidden = torch.randn(b, s, d)
        mask = torch.zeros(b, 1, s, s)
        template = export_module(
            EncoderLayer(clone.encoder.layer[0]),
            (hidden, mask),
            ({0: batch, 1: seq}, {0: batch, 2: seq, 3: seq}),
        )
    tag_encoder(embed, None)
    layers = []
    for i, layer in enumerate(clone.encoder.layer):
        wrapped = EncoderLayer(layer)
        if structure(layer) != structure(clone.encoder.layer[0]):
            raise fail(model, "export", f"layer {i} differs in structure from layer 0")
        gm = template if i == 0 else rebind(template, copy.deepcopy(template.graph), wrapped)
        tag_encoder(gm, i)
        layers.append(gm)
    info = EncoderInfo(
        architecture=type(model).__name__,
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=d,
        num_heads=config.num_attention_heads,
        max_positions=config.max_position_embeddings,
    )
    program = EncoderProgram(embed, layers, info)
    if verify:
        with torch.no_grad():
            ids = torch.randint(0, config.vocab_size, (2, 9))
            mask = torch.ones(2, 9, dtype=torch.long)
            mask[1, 6:] = 0
            ref = base(input_ids=ids, attention_mask=mask).last_hidden_state
            got = program.hidden_states(ids, mask)[0]
            err = float((ref - got)[mask.bool()].abs().max())
        if err > 1e-4:
            raise fail(model, "verify", f"captured encoder differs from the model by {err:.2e}")
    return program


def tag_encoder(gm: torch.fx.GraphModule, layer: int | None) -> None:
    """Write ``effx_role``, ``effx_layer`` and ``effx_module`` on every node of an encoder or encoder-decoder
    stage graph."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        parts = [p for p in path.replace("L['self'].", "").split(".") if p and not p.isdigit()]
        role = next((_ENCODER_ROLES[p] for p in reversed(parts) if p in _ENCODER_ROLES), None)
        if node.op in ("placeholder", "output"):
            role = "io"
        elif node.op == "get_attr":
            role = "weight"
        elif node.target == torch.ops.aten.scaled_dot_product_attention.default:
            role = "attn.sdpa"
        node.meta.update(effx_role=role or "other", effx_layer=layer, effx_module=path)


def transform_encoder(model, passes=(), *, verify: bool = True):
    """Capture a BERT-style encoder and apply ``passes`` through the PassManager (TokenDrop only: the other
    passes rewrite decoder LMs, and are refused before capture)."""
    manager = PassManager(passes)
    manager.check_family(EncoderInfo.family, type(model).__name__)
    return manager.run(capture_encoder(model, verify=verify))
