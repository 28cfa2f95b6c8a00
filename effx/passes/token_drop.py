"""TokenDrop: from chosen layers on, only the most important prompt tokens go through the prefill.

LazyLLM-style progressive prompt pruning for decoder LMs. Before each layer ``j`` in ``at_layers`` the pass
inserts two stages::

    ... -> layer.j-1 -> score.j -> drop.j -> layer.j -> ...
    score.j: (hidden, cos, sin, mask, past_k, past_v) -> scores [batch, tokens]
    drop.j:  (hidden, cos, sin, keep_ids) -> (hidden, cos, sin)      a gather along the token axis

``score="attention"``: the attention that the last ``queries`` prompt tokens pay to each token, computed
with layer ``j``'s own norm, query/key projections and rotary embedding (the layer graph cut to them),
averaged over heads and queries. ``score="norm"``: the hidden state's L2 norm. Between the two stages the
runtime keeps, per sample, ``keep`` of the prompt's real tokens (``keep`` counts the original prompt, so
``keep=[0.7, 0.5]`` at two layers drops 30% and then 20% more) with the highest scores, always including the
last ``protect_last`` tokens and the ``special`` token ids (end-of-sequence and chat markers by default:
the plan's eos ids plus ``special``). Positions (RoPE ``cos``/``sin``) are gathered with the tokens, so
they keep their original values.

KV stays consistent: a layer writes the keys and values of the tokens that reached it into their own cache
slots, the others are marked dropped for that layer, and every later token (decode, drafts) attends at
each layer to exactly the prompt tokens that reached it. Decoding itself is unchanged.

Encoders (BERT-style) take the same pass through ``effx.transform_encoder``; see :mod:`effx.encoder`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from ..errors import PassConfigError, PassError, PassPreconditionError
from ..fx import export_function
from ..plan import TokenDropPolicy
from ..program import Stage, torch_dtype
from .base import Pass, PassResult, check_size, register_pass

if TYPE_CHECKING:
    from ..plan import ModelInfo
    from ..program import Program

__all__ = ["TokenDrop"]

SCORES = ("attention", "norm")


@register_pass
@dataclasses.dataclass(frozen=True)
class TokenDrop(Pass):
    """Progressive prompt-token elimination in the prefill, with exact positions and KV."""

    name = "token-drop"
    # encoders drop tokens between their layers; an encoder-decoder's encoder does (effx.encoder, effx.seq2seq)
    families = ("decoder", "encoder", "encoder-decoder")

    at_layers: tuple[int, ...] = ()
    keep: tuple[float, ...] = (0.5,)
    score: str = "attention"
    protect_last: int = 4
    queries: int = 8
    special: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.at_layers:
            raise PassConfigError(
                "token-drop needs at_layers=[...]: the layers before which tokens are dropped"
            )
        if any(not isinstance(x, int) or x < 1 for x in self.at_layers):
            raise PassConfigError(
                f"token-drop at_layers must be integers >= 1 (layer 0 sees every token), got {list(self.at_layers)}"
            )
        if list(self.at_layers) != sorted(set(self.at_layers)):
            raise PassConfigError(
                f"token-drop at_layers must increase without repeats, got {list(self.at_layers)}"
            )
        if len(self.keep) not in (1, len(self.at_layers)):
            raise PassConfigError(
                f"token-drop has {len(self.at_layers)} drop layers but {len(self.keep)} keep ratios: give one, or one each"
            )
        if any(not isinstance(k, (int, float)) or not 0 < k <= 1 for k in self.keep):
            raise PassConfigError(
                f"token-drop keep ratios must be in (0, 1] (0 would leave no tokens), got {list(self.keep)}"
            )
        if list(self.keep) != sorted(self.keep, reverse=True):
            raise PassConfigError(
                f"token-drop keep ratios count the original prompt, so they cannot grow: {list(self.keep)}"
            )
        if self.score not in SCORES:
            raise PassConfigError(f"unknown token-drop score {self.score!r}; scores: {', '.join(SCORES)}")
        if not isinstance(self.protect_last, int) or self.protect_last < 1:
            raise PassConfigError(
                f"token-drop protect_last must be >= 1 (the last prompt token predicts the next), got {self.protect_last!r}"
            )
        if not isinstance(self.queries, int) or self.queries < 1:
            raise PassConfigError(f"token-drop queries must be an integer >= 1, got {self.queries!r}")

    def keeps(self) -> list[float]:
        return (
            [float(self.keep[0])] * len(self.at_layers)
            if len(self.keep) == 1
            else [float(k) for k in self.keep]
        )

    def check_layers(self, num_layers: int) -> None:
        """The drop layers are layers of a model (or an encoder) with ``num_layers`` layers."""
        bad = [x for x in self.at_layers if x >= num_layers]
        if bad:
            raise PassConfigError(
                f"token-drop layers {bad} are out of range: the model has layers 0..{num_layers - 1}"
            )

    def check_model(self, info: ModelInfo) -> None:
        self.check_layers(info.num_layers)
        check_size("token-drop queries", self.queries, info.max_positions, "max_positions")

    def check_after(self, earlier: Sequence[Pass]) -> None:
        if any(p.name == self.name for p in earlier):
            raise PassPreconditionError("an earlier token-drop already drops tokens")
        if any(p.name == "neuron-mask" and getattr(p, "mode", "") == "core" for p in earlier):
            raise PassPreconditionError(
                "token-drop and an earlier neuron-mask mode='core' both own the prefill; use one of them"
            )

    def requires(self, program: Program) -> None:
        """Layers in range, no earlier TokenDrop, and no per-prompt core neurons (both choose what the
        prefill computes)."""
        info = program.info
        bad = [x for x in self.at_layers if x >= info.num_layers]
        if bad:
            raise PassError(
                f"token-drop layers {bad} are out of range: the model has layers 0..{info.num_layers - 1}"
            )
        if program.drops:
            raise PassError(f"the program already drops tokens before layers {sorted(program.drops)}")
        if program.plan.policy.core_neurons:
            raise PassError(
                "token-drop and neuron-mask mode='core' both own the prefill (an earlier neuron-mask chose "
                "core neurons); use one of them"
            )

    def apply(self, program: Program) -> PassResult:
        self.requires(program)
        info = program.info
        report = self.new_report()
        # looked up by a stage's layer (None for the embed and head stages)
        ratios: dict[int | None, float] = dict(zip(self.at_layers, self.keeps(), strict=True))
        if all(r >= 1 for r in ratios.values()):
            report.skip("all", "keep=1.0 everywhere: no token is dropped, the program is unchanged")
            return PassResult(program, False, report)
        gather = _gather_graph(info)
        stages: list[Stage] = []
        for stage in program.stages:
            if stage.kind == "layer" and ratios.get(stage.layer, 1.0) < 1:
                j = stage.layer
                scorer = (
                    _attention_score_graph(stage.graph, self.queries)
                    if self.score == "attention"
                    else norm_score_graph(info)
                )
                _tag(scorer, self.name)
                stages.append(
                    Stage(
                        f"score.{j}",
                        "token_score",
                        scorer,
                        layer=j,
                        attrs={"keep": ratios[j], "score": self.score},
                    )
                )
                stages.append(Stage(f"drop.{j}", "token_drop", gather, layer=j, attrs={"keep": ratios[j]}))
                report.change(
                    f"layer.{j}", f"from here on {ratios[j]:.0%} of the prompt ({self.score} score)"
                )
            elif stage.kind == "layer" and stage.layer in ratios:
                report.skip(f"layer.{stage.layer}", "keep=1.0: nothing to drop")
            stages.append(stage)
        special = sorted({*program.plan.eos_token_ids, *self.special})
        policy = program.plan.policy.updated(
            token_drop=TokenDropPolicy(protect_last=self.protect_last, special=tuple(special)),
        )
        report.notes.append(
            f"always kept: the last {self.protect_last} prompt tokens and token ids {special}; decoding is unchanged"
        )
        return PassResult(program.with_stages(stages, policy=policy), bool(report.changed), report)

    def ensures(self, program: Program) -> None:
        expected = [j for j, r in zip(self.at_layers, self.keeps(), strict=True) if r < 1]
        if sorted(program.drops) != expected:
            raise PassError(f"drops before layers {sorted(program.drops)}, expected {expected}")


def _tag(gm: torch.fx.GraphModule, pass_name: str) -> None:
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "output"):
            n.meta.setdefault("effx_role", "token_drop")
            n.meta["effx_pass"] = pass_name


def _gather_graph(info: ModelInfo) -> torch.fx.GraphModule:
    def gather(
        hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def take(x: torch.Tensor) -> torch.Tensor:
            return x.gather(1, ids[:, :, None].expand(-1, -1, x.shape[-1]))

        return take(hidden), take(cos), take(sin)

    dt = torch_dtype(info)
    hidden = torch.randn(2, 7, info.hidden_size, dtype=dt)
    cos = torch.randn(2, 7, info.rope_width, dtype=dt)
    ids = torch.tensor([[0, 2, 5], [1, 3, 6]])
    gm = export_function(
        gather,
        (hidden, cos, cos.clone() + 1, ids),
        ({0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}, {0: "batch", 1: "kept"}),
    )
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "output"):
            n.meta.update(effx_role="token_drop", effx_pass="token-drop")
    return gm


def norm_score_graph(info: ModelInfo, *, encoder: bool = False) -> torch.fx.GraphModule:
    b, s = 2, 5
    if encoder:  # (hidden, mask) -> scores
        return export_function(
            lambda h, m: (h.float().norm(dim=-1),),
            (torch.randn(b, s, info.hidden_size), torch.zeros(b, 1, s, s)),
            ({0: "batch", 1: "seq"}, {0: "batch", 2: "seq", 3: "seq"}),
        )
    dt = torch_dtype(info)
    hidden = torch.randn(b, s, info.hidden_size, dtype=dt)
    rope = torch.randn(b, s, info.rope_width, dtype=dt)
    mask = torch.zeros(b, 1, s, s, dtype=dt)
    past = torch.zeros(b, info.num_kv_heads, 0, info.head_dim, dtype=dt)
    axes = {0: "batch", 1: "seq"}
    return export_function(
        lambda h, c, n, m, pk, pv: (h.float().norm(dim=-1),),
        (hidden, rope, rope.clone() + 1, mask, past, past.clone()),
        (axes, axes, axes, {0: "batch", 2: "seq", 3: "keys"}, {0: "batch"}, {0: "batch"}),
    )


def _attention_score_graph(layer_graph: torch.fx.GraphModule, queries: int) -> torch.fx.GraphModule:
    """Layer ``j``'s graph cut to its rotated queries and keys, followed by the attention that the last
    ``queries`` tokens pay to every key (softmax with the layer's mask, mean over heads and queries)."""
    gm, (q, k, mask), scale = _cut_to_attention_inputs(layer_graph)
    pattern = _attention_pattern(queries, scale, q.meta.get("val"), k.meta.get("val"), mask.meta.get("val"))
    return _finish_score_graph(gm, pattern, (q, k, mask))


def _cut_to_attention_inputs(
    layer_graph: torch.fx.GraphModule,
) -> tuple[torch.fx.GraphModule, tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node], float]:
    """A copy of a layer graph, its attention's query, key and mask nodes, and the attention's scale."""
    gm = torch.fx.GraphModule(layer_graph, copy.deepcopy(layer_graph.graph))
    sdpa = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default)
    # the attention's query, key and mask are nodes of the graph
    q, k = cast(torch.fx.Node, sdpa.args[0]), cast(torch.fx.Node, sdpa.args[1])
    mask = cast("torch.fx.Node | None", sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask"))
    if mask is None:
        raise PassError("the layer's attention has no explicit mask to score tokens with")
    scale = sdpa.kwargs.get("scale")
    if scale is None:
        q_val = q.meta.get("val")
        if q_val is None:
            raise PassError("cannot tell the attention's head size to scale the scores")
        scale = 1.0 / math.sqrt(int(q_val.shape[-1]))
    return gm, (q, k, mask), float(scale)


def _finish_score_graph(
    gm: torch.fx.GraphModule, pattern: torch.fx.GraphModule, inputs: Sequence[torch.fx.Node]
) -> torch.fx.GraphModule:
    """``gm`` with ``pattern`` applied to ``inputs`` as its only output; everything else removed."""
    g = gm.graph
    placeholders = [n for n in pattern.graph.nodes if n.op == "placeholder"]
    output = next(n for n in g.nodes if n.op == "output")
    with g.inserting_before(output):
        out = g.graph_copy(pattern.graph, dict(zip(placeholders, inputs, strict=True)))
    output.args = ((out[0] if isinstance(out, (tuple, list)) else out,),)
    g.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    result = torch.fx.GraphModule(gm, g)
    result.recompile()
    return result


def _attention_pattern(
    queries: int, scale: float, q_val: Any, k_val: Any, mask_val: Any
) -> torch.fx.GraphModule:
    """The score of :func:`_attention_score_graph`, exported for inputs like ``q_val``, ``k_val`` and
    ``mask_val`` (the fake tensors capture recorded in ``node.meta["val"]``; None where it recorded none)."""

    # q [b, h, s, d], k [b, kv, s, d], mask [b, 1, s, s]
    def score(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        # the last ``queries`` rows, by an index (not a slice, so that the graph holds for any length); rows
        # that index clamps (fewer tokens than ``queries``) and rows of padding (nothing visible) weigh 0
        wanted = torch.arange(queries) + (q.shape[2] - queries)
        rows = wanted.clamp(min=0)
        row_mask = mask.index_select(2, rows).float()
        counted = (wanted >= 0)[None, None, :] & (row_mask.amax(-1) > -1.0)  # [b, 1, Q]: an allowed key
        att = q.index_select(2, rows).float() @ k.float().transpose(-1, -2) * scale + row_mask
        probs = att.softmax(-1) * counted[..., None]
        return (probs.sum(dim=(1, 2)) / (counted.sum(dim=(1, 2))[:, None] * q.shape[1]).clamp(min=1),)

    b, s = 2, queries + 3
    h, kv, d = int(q_val.shape[1]), int(k_val.shape[1]), int(q_val.shape[-1])
    dt = q_val.dtype
    q = torch.randn(b, h, s, d, dtype=dt)
    k = torch.randn(b, kv, s, d, dtype=dt)
    mask = torch.zeros(b, 1, s, s, dtype=mask_val.dtype if mask_val is not None else dt)
    return export_function(
        score,
        (q, k, mask),
        ({0: "batch", 2: "seq"}, {0: "batch", 2: "seq"}, {0: "batch", 2: "seq", 3: "seq"}),
    )


def hidden_gather_graph(hidden_size: int) -> torch.fx.GraphModule:
    """``(hidden, keep_ids) -> hidden`` gathered along the token axis (encoders: no rotary tables)."""
    gm = export_function(
        lambda h, ids: (h.gather(1, ids[:, :, None].expand(-1, -1, h.shape[-1])),),
        (torch.randn(2, 7, hidden_size), torch.tensor([[0, 2, 5], [1, 3, 6]])),
        ({0: "batch", 1: "seq"}, {0: "batch", 1: "kept"}),
    )
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "output"):
            n.meta.update(effx_role="token_drop", effx_pass="token-drop")
    return gm


def encoder_score_graph(layer_graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """An encoder layer's graph cut to its queries and keys, then the attention each token receives from
    all real tokens (mean over heads and queries): PoWER-BERT's significance score."""
    gm, (q, k, mask), scale = _cut_to_attention_inputs(layer_graph)

    def score(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor]:
        att = q.float() @ k.float().transpose(-1, -2) * scale + mask.float()
        # [b, 1, s]: real queries. The mask hides invalid keys in every row, so token i is real exactly where
        # it may attend to itself (the diagonal); a row's max would count padding queries too. The mask may
        # carry a per-head position bias (T5), small beside the masked entries' dtype minimum
        counted = (mask.diagonal(dim1=-2, dim2=-1) > torch.finfo(mask.dtype).min / 2)[:, :1]
        probs = att.softmax(-1) * counted[..., None]
        return (probs.sum(dim=(1, 2)) / (counted.sum(dim=(1, 2))[:, None] * q.shape[1]).clamp(min=1),)

    q_val = q.meta["val"]
    h, d = int(q_val.shape[1]), int(q_val.shape[-1])
    mask_heads = int(mask.meta["val"].shape[1]) if "val" in mask.meta else 1
    pattern = export_function(
        score,
        (torch.randn(2, h, 5, d), torch.randn(2, h, 5, d), torch.zeros(2, mask_heads, 5, 5)),
        ({0: "batch", 2: "seq"}, {0: "batch", 2: "seq"}, {0: "batch", 2: "seq", 3: "seq"}),
    )
    result = _finish_score_graph(gm, pattern, (q, k, mask))
    _tag(result, "token-drop")
    return result
