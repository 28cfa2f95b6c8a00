"""Encoders (BERT-style) as staged programs, and token drop on them (PoWER-BERT / ELITE-style).

``effx.transform_encoder(model, passes=[TokenDrop(...)])`` captures a ``BertModel`` (``effx.capture_encoder``)
and applies token drop: before each drop layer, every token's importance is the attention it receives from
all real tokens (the layer's own q/k projections, averaged over heads and queries) or its hidden-state norm
(uninformative on post-LayerNorm encoders such as BERT, whose states all have norm sqrt(hidden): ties go to
the earlier token);
each sample keeps ``keep`` of its real tokens with the highest scores, always with its first token (CLS)
and the ``special`` ids (e.g. SEP), and the later layers run on the kept tokens only. ``encode`` mean-pools
(or takes CLS) over the tokens that reached the last layer and L2-normalizes, as sentence-transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .errors import PassError
from .passes import TokenDrop
from .passes.base import PassReport, register_family_apply
from .passes.token_drop import encoder_score_graph, hidden_gather_graph, norm_score_graph
from .runtime.seq2seq import encode

__all__ = ["EncoderInfo", "EncoderProgram", "apply_token_drop"]


@dataclass(frozen=True)
class EncoderInfo:
    family: ClassVar[str] = "encoder"

    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    max_positions: int


@dataclass(frozen=True)
class EncoderDrop:
    keep: float
    score: torch.fx.GraphModule  # (hidden, mask) -> scores [batch, seq]
    gather: torch.fx.GraphModule  # (hidden, keep_ids) -> hidden


class EncoderProgram:
    """An encoder as stages: ``embed`` and ``layers``, plus token-drop points (layer -> EncoderDrop)."""

    def __init__(
        self,
        embed,
        layers,
        info: EncoderInfo,
        drops=None,
        special=(),
        reports=(),
        *,
        token_types=True,
        bias=None,
        passes=(),
    ):
        self.embed = embed
        self.layers = list(layers)
        self.info = info
        self.drops: dict[int, EncoderDrop] = dict(drops or {})
        self.special = tuple(special)
        self.reports = tuple(reports)
        self.passes = tuple(passes)  # the passes applied, as JSON records (Pass.to_json)
        self.token_types = token_types  # BERT's embed takes token type ids (zeros); BART's does not
        self.bias = bias  # T5: (positions) -> relative position bias, added to every layer's mask

    def __repr__(self) -> str:
        return f"EncoderProgram({self.info.architecture}, {self.info.num_layers} layers, drops={sorted(self.drops)})"

    def run(self, name: str, *args) -> tuple:
        """Run one stage by the name :func:`effx.runtime.seq2seq.encode` gives it."""
        if name == "encoder.embed":
            ids = args[0]
            return self.embed(ids, torch.zeros_like(ids)) if self.token_types else self.embed(ids)
        kind, _, index = name.removeprefix("encoder.").partition(".")
        if kind == "layer":
            return self.layers[int(index)](*args)
        if kind == "score":
            return self.drops[int(index)].score(*args)
        if kind == "bias" and self.bias is not None:
            return self.bias(*args)
        if kind == "gather":
            return next(iter(self.drops.values())).gather(*args)
        raise KeyError(f"no encoder stage named {name!r}")

    def hidden_states(self, input_ids, attention_mask=None, *, stats: dict | None = None):
        """Last hidden states ``[batch, kept, hidden]`` and which of them are real tokens ``[batch, kept]``
        (all positions when nothing is dropped). ``stats``: see :func:`effx.runtime.seq2seq.encode`."""
        import array_api_compat.torch as xp

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.inference_mode():
            return encode(
                self.run,
                xp,
                self.embed_dtype,
                input_ids,
                attention_mask.bool(),
                drops={i: d.keep for i, d in self.drops.items()},
                special=self.special,
                num_layers=len(self.layers),
                relative_bias=self.bias is not None,
                stats=stats,
            )

    @property
    def embed_dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.embed.parameters()), torch.float32)

    def encode(
        self, input_ids, attention_mask=None, *, pooling: str = "mean", normalize: bool = True, stats=None
    ):
        """Sentence embeddings ``[batch, hidden]``: mean over the real tokens that reached the last layer
        (``pooling="mean"``) or the CLS state (``"cls"``), L2-normalized unless ``normalize=False``."""
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        hidden, valid = self.hidden_states(input_ids, attention_mask, stats=stats)
        if pooling == "cls":
            out = hidden[:, 0]
        else:
            w = valid[..., None].to(hidden.dtype)
            out = (hidden * w).sum(1) / w.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    def _replace(self, **changes) -> EncoderProgram:
        fields = dict(
            drops=self.drops,
            special=self.special,
            reports=self.reports,
            token_types=self.token_types,
            bias=self.bias,
            passes=self.passes,
        )
        fields.update(changes)
        return EncoderProgram(self.embed, self.layers, self.info, **fields)

    def with_drops(self, drops, special) -> EncoderProgram:
        return self._replace(drops=drops, special=special)

    def with_pass(self, record: dict[str, Any], report: PassReport) -> EncoderProgram:
        """The same program with a pass recorded and its report kept (the PassManager's job)."""
        return self._replace(passes=self.passes + (record,), reports=self.reports + (report,))


@register_family_apply(TokenDrop, "encoder")
def apply_token_drop(
    p: TokenDrop, program: EncoderProgram, *, extra_special: tuple[int, ...] = ()
) -> tuple[EncoderProgram, PassReport]:
    """TokenDrop ``p`` on an encoder, and its report; ``extra_special``: ids kept besides ``p.special`` (a
    decoder's stop token). The input program comes back when every keep ratio is 1."""
    p.check_layers(program.info.num_layers)
    if program.drops:
        raise PassError(f"the encoder already drops tokens before layers {sorted(program.drops)}")
    report = p.new_report()
    gather = hidden_gather_graph(program.info.hidden_size)
    drops = {}
    for j, keep in zip(p.at_layers, p.keeps(), strict=True):
        if keep >= 1:
            report.skip(f"layer.{j}", "keep=1.0: nothing to drop")
            continue
        if p.score == "attention":
            score = encoder_score_graph(program.layers[j])
        else:
            score = norm_score_graph(program.info, encoder=True)
        drops[j] = EncoderDrop(keep, score, gather)
        report.change(f"layer.{j}", f"from here on {keep:.0%} of each input ({p.score} score)")
    if not drops:
        return program, report
    special = tuple(p.special) + tuple(extra_special)
    report.notes.append(f"always kept: the first token and token ids {list(special)}")
    return program.with_drops(drops, special), report
