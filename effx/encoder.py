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

import torch

from .errors import PassError

__all__ = ["EncoderInfo", "EncoderProgram", "apply_token_drop"]


@dataclass(frozen=True)
class EncoderInfo:
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

    def __init__(self, embed, layers, info: EncoderInfo, drops=None, special=(), reports=()):
        self.embed = embed
        self.layers = list(layers)
        self.info = info
        self.drops: dict[int, EncoderDrop] = dict(drops or {})
        self.special = tuple(special)
        self.reports = tuple(reports)

    def __repr__(self) -> str:
        return f"EncoderProgram({self.info.architecture}, {self.info.num_layers} layers, drops={sorted(self.drops)})"

    def hidden_states(self, input_ids, attention_mask=None, *, stats: dict | None = None):
        """Last hidden states ``[batch, kept, hidden]`` and which of them are real tokens ``[batch, kept]``
        (all positions when nothing is dropped)."""
        from .runtime.token_drop import keep_quota, select_tokens

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid = attention_mask.bool()
        with torch.inference_mode():
            hidden = self.embed(input_ids, torch.zeros_like(input_ids))[0]
            real = valid.sum(1)
            protected = torch.isin(input_ids, torch.tensor(self.special, dtype=input_ids.dtype))
            protected[:, 0] = True  # CLS
            kept = {}
            for i, layer in enumerate(self.layers):
                if i in self.drops:
                    drop = self.drops[i]
                    scores = drop.score(hidden, _mask(valid, hidden.dtype))[0]
                    quota = keep_quota(real, drop.keep)
                    idx, valid = select_tokens(scores, valid, protected, quota)
                    hidden = drop.gather(hidden, idx)[0]
                    protected = protected.gather(1, idx)
                    kept[i] = valid.sum(1).tolist()
                hidden = layer(hidden, _mask(valid, hidden.dtype))[0]
        if stats is not None:
            stats["kept_tokens"] = kept
        return hidden, valid

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

    def with_drops(self, drops, special, report) -> EncoderProgram:
        return EncoderProgram(self.embed, self.layers, self.info, drops, special, self.reports + (report,))


def _mask(valid: torch.Tensor, dtype) -> torch.Tensor:
    """Additive bidirectional mask ``[batch, 1, seq, seq]``: padding (and dropped passengers) as keys."""
    m = torch.zeros(valid.shape[0], 1, valid.shape[1], valid.shape[1], dtype=dtype)
    return m.masked_fill(~valid[:, None, None, :], torch.finfo(dtype).min)


def apply_token_drop(p, program: EncoderProgram) -> EncoderProgram:
    from .passes.token_drop import encoder_score_graph, hidden_gather_graph, norm_score_graph

    n = program.info.num_layers
    bad = [x for x in p.at_layers if x >= n]
    if bad:
        raise PassError(f"token-drop layers {bad} are out of range: the encoder has layers 0..{n - 1}")
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
    report.notes.append(f"always kept: the first token (CLS) and token ids {list(p.special)}")
    return program.with_drops(drops, p.special, report)
