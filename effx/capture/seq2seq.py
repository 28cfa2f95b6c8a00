"""Capture an encoder-decoder LM (BART, T5) as a :class:`~effx.seq2seq.Seq2SeqProgram`, and
``transform_seq2seq``: capture followed by TokenDrop on the encoder, the one pass such a program takes.

The encoder's stages are those of an encoder (:mod:`effx.capture.encoder`); the decoder's have their
self-attention cache explicit and take the cross-attention K/V, computed once per prompt, as inputs.
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F

from ..encoder import EncoderInfo, EncoderProgram
from ..fx import Dim, export_module, rebind, simplify
from ..passes import PassManager
from ..runtime.loop import as_ids
from ..seq2seq import Seq2SeqInfo, Seq2SeqProgram
from .common import (
    SEQ2SEQ_MODEL_TYPES,
    StageCache,
    check_logits,
    export_step,
    fail,
    private_copy,
    register_attention,
    require_type,
    structure,
)
from .encoder import EncoderLayer, tag_encoder

__all__ = ["capture_seq2seq", "transform_seq2seq"]


class _Seq2SeqEmbed(torch.nn.Module):
    """BART's embedding: scaled token embedding plus learned positions (offset by 2), then layer norm.
    ``position_ids`` None: the encoder's, ``0..seq-1`` whatever the padding (as BART does)."""

    def __init__(self, side):
        super().__init__()
        self.embed_tokens, self.embed_positions = side.embed_tokens, side.embed_positions
        self.layernorm_embedding = side.layernorm_embedding

    def forward(self, input_ids, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1])[None, :].expand(input_ids.shape[0], -1)
        offset = getattr(self.embed_positions, "offset", 0)
        positions = F.embedding(position_ids + offset, self.embed_positions.weight)
        return (self.layernorm_embedding(self.embed_tokens(input_ids) + positions),)


class _EncoderEmbedIds(torch.nn.Module):
    def __init__(self, embed: _Seq2SeqEmbed):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids)


class _DecoderEmbed(torch.nn.Module):
    def __init__(self, embed: _Seq2SeqEmbed):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids, position_ids):
        return self.embed(input_ids, position_ids)


class _CrossKV(torch.nn.Module):
    """A decoder layer's cross-attention keys and values ``[batch, heads, kept, head_dim]`` of the encoder's
    output: computed once per prompt, not once per step."""

    def __init__(self, attn):
        super().__init__()
        self.k_proj, self.v_proj = attn.k_proj, attn.v_proj
        self.head_dim = attn.head_dim

    def forward(self, encoder_hidden):
        shape = (*encoder_hidden.shape[:-1], -1, self.head_dim)
        k = self.k_proj(encoder_hidden).view(shape).transpose(1, 2)
        v = self.v_proj(encoder_hidden).view(shape).transpose(1, 2)
        return k, v


def _stage_encoder_decoder_cache(layer_idx, past_k, past_v, cross_k, cross_v):
    """The cache a BART decoder layer sees during export: its self-attention cache explicit (new K/V
    recorded), its cross-attention K/V given (``is_updated``: the layer reads them instead of projecting
    the encoder's output again)."""
    from types import SimpleNamespace

    from transformers.cache_utils import EncoderDecoderCache

    class _Cache(EncoderDecoderCache):
        def __init__(self):  # no super().__init__: only what BartAttention reads
            self.self_attention_cache = StageCache(past_k, past_v)
            self.cross_attention_cache = SimpleNamespace(
                layers={layer_idx: SimpleNamespace(keys=cross_k, values=cross_v)}
            )
            self.is_updated = {layer_idx: True}

    return _Cache()


class _DecoderLayer(torch.nn.Module):
    def __init__(self, layer, index: int):
        super().__init__()
        self.layer, self.index = layer, index
        params = inspect.signature(layer.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, hidden, mask, past_k, past_v, cross_k, cross_v, cross_mask):
        cache = _stage_encoder_decoder_cache(self.index, past_k, past_v, cross_k, cross_v)
        out = self.layer(
            hidden,
            attention_mask=mask,
            encoder_hidden_states=cross_k,  # only tested for None: the cross K/V come from the cache
            encoder_attention_mask=cross_mask,
            **{self.cache_arg: cache},
        )
        if isinstance(out, tuple):
            out = out[0]
        k, v = cache.self_attention_cache.new
        return out, k, v


class _Seq2SeqHead(torch.nn.Module):
    def __init__(self, lm_head, bias):
        super().__init__()
        self.lm_head = lm_head
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, hidden):
        return (self.lm_head(hidden) + self.bias,)


class _T5Embed(torch.nn.Module):
    """T5's embedding: the shared token table, no positions (those are the attention's relative bias).
    ``position_ids`` is the decoder stage's input and goes unused."""

    def __init__(self, embed_tokens):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids, position_ids=None):
        return (self.embed_tokens(input_ids),)


class _T5Bias(torch.nn.Module):
    """T5's relative position bias ``[batch, heads, queries, keys]`` for queries and keys at the given
    positions: the first layer's bucket table, which every layer of the stack adds to its scores. A stage
    of its own, so that a layer after TokenDrop sees the kept tokens' original positions."""

    def __init__(self, attn):
        super().__init__()
        self.table = attn.relative_attention_bias
        self.bucket = attn._relative_position_bucket
        self.bidirectional = not attn.is_decoder
        self.buckets, self.max_distance = (
            attn.relative_attention_num_buckets,
            attn.relative_attention_max_distance,
        )

    def forward(self, query_positions, key_positions):
        relative = key_positions[:, None, :] - query_positions[:, :, None]
        buckets = self.bucket(relative, self.bidirectional, self.buckets, self.max_distance)
        return (self.table(buckets).permute(0, 3, 1, 2),)


class _T5EncoderBias(torch.nn.Module):
    def __init__(self, bias: _T5Bias):
        super().__init__()
        self.bias = bias

    def forward(self, positions):
        return self.bias(positions, positions)


class _T5EncoderLayer(torch.nn.Module):
    """A T5 encoder block; its ``mask`` input is the padding mask plus the relative bias."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden, mask):
        return (self.block(hidden, attention_mask=None, position_bias=mask)[0],)


class _T5CrossKV(torch.nn.Module):
    """The encoder's final norm, then a decoder layer's cross-attention keys and values."""

    def __init__(self, final_norm, attn):
        super().__init__()
        self.final_norm, self.k, self.v = final_norm, attn.k, attn.v
        self.head_dim = attn.key_value_proj_dim

    def forward(self, encoder_hidden):
        h = self.final_norm(encoder_hidden)
        shape = (*h.shape[:-1], -1, self.head_dim)
        return self.k(h).view(shape).transpose(1, 2), self.v(h).view(shape).transpose(1, 2)


class _T5DecoderLayer(torch.nn.Module):
    """A T5 decoder block; ``mask`` is the causal mask plus the decoder's relative bias."""

    def __init__(self, block, index: int):
        super().__init__()
        self.block, self.index = block, index

    def forward(self, hidden, mask, past_k, past_v, cross_k, cross_v, cross_mask):
        cache = _stage_encoder_decoder_cache(self.index, past_k, past_v, cross_k, cross_v)
        out = self.block(
            hidden,
            attention_mask=None,
            position_bias=mask,
            encoder_hidden_states=cross_k,  # only tested for None: the cross K/V come from the cache
            encoder_attention_mask=cross_mask,
            cache=cache,
        )[0]
        k, v = cache.self_attention_cache.new
        return out, k, v


class _T5Head(torch.nn.Module):
    def __init__(self, final_norm, lm_head, scale: float):
        super().__init__()
        self.final_norm, self.lm_head, self.scale = final_norm, lm_head, scale

    def forward(self, hidden):
        return (self.lm_head(self.final_norm(hidden) * self.scale),)


class _Seq2SeqParts:
    """What capture_seq2seq exports, by model family: wrappers around the model's own modules."""

    def __init__(self, model):
        config = model.config
        self.t5 = config.model_type == "t5"
        if self.t5:
            enc, dec = private_copy(model.encoder), private_copy(model.decoder)
            self.enc_blocks, self.dec_blocks = list(enc.block), list(dec.block)
            self.enc_embed = _EncoderEmbedIds(_T5Embed(enc.embed_tokens))
            self.dec_embed = _DecoderEmbed(_T5Embed(dec.embed_tokens))
            self.enc_layer = _T5EncoderLayer
            self.cross = lambda i: _T5CrossKV(enc.final_layer_norm, dec.block[i].layer[1].EncDecAttention)
            self.dec_layer = lambda i: _T5DecoderLayer(dec.block[i], i)
            scale = config.d_model**-0.5 if getattr(config, "scale_decoder_outputs", False) else 1.0
            self.head = _T5Head(dec.final_layer_norm, model.lm_head, scale)
            self.enc_bias = _T5EncoderBias(_T5Bias(enc.block[0].layer[0].SelfAttention))
            self.dec_bias = _T5Bias(dec.block[0].layer[0].SelfAttention)
            self.heads, self.head_dim = config.num_heads, config.d_kv
            self.enc_heads = config.num_heads
            self.max_positions = 4096  # relative positions: no table bounds the length
        else:
            base = private_copy(model.model)
            enc, dec = base.encoder, base.decoder
            self.enc_blocks, self.dec_blocks = list(enc.layers), list(dec.layers)
            self.enc_embed = _EncoderEmbedIds(_Seq2SeqEmbed(enc))
            self.dec_embed = _DecoderEmbed(_Seq2SeqEmbed(dec))
            self.enc_layer = EncoderLayer
            self.cross = lambda i: _CrossKV(dec.layers[i].encoder_attn)
            self.dec_layer = lambda i: _DecoderLayer(dec.layers[i], i)
            bias = getattr(model, "final_logits_bias", None)
            bias = torch.zeros(config.vocab_size, dtype=model.dtype) if bias is None else bias.reshape(-1)
            self.head = _Seq2SeqHead(model.lm_head, bias)
            self.enc_bias = self.dec_bias = None
            self.heads = config.decoder_attention_heads
            self.head_dim = config.d_model // self.heads
            self.enc_heads = config.encoder_attention_heads
            self.max_positions = config.max_position_embeddings


def _check_seq2seq(model) -> None:
    model_type = require_type(model, SEQ2SEQ_MODEL_TYPES, "an encoder-decoder model").model_type
    if not hasattr(model, "lm_head"):
        raise fail(model, "check architecture", "expected model.lm_head: a ...ForConditionalGeneration model")
    if model_type == "t5":
        if not (hasattr(model, "encoder") and hasattr(model, "decoder")):
            raise fail(
                model,
                "check architecture",
                "expected model.encoder and .decoder (T5ForConditionalGeneration)",
            )
        return
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "encoder") or not hasattr(base, "decoder"):
        raise fail(model, "check architecture", "expected model.model.encoder and .decoder (a seq2seq LM)")
    for side in (base.encoder, base.decoder):
        if getattr(side, "layer_norm", None) is not None:
            raise fail(
                model, "check architecture", "a final encoder/decoder layer norm (mBART) is not supported"
            )


class _Seq2SeqExport:
    """The stages of an encoder-decoder model (:class:`_Seq2SeqParts`), each exported on small example
    inputs with batch, sequence, past and encoder (``kept``) length dynamic; a failed export names its step.
    """

    B, S, P, E = 2, 3, 2, 5  # example sizes: batch, decoder tokens, cached tokens, encoder tokens

    def __init__(self, model, parts: _Seq2SeqParts):
        self.model, self.parts = model, parts
        max_pos = parts.max_positions
        self.batch, self.seq, self.past, self.kept = (
            Dim("batch", min=1, max=1024),
            Dim("seq", min=1, max=max_pos),
            Dim("past", min=0, max=max_pos),
            Dim("kept", min=1, max=max_pos),
        )
        self.d, self.dtype = model.config.d_model, model.dtype
        self.mask_heads = parts.enc_heads if parts.t5 else 1  # T5's masks carry the per-head bias
        self.hidden: torch.Tensor | None = None  # an example encoder output, once encoder() has run

    def encoder(self) -> tuple[torch.fx.GraphModule, list[torch.fx.GraphModule]]:
        """The encoder's ``embed`` and ``layer.i`` stages."""
        parts, B, E, batch, kept = self.parts, self.B, self.E, self.batch, self.kept
        with export_step(self.model, "export encoder embed"):
            ids = torch.zeros(B, E, dtype=torch.long)
            embed = export_module(parts.enc_embed, (ids,), ({0: batch, 1: kept},))
            self.hidden = torch.randn(B, E, self.d, dtype=self.dtype)
        layers: list[torch.fx.GraphModule] = []
        for i, block in enumerate(parts.enc_blocks):
            with export_step(self.model, f"export encoder layer {i}"):
                first = parts.enc_blocks[0]
                # T5's first block owns the bias table: its structure differs, its graph (bias given) does not
                same = layers and (parts.t5 or structure(block) == structure(first))
                if same:
                    gm = rebind(layers[0], copy.deepcopy(layers[0].graph), parts.enc_layer(block))
                else:
                    gm = export_module(
                        parts.enc_layer(block),
                        (self.hidden, torch.zeros(B, self.mask_heads, E, E, dtype=self.dtype)),
                        ({0: batch, 1: kept}, {0: batch, 2: kept, 3: kept}),
                    )
            layers.append(gm)
        return embed, layers

    def bias(self) -> tuple[torch.fx.GraphModule | None, torch.fx.GraphModule | None]:
        """T5's relative position bias stages, encoder's and decoder's (``(None, None)`` for BART)."""
        if not self.parts.t5:
            return None, None
        B, S, P, E, batch = self.B, self.S, self.P, self.E, self.batch
        with export_step(self.model, "export relative position bias"):
            positions = torch.arange(E).expand(B, E).clone()
            enc_bias = export_module(self.parts.enc_bias, (positions,), ({0: batch, 1: self.kept},))
            dec_bias = export_module(
                self.parts.dec_bias,
                (torch.arange(S).expand(B, S) + P, torch.arange(P + S).expand(B, P + S).clone()),
                ({0: batch, 1: self.seq}, {0: batch, 1: Dim.AUTO}),
            )
        return enc_bias, dec_bias

    def decoder(self):
        """The decoder's ``embed``, ``cross.i`` and ``layer.i`` stages and the ``head`` (after
        :meth:`encoder`: the cross stages take its example output)."""
        parts, B, S, P, E, dtype = self.parts, self.B, self.S, self.P, self.E, self.dtype
        batch, seq, past, kept = self.batch, self.seq, self.past, self.kept
        with export_step(self.model, "export decoder embed"):
            ids = torch.zeros(B, S, dtype=torch.long)
            pos = torch.arange(S).expand(B, S).clone()
            embed = export_module(parts.dec_embed, (ids, pos), ({0: batch, 1: seq},) * 2)
            x = torch.randn(B, S, self.d, dtype=dtype)
            kv = torch.randn(B, parts.heads, P, parts.head_dim, dtype=dtype)
            ckv = torch.randn(B, parts.heads, E, parts.head_dim, dtype=dtype)
            self_mask = torch.zeros(B, self.mask_heads, S, P + S, dtype=dtype)
            args = (x, self_mask, kv, kv.clone(), ckv, ckv.clone(), torch.zeros(B, 1, 1, E, dtype=dtype))
        dynamic = (
            {0: batch, 1: seq},
            {0: batch, 2: seq, 3: Dim.AUTO},
            {0: batch, 2: past},
            {0: batch, 2: past},
            {0: batch, 2: kept},
            {0: batch, 2: kept},
            {0: batch, 3: kept},
        )
        cross, layers = [], []
        for i, block in enumerate(parts.dec_blocks):
            with export_step(self.model, f"export decoder layer {i}"):
                if layers and (parts.t5 or structure(block) == structure(parts.dec_blocks[0])):
                    cross.append(rebind(cross[0], copy.deepcopy(cross[0].graph), parts.cross(i)))
                    layers.append(rebind(layers[0], copy.deepcopy(layers[0].graph), parts.dec_layer(i)))
                else:
                    cross.append(export_module(parts.cross(i), (self.hidden,), ({0: batch, 1: kept},)))
                    layers.append(export_module(parts.dec_layer(i), args, dynamic))
        with export_step(self.model, "export head"):
            head = export_module(parts.head, (x,), ({0: batch, 1: seq},))
        return embed, cross, layers, head


def capture_seq2seq(model, *, verify: bool = True):
    """Capture an encoder-decoder LM (``BartForConditionalGeneration``, ``T5ForConditionalGeneration``) as a
    :class:`~effx.seq2seq.Seq2SeqProgram`.

    The encoder is an :class:`~effx.encoder.EncoderProgram` (``embed (input_ids) -> hidden``, ``layer.i
    (hidden, mask) -> hidden``), so TokenDrop applies to it as to BERT. The decoder's stages are those of
    :mod:`effx.runtime.seq2seq`: ``decoder.embed``, ``decoder.cross.i`` (cross-attention K/V of the encoder's
    output, once per prompt), ``decoder.layer.i`` with its self-attention cache explicit, and ``head`` (LM head
    plus BART's ``final_logits_bias``). T5's relative position bias is a stage per stack (``encoder.bias``,
    ``decoder.bias``) that the runtime adds to the masks, from the tokens' original positions; its encoder's
    final norm is part of each ``decoder.cross.i``, its decoder's of ``head``. Batch, sequence and past
    length are dynamic. ``verify`` checks the stages against the model's own forward.
    """
    _check_seq2seq(model)
    register_attention()
    config = model.config
    parts = _Seq2SeqParts(model)
    export = _Seq2SeqExport(model, parts)
    enc_embed, enc_layers = export.encoder()
    enc_bias, dec_bias = export.bias()
    dec_embed, cross, layers, head = export.decoder()
    for gm, layer in [(enc_embed, None), *[(g, i) for i, g in enumerate(enc_layers)]]:
        tag_encoder(gm, layer)
    stages = [
        (dec_embed, None),
        *[(g, i) for i, g in enumerate(cross)],
        *[(g, i) for i, g in enumerate(layers)],
    ]
    for gm, layer in [*stages, (head, None), *[(g, None) for g in (enc_bias, dec_bias) if g is not None]]:
        simplify(gm)
        tag_encoder(gm, layer)
    enc_info = EncoderInfo(
        architecture=type(model).__name__,
        model_type=config.model_type,
        num_layers=len(enc_layers),
        hidden_size=config.d_model,
        num_heads=parts.enc_heads,
        max_positions=parts.max_positions,
    )
    encoder = EncoderProgram(enc_embed, enc_layers, enc_info, token_types=False, bias=enc_bias)
    info = Seq2SeqInfo(
        architecture=type(model).__name__,
        model_type=config.model_type,
        encoder_layers=len(enc_layers),
        decoder_layers=len(layers),
        hidden_size=config.d_model,
        num_heads=parts.heads,
        head_dim=parts.head_dim,
        vocab_size=config.vocab_size,
        max_positions=parts.max_positions,
        dtype=str(model.dtype).replace("torch.", ""),
        relative_bias=parts.t5,
    )
    program = Seq2SeqProgram(
        encoder, dec_embed, cross, layers, head, info, _seq2seq_generation(model), decoder_bias=dec_bias
    )
    if verify:
        _verify_seq2seq(model, program)
    return program


def _seq2seq_generation(model) -> dict:
    """The generation defaults greedy ``model.generate`` applies: decoder start, stop and pad ids, forced
    first and last tokens."""
    gen = getattr(model, "generation_config", None)
    cfg = model.config

    def pick(name):
        value = getattr(gen, name, None) if gen is not None else None
        return getattr(cfg, name, None) if value is None else value

    eos = as_ids(pick("eos_token_id"))
    pad = pick("pad_token_id")
    start = pick("decoder_start_token_id")
    if start is None:
        start = pick("bos_token_id")
    if start is None:
        raise fail(
            model, "generation defaults", "the model's generation config has no decoder_start_token_id"
        )
    return {
        "decoder_start_token_id": int(start),
        "eos_token_id": eos,
        "pad_token_id": int(pad) if pad is not None else (eos[0] if eos else 0),
        "forced_bos_token_id": None
        if pick("forced_bos_token_id") is None
        else int(pick("forced_bos_token_id")),
        "forced_eos_token_id": None
        if pick("forced_eos_token_id") is None
        else int(pick("forced_eos_token_id")),
    }


def _verify_seq2seq(model, program) -> None:
    ids = torch.arange(3, 12, dtype=torch.long).remainder(program.info.vocab_size)[None].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    dec = torch.arange(4, 9, dtype=torch.long).remainder(program.info.vocab_size)[None].repeat(2, 1)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
        got = program.logits(ids, dec, mask)
    check_logits(model, ref, got, 1e-4)


def transform_seq2seq(model, passes=(), *, verify: bool = True):
    """Capture an encoder-decoder LM (BART, T5) and apply ``passes``: TokenDrop, on the encoder (ELITE), is the
    one that applies; the decoder's cross-attention then reads the kept tokens only. The other passes are
    refused with the pass and the architecture named."""
    manager = PassManager(passes)
    manager.check_family(Seq2SeqInfo.family, type(model).__name__)
    return manager.run(capture_seq2seq(model, verify=verify))
