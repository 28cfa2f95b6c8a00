"""DraftBranch: a small trained branch (EAGLE-style) that drafts tokens from the model's own features,
verified by the Program itself (lossless).

EAGLE (Li et al. 2024) drafts at the feature level: a one-layer branch reads the target's last-layer
feature at position t and the embedding of token t+1, and predicts the feature at t+1; the draft token is
the model's own head applied to that prediction. It then drafts on from its own predicted features, with a
KV cache of its own, and the Program verifies the drafts in one multi-token step
(:mod:`effx.runtime.speculative`), so the output is the dense greedy output whatever the branch proposes.
The branch's cache entries for verified tokens are recomputed from the true features before the next
round (:mod:`effx.runtime.draft_branch`).

The pass adds three stages before the head and records the run-time policy::

    draft-branch{weights=branch.safetensors draft=4 threshold=0 adaptive=true bits=8}

* ``branch_fuse`` ``(hidden, prev_hidden) -> (hidden,)``: ``hidden`` is the embedding of the new tokens (the
  embed stage's output), ``prev_hidden`` the feature of the token before each; both RMS-normed,
  concatenated and fused by a linear map into the layer's input.
* ``branch`` ``(hidden, cos, sin, mask, past_k, past_v) -> (hidden, k, v)``: one pre-norm decoder layer
  (grouped-query attention of the model's shape with its rotary tables, a SwiGLU MLP ``ffn`` wide), in
  the form of a captured model layer, so that the torch backend runs it as one kernel call as it runs
  the model's layers. Its output is the predicted feature.
* ``branch_head``: the model's final norm and LM head over the branch file's draft vocabulary (FR-Spec:
  the most frequent ids of the model's own text), ``-inf`` elsewhere; the full head where the file has no
  vocabulary.

``weights`` is a file written by :func:`effx.train_draft_branch` (``effx train-draft``), checked against the
model before anything runs. ``draft``: the most tokens drafted per round; ``threshold``: a row stops
drafting once a draft's probability under the branch falls below it (that draft still counts);
``adaptive``: each row drafts only as far as a round is expected to pay, from its running acceptance and
the branch's cost (``effx.runtime.pacing``), and stops drafting where no length pays. ``bits``: how the
branch and its head store their weights: 8 (default; int8 round-to-nearest in groups of 32, a quarter of
float32's bytes), 16 (bfloat16) or 32 (float32, as trained). A draft step at batch 1 reads its weights like
a decode step does, so its cost follows their bytes; a lossy draft changes only what is proposed, never
the output (the Program verifies every draft with its own weights). A later ``quantize`` leaves an int8
or bfloat16 branch as it is, and quantizes a float32 one (``bits=32``) with the rest.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import ArtifactError, PassConfigError, PassError, PassPreconditionError, PlanError
from ..formats import load_draft_branch
from ..fx import Dim, export_module, simplify
from ..plan import Policy
from ..program import Stage, torch_dtype
from ..techniques.draft_branch import DraftBranchPolicy
from .base import Pass, PassResult, check_read, check_size, register_pass
from .quantize import quantize_stage
from .vocab_reduce import static_subset_graph

if TYPE_CHECKING:
    from ..plan import ModelInfo
    from ..program import Program

__all__ = ["BITS", "BranchLayer", "DraftBranch", "branch_stages", "load_branch"]

# how the branch stores its weights: bits -> what the report says
BITS = {8: "int8 weights", 16: "bfloat16 weights", 32: "float32 weights"}


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [b, heads, s, d]`` (rotate-half form) with ``cos, sin [b, 1, s, d]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class BranchLayer(torch.nn.Module):
    """The draft branch: input fusion and one decoder layer (see the module's docstring). The pieces are
    methods so that training can run them with keys from several drafting steps (``effx.draft_branch``)."""

    def __init__(self, info: ModelInfo, ffn: int, eps: float = 1e-6) -> None:
        super().__init__()
        d, hd = info.hidden_size, info.head_dim
        self.heads, self.kv_heads, self.head_dim, self.eps = info.num_heads, info.num_kv_heads, hd, eps
        # a model with several rotary tables side by side (Gemma 3) gives the branch its first one
        self.rope_slice = info.rope_width != hd
        linear = torch.nn.Linear
        self.norm_emb = torch.nn.Parameter(torch.ones(d))
        self.norm_feat = torch.nn.Parameter(torch.ones(d))
        self.fc = linear(2 * d, d, bias=False)
        self.norm_attn = torch.nn.Parameter(torch.ones(d))
        self.q = linear(d, self.heads * hd, bias=False)
        self.k = linear(d, self.kv_heads * hd, bias=False)
        self.v = linear(d, self.kv_heads * hd, bias=False)
        self.o = linear(self.heads * hd, d, bias=False)
        self.norm_mlp = torch.nn.Parameter(torch.ones(d))
        self.gate = linear(d, ffn, bias=False)
        self.up = linear(d, ffn, bias=False)
        self.down = linear(ffn, d, bias=False)

    def fuse(self, emb: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """The layer's input: the normed token embedding and feature, concatenated and fused."""
        fused: torch.Tensor = self.fc(
            torch.cat([_rms(emb, self.norm_emb, self.eps), _rms(feat, self.norm_feat, self.eps)], -1)
        )
        return fused

    def qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``[b, heads, s, d]``, keys and values ``[b, kv_heads, s, d]`` (rotated) of ``x``."""
        b, s, _ = x.shape
        h = _rms(x, self.norm_attn, self.eps)
        q = self.q(h).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, s, -1, self.head_dim).transpose(1, 2)
        if self.rope_slice:
            cos, sin = cos[..., : self.head_dim], sin[..., : self.head_dim]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def finish(
        self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The layer's output: ``x`` plus attention of ``q`` over ``keys``/``values`` (additive ``mask``
        ``[b, 1, s, keys]``), plus the MLP."""
        b, _, s, _ = q.shape
        # grouped-query attention as the captured model's layers run it (effx's attention for transformers):
        # query head h reads kv head h // (heads / kv_heads)
        attn = torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=1 / math.sqrt(self.head_dim), enable_gqa=True
        )
        x = x + self.o(attn.transpose(1, 2).reshape(b, s, -1))
        h = _rms(x, self.norm_mlp, self.eps)
        mlp: torch.Tensor = self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))
        return x + mlp

    def forward(
        self,
        emb: torch.Tensor,
        feat: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.decode(self.fuse(emb, feat), cos, sin, mask, past_k, past_v)

    def decode(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoder layer on its input ``hidden`` (see :meth:`fuse`) over a cache of ``past_k``/``past_v``:
        its output and the new keys and values."""
        q, k, v = self.qkv(hidden, cos, sin)
        out = self.finish(hidden, q, torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2), mask)
        return out, k, v


class _Fuse(torch.nn.Module):
    """The ``branch_fuse`` stage: the branch layer's input from the new tokens' embeddings and the features
    before them."""

    def __init__(self, layer: BranchLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor, prev_hidden: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.layer.fuse(hidden, prev_hidden),)


class _Decoder(torch.nn.Module):
    """The ``branch`` stage: the branch's decoder layer with a layer stage's inputs and outputs, in the form
    of the captured model's layers, so the torch backend runs it as one kernel call as it does theirs
    (``effx.kernels.layer``)."""

    def __init__(self, layer: BranchLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
    ) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor
    ]:  # a layer stage's input names (fuse_layer reads them)
        return self.layer.decode(hidden, cos, sin, mask, past_k, past_v)


# the roles of the branch layer's products, as capture tags a model layer's (the lowering reads them)
_ROLES = {"layer.q.weight": "attn.q", "layer.k.weight": "attn.k", "layer.v.weight": "attn.v"}


def _tag_roles(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            weight = node.args[1]
            role = _ROLES.get(getattr(weight, "target", ""))
            if role is not None:
                node.meta["effx_role"] = role


def branch_stages(program: Program, layer: BranchLayer, vocab_ids: torch.Tensor | None) -> list[Stage]:
    """The ``branch_fuse``, ``branch`` and ``branch_head`` stages of ``layer`` for ``program``."""
    info, dtype = program.info, torch_dtype(program.info)
    layer = layer.to(dtype).eval()
    for weight in layer.parameters():
        weight.requires_grad_(False)
    b, s, p = Dim("batch", min=1, max=1024), Dim("seq", min=1, max=info.max_positions), Dim("past", min=0)
    B, S, P, d = 2, 3, 2, info.hidden_size
    hidden = torch.randn(B, S, d, dtype=dtype)
    fuse = export_module(
        _Fuse(layer), (hidden, torch.randn(B, S, d, dtype=dtype)), ({0: b, 1: s}, {0: b, 1: s})
    )
    args = (
        hidden,
        torch.randn(B, S, info.rope_width, dtype=dtype),
        torch.randn(B, S, info.rope_width, dtype=dtype),
        torch.zeros(B, 1, S, P + S, dtype=dtype),
        torch.zeros(B, info.num_kv_heads, P, info.head_dim, dtype=dtype),
        torch.zeros(B, info.num_kv_heads, P, info.head_dim, dtype=dtype),
    )
    dynamic = (
        {0: b, 1: s},
        {0: b, 1: s},
        {0: b, 1: s},
        {0: b, 2: s, 3: Dim.AUTO},
        {0: b, 2: p},
        {0: b, 2: p},
    )
    gm = export_module(_Decoder(layer), args, dynamic)
    for graph in (fuse, gm):
        simplify(graph)
    _tag_roles(gm)
    if vocab_ids is None:
        head = program.head.graph
        k = info.vocab_size
    else:
        head = static_subset_graph(program.head.graph, vocab_ids, info, "draft-branch")
        k = int(vocab_ids.numel())
    return [
        Stage("branch.fuse", "branch_fuse", fuse),
        Stage("branch", "branch", gm, attrs={"ffn": layer.gate.out_features}),
        Stage("branch.head", "branch_head", head, attrs={"vocab_k": k}),
    ]


def load_branch(path: str, info: ModelInfo) -> tuple[BranchLayer, torch.Tensor | None]:
    """The branch in ``path`` as a :class:`BranchLayer`, and its draft vocabulary (None: the full one)."""
    meta, tensors = load_draft_branch(path, info)
    vocab = meta.get("vocab")
    ids = None
    if vocab is not None:
        if (
            not isinstance(vocab, list)
            or not vocab
            or not all(isinstance(t, int) and 0 <= t < info.vocab_size for t in vocab)
            or len(set(vocab)) != len(vocab)
        ):
            raise ArtifactError(
                f"{path}: its draft vocabulary is not a list of distinct token ids below {info.vocab_size}"
            )
        ids = torch.tensor(sorted(vocab), dtype=torch.long)
    layer = BranchLayer(info, int(meta["ffn"]), float(meta["eps"]))
    layer.load_state_dict(tensors)
    return layer, ids


@register_pass
@dataclasses.dataclass(frozen=True)
class DraftBranch(Pass):
    """A trained draft branch (EAGLE-style) drafts tokens that the Program verifies (lossless)."""

    name = "draft-branch"
    after = ("early-exit",)
    order_reason = "draft-branch checks the early-exit mode, which must be set first"

    weights: str = ""
    draft: int = 4
    threshold: float = 0.0
    adaptive: bool = True
    bits: int = 8

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise PassConfigError(
                f"draft-branch: bits must be 8 (int8), 16 (bfloat16) or 32 (float32), got {self.bits!r}"
            )
        if not self.weights:
            raise PassConfigError(
                "draft-branch needs weights=<file> (train one with `effx train-draft` or "
                "effx.train_draft_branch)"
            )
        try:
            self.policy()
        except PlanError as e:
            raise PassConfigError(str(e).replace(" policy", "", 1)) from None

    def policy(self) -> DraftBranchPolicy:
        """The run-time policy this pass sets."""
        return DraftBranchPolicy(draft=self.draft, threshold=self.threshold, adaptive=self.adaptive)

    def check_model(self, info: ModelInfo) -> None:
        check_size("draft-branch draft", self.draft, info.max_positions - 1, "max_positions - 1")
        check_read("weights", self.weights, lambda path: load_branch(path, info))

    def check_after(self, earlier: Sequence[Pass]) -> None:
        if any(p.name == self.name for p in earlier):
            raise PassPreconditionError("the program already drafts with a draft branch")
        if any(p.name == "early-exit" and getattr(p, "mode", "") == "lossy" for p in earlier):
            raise PassPreconditionError(
                "lossy early exits emit tokens the full model never checks, so branch drafts cannot be "
                "verified: use EarlyExit(mode='self-speculative') or no early exit"
            )

    def requires(self, program: Program) -> None:
        plan = program.plan
        if plan.policy.get("draft_branch") is not None:
            raise PassError("the program already drafts with a draft branch")
        if plan.decode_mode == "lossy":
            raise PassError(
                "lossy early exits emit tokens the full model never checks, so branch drafts cannot be "
                "verified: use EarlyExit(mode='self-speculative') or no early exit"
            )

    def apply(self, program: Program) -> PassResult:
        self.requires(program)
        try:
            layer, ids = load_branch(self.weights, program.info)
        except ArtifactError as e:
            raise PassError(str(e)) from None
        new = branch_stages(program, layer, ids)
        if self.bits < 32:
            new = [quantize_stage(s, self.bits) for s in new]
        new = [s.with_attrs(bits=self.bits) for s in new]
        stages = list(program.stages)
        at = next(i for i, s in enumerate(stages) if s.kind in ("full_head", "head"))
        stages[at:at] = new
        policy: Policy = program.plan.policy.updated(draft_branch=self.policy())
        report = self.new_report()
        params = sum(t.numel() for t in layer.state_dict().values())
        vocab = "the full vocabulary" if ids is None else f"{ids.numel()} of {program.info.vocab_size} ids"
        report.change(
            "branch",
            f"a one-layer branch ({params / 1e6:.2f}M parameters, ffn {layer.gate.out_features}, "
            f"{BITS[self.bits]}) predicts the next feature; its head drafts from {vocab}",
        )
        report.change(
            "decode",
            f"draft up to {self.draft} tokens a round, verified in one step (greedy output unchanged)",
        )
        report.notes.append("FLOPs/token are those of the Program; what a round saves depends on acceptance")
        return PassResult(program.with_stages(stages, policy=policy), True, report)

    def ensures(self, program: Program) -> None:
        if program.plan.policy.get("draft_branch") is None:
            raise PassError("the program has no draft-branch policy")
        kinds = [s.kind for s in program.stages]
        if any(kind not in kinds for kind in ("branch_fuse", "branch", "branch_head")):
            raise PassError("the program has no branch stages")
