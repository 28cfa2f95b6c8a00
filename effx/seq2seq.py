"""Encoder-decoder (BART, T5) programs, and token elimination on their encoder (ELITE).

``effx.transform_seq2seq(model, passes=[TokenDrop(...)])`` captures a ``BartForConditionalGeneration`` or a
``T5ForConditionalGeneration`` (:func:`effx.capture.capture_seq2seq`) and drops encoder tokens as on BERT
(:mod:`effx.encoder`): before each drop layer every token is rated by the attention it receives, each input
keeps its share of the best (and always its first token, the stop token and the ``special`` ids), and the
later encoder layers run on the kept tokens only (T5's at their original positions). The decoder's cross-attention keys and values are then computed from the kept tokens, once per
prompt, so every decoder step reads only those: less prefill, and less cross-attention per step.

``generate`` is greedy ``model.generate`` (decoder start, forced first/last tokens, stop and pad ids from the
model's generation config) run by :func:`effx.runtime.seq2seq.generate_seq2seq`, the loop the ONNX artifact
(:mod:`effx.exporters.onnx_seq2seq`) runs too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .encoder import EncoderProgram, apply_token_drop
from .passes import TokenDrop
from .passes.base import PassReport, register_family_apply
from .runtime.seq2seq import bidirectional_mask, generate

__all__ = ["Seq2SeqInfo", "Seq2SeqProgram", "apply_token_drop_seq2seq"]


@dataclass(frozen=True)
class Seq2SeqInfo:
    family: ClassVar[str] = "encoder-decoder"

    architecture: str
    model_type: str
    encoder_layers: int
    decoder_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    dtype: str
    relative_bias: bool = False  # T5: encoder.bias and decoder.bias stages

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Seq2SeqProgram:
    """An encoder (:class:`EncoderProgram`) and the decoder's stages: ``embed``, ``cross[i]`` (cross-attention
    K/V of the encoder's output), ``layers[i]`` and ``head``; ``generation`` holds the greedy defaults."""

    def __init__(
        self,
        encoder: EncoderProgram,
        embed,
        cross,
        layers,
        head,
        info: Seq2SeqInfo,
        generation: dict,
        *,
        decoder_bias=None,
    ):
        self.encoder = encoder
        self.embed = embed
        self.cross = list(cross)
        self.layers = list(layers)
        self.head = head
        self.info = info
        self.generation = dict(generation)
        self.decoder_bias = decoder_bias  # T5: (query_positions, key_positions) -> relative position bias

    def __repr__(self) -> str:
        return (
            f"Seq2SeqProgram({self.info.architecture}, {self.info.encoder_layers}+{self.info.decoder_layers} "
            f"layers, encoder drops={sorted(self.encoder.drops)})"
        )

    @property
    def reports(self) -> tuple:
        return self.encoder.reports

    @property
    def passes(self) -> tuple:
        """The passes applied (JSON records): every pass an encoder-decoder takes rewrites its encoder."""
        return self.encoder.passes

    def with_pass(self, record: dict[str, Any], report: PassReport) -> Seq2SeqProgram:
        """The same program with a pass recorded and its report kept (on the encoder, which it rewrote)."""
        return self.with_encoder(self.encoder.with_pass(record, report))

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.info.dtype)

    def stages(self) -> dict[str, torch.nn.Module]:
        """Every stage by its :mod:`effx.runtime.seq2seq` name (what the ONNX export writes)."""
        enc = self.encoder
        out = {"encoder.embed": enc.embed}
        out.update({f"encoder.layer.{i}": gm for i, gm in enumerate(enc.layers)})
        out.update({f"encoder.score.{i}": d.score for i, d in enc.drops.items()})
        if enc.drops:
            out["encoder.gather"] = next(iter(enc.drops.values())).gather
        if enc.bias is not None:
            out["encoder.bias"] = enc.bias
        if self.decoder_bias is not None:
            out["decoder.bias"] = self.decoder_bias
        out["decoder.embed"] = self.embed
        out.update({f"decoder.cross.{i}": gm for i, gm in enumerate(self.cross)})
        out.update({f"decoder.layer.{i}": gm for i, gm in enumerate(self.layers)})
        out["head"] = self.head
        return out

    def run(self, name: str, *args) -> tuple:
        if name.startswith("encoder."):
            return self.encoder.run(name, *args)
        if name == "decoder.embed":
            return self.embed(*args)
        if name == "head":
            return self.head(*args)
        if name == "decoder.bias" and self.decoder_bias is not None:
            return self.decoder_bias(*args)
        kind, _, index = name.removeprefix("decoder.").partition(".")
        if kind == "cross":
            return self.cross[int(index)](*args)
        if kind == "layer":
            return self.layers[int(index)](*args)
        raise KeyError(f"no stage named {name!r}")

    def logits(self, input_ids, decoder_input_ids, attention_mask=None):
        """Teacher-forced logits ``[batch, decoder_len, vocab]`` (a full decoder forward, no cache)."""
        import array_api_compat.torch as xp

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.inference_mode():
            enc, valid = self.encoder.hidden_states(input_ids, attention_mask)
            cross_mask = bidirectional_mask(xp, valid, enc.dtype, queries=1)
            b, n = decoder_input_ids.shape
            hidden = self.embed(decoder_input_ids, torch.arange(n).expand(b, n))[0]
            causal = torch.full((n, n), torch.finfo(enc.dtype).min, dtype=enc.dtype).triu(1)
            mask = causal.expand(b, 1, n, n)
            if self.decoder_bias is not None:
                positions = torch.arange(n).expand(b, n)
                mask = mask + self.decoder_bias(positions, positions)[0]
            empty = torch.zeros(b, self.info.num_heads, 0, self.info.head_dim, dtype=enc.dtype)
            for cross, layer in zip(self.cross, self.layers, strict=True):
                hidden = layer(hidden, mask, empty, empty, *cross(enc), cross_mask)[0]
            return self.head(hidden)[0]

    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        max_new_tokens: int | None = None,
        eos_token_id=None,
        pad_token_id: int | None = None,
        stats: dict | None = None,
        **kwargs,
    ):
        """Greedy decoding like ``model.generate(input_ids, attention_mask=..., max_new_tokens=...)``: the
        decoder ids ``[batch, 1 + new]``, starting with the decoder start token. ``stats`` gets the kept
        encoder tokens (see :func:`effx.runtime.seq2seq.encode`) and ``cross_keys``, what each decoder step's
        cross-attention reads per row."""
        import array_api_compat.torch as xp

        with torch.inference_mode():
            return generate(
                self.run,
                xp,
                self.dtype,
                input_ids,
                attention_mask,
                info=self.info.to_dict(),
                generation=self.generation,
                drops={i: d.keep for i, d in self.encoder.drops.items()},
                special=self.encoder.special,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                stats=stats,
                kwargs=kwargs,
            )

    def with_encoder(self, encoder: EncoderProgram) -> Seq2SeqProgram:
        return Seq2SeqProgram(
            encoder,
            self.embed,
            self.cross,
            self.layers,
            self.head,
            self.info,
            self.generation,
            decoder_bias=self.decoder_bias,
        )


@register_family_apply(TokenDrop, "encoder-decoder")
def apply_token_drop_seq2seq(p: TokenDrop, program: Seq2SeqProgram) -> tuple[Seq2SeqProgram, PassReport]:
    """TokenDrop on the encoder of ``program``, and its report; the decoder's stop token is always kept
    (with ``p.special``)."""
    eos = program.generation["eos_token_id"]
    encoder, report = apply_token_drop(
        p, program.encoder, extra_special=tuple(e for e in eos if e not in p.special)
    )
    return (program if encoder is program.encoder else program.with_encoder(encoder)), report
