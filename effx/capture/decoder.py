"""Capture a Hugging Face decoder-only model (Llama family) as a staged :class:`~effx.program.Program`.

Three kinds of stage, exported through ``effx.fx`` (non-strict):

* ``embed``   ``(input_ids, position_ids) -> (hidden, cos, sin)``: token embedding and rotary tables;
* ``layer.i`` ``(hidden, cos, sin, mask, past_k, past_v) -> (hidden, k, v)``: one decoder layer, with its
  KV cache explicit: ``past_*`` are the cached keys/values ``[batch, kv_heads, past, head_dim]`` and
  ``k``/``v`` those of the new tokens only (the runtime owns the cache and writes them in);
* ``head``    ``(hidden) -> logits``: final norm and LM head.

Batch, sequence and past length are dynamic in every graph (past may be 0), so one graph serves prefill,
decode and multi-token extension. The decoder layers of a model usually share one structure: capture
exports the first and re-binds its graph to the weights of the others (checked per layer; a layer whose
structure differs is exported on its own). Parameters are shared with the user's model, never copied or
modified.

Every ATen node is tagged in ``node.meta``: ``effx_role`` (``embed``, ``rope``, ``norm``, ``attn.q``,
``attn.k``, ``attn.v``, ``attn.core``, ``attn.sdpa``, ``attn.o``, ``mlp.gate``, ``mlp.up``, ``mlp.act``,
``mlp.mul``, ``mlp.down``, ``residual``, ``lm_head``, ``shape``, ``io``), ``effx_layer`` (the decoder
layer index, or None) and ``effx_module`` (the sub-module path from ``nn_module_stack``).
"""

from __future__ import annotations

import copy
import inspect

import torch

from ..errors import UnsupportedModelError
from ..fx import Dim, export_module, rebind, simplify
from ..program import ModelInfo, Program, Stage
from ..runtime.forward import forward_logits
from .common import (
    ENCODER_MODEL_TYPES,
    RECURRENT_MODEL_TYPES,
    SEQ2SEQ_MODEL_TYPES,
    SUPPORTED_MODEL_TYPES,
    StageCache,
    check_logits,
    export_step,
    fail,
    private_copy,
    register_attention,
    structure,
)

__all__ = ["capture", "info_from_config", "tag_roles"]

_MODULE_ROLES = {
    "embed_tokens": "embed",
    "rotary_emb": "rope",
    "input_layernorm": "norm",
    "post_attention_layernorm": "norm",
    "pre_feedforward_layernorm": "norm",  # Gemma 3: norms around the MLP too
    "post_feedforward_layernorm": "norm",
    "norm": "norm",
    "q_norm": "norm",
    "k_norm": "norm",
    "q_proj": "attn.q",
    "k_proj": "attn.k",
    "v_proj": "attn.v",
    "o_proj": "attn.o",
    "gate_proj": "mlp.gate",
    "up_proj": "mlp.up",
    "down_proj": "mlp.down",
    "act_fn": "mlp.act",
    "lm_head": "lm_head",
}


def _rope_types(config) -> list[str]:
    """The rotary tables a model computes, one per kind of layer that has its own (Gemma 3: local layers at
    base 10k, global ones at 1M), in a fixed order; ``[]`` for one table shared by every layer."""
    params = getattr(config, "rope_parameters", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types or not isinstance(params, dict) or not set(layer_types) <= set(params):
        return []
    return sorted(set(layer_types))


class _Embed(torch.nn.Module):
    """Token embedding and rotary tables. With several tables (:func:`_rope_types`) ``cos``/``sin`` are the
    tables concatenated along their last axis, ``[batch, seq, tables * head_dim]``, and each layer slices its
    own: the stage signature stays that of one table."""

    def __init__(self, embed_tokens, rotary_emb, rope_types=()):
        super().__init__()
        self.embed_tokens, self.rotary_emb = embed_tokens, rotary_emb
        self.rope_types = tuple(rope_types)

    def forward(self, input_ids, position_ids):
        hidden = self.embed_tokens(input_ids)
        if not self.rope_types:
            cos, sin = self.rotary_emb(hidden, position_ids)
            return hidden, cos, sin
        tables = [self.rotary_emb(hidden, position_ids, t) for t in self.rope_types]
        return hidden, torch.cat([c for c, _ in tables], -1), torch.cat([s for _, s in tables], -1)


class _Layer(torch.nn.Module):
    """One decoder layer with its cache explicit; ``rope`` = ``(index, width)`` of its rotary table in the
    concatenated ``cos``/``sin`` (None: the whole of them)."""

    def __init__(self, layer, rope: tuple[int, int] | None = None):
        super().__init__()
        self.layer = layer
        self.rope = rope
        params = inspect.signature(layer.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, hidden, cos, sin, mask, past_k, past_v):
        if self.rope is not None:
            j, width = self.rope
            cos, sin = cos[..., j * width : (j + 1) * width], sin[..., j * width : (j + 1) * width]
        cache = StageCache(past_k, past_v)
        kwargs = {self.cache_arg: cache}
        out = self.layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), **kwargs)
        if isinstance(out, tuple):
            out = out[0]
        k, v = cache.new
        return out, k, v


class _Head(torch.nn.Module):
    """Final norm and LM head, and the logit soft-capping of models that have it (``cap * tanh(z / cap)``,
    Gemma 2 style)."""

    def __init__(self, norm, lm_head, softcap: float | None = None):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head
        self.softcap = softcap

    def forward(self, hidden):
        logits = self.lm_head(self.norm(hidden))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _check_architecture(model) -> None:
    config = getattr(model, "config", None)
    if config is None or not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(
            f"cannot capture {type(model).__name__}: step 'check architecture' failed: "
            "not a transformers PreTrainedModel (no .config)"
        )
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        other = {
            **dict.fromkeys(SEQ2SEQ_MODEL_TYPES, "an encoder-decoder model: use effx.transform_seq2seq"),
            **dict.fromkeys(
                RECURRENT_MODEL_TYPES, "a recurrent (state-space) model: use effx.transform_mamba"
            ),
            **dict.fromkeys(ENCODER_MODEL_TYPES, "an encoder: use effx.transform_encoder"),
        }.get(model_type)
        raise fail(
            model,
            "check architecture",
            f"model_type {model_type!r} is not supported"
            + (f" here ({other})" if other else f"; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"),
        )
    base = getattr(model, "model", None)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if base is None or not hasattr(base, attr):
            raise fail(
                model, "check architecture", f"expected model.model.{attr} (a decoder-only LM with a head)"
            )
    if not hasattr(model, "lm_head"):
        raise fail(
            model, "check architecture", "expected model.lm_head: capture needs a causal LM, not a base model"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise fail(
            model,
            "check architecture",
            "attention logit soft-capping (attn_logit_softcapping) is not supported: the runtime's attention "
            "is plain scaled dot-product attention",
        )


def _layer_windows(config) -> list[int | None]:
    """The sliding-attention window of each layer (None for full attention), as transformers applies it."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types[:n]]
    if config.model_type == "mistral":
        return [window] * n
    return [None] * n


def _role(node: torch.fx.Node, path: str, stage_kind: str) -> str:
    if node.op in ("placeholder", "output"):
        return "io"
    if node.op == "get_attr":
        return "weight"
    if node.target == torch.ops.aten.scaled_dot_product_attention.default:
        return "attn.sdpa"
    if node.target == torch.ops.aten.sym_size.int:
        return "shape"
    parts = [p for p in path.split(".") if p and not p.isdigit()]
    for part in reversed(parts):
        if part in _MODULE_ROLES:
            return _MODULE_ROLES[part]
    if "self_attn" in parts:
        return "attn.core"
    if "mlp" in parts:
        return "mlp.mul"
    return "residual" if stage_kind == "layer" else "other"


def tag_roles(gm: torch.fx.GraphModule, stage_kind: str, layer: int | None) -> None:
    """Write ``effx_role``, ``effx_layer`` and ``effx_module`` on every node of a captured stage graph."""
    wrapper_attr = {"embed": "", "layer": "layer", "head": ""}[stage_kind]
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        path = ""
        if stack:
            path = list(stack.values())[-1][0]
            if path.startswith("L['self']."):
                path = path[len("L['self'].") :]
            if wrapper_attr and path.startswith(wrapper_attr + "."):
                path = path[len(wrapper_attr) + 1 :]
            elif path == wrapper_attr:
                path = ""
        node.meta["effx_module"] = path
        node.meta["effx_role"] = _role(node, path, stage_kind)
        node.meta["effx_layer"] = layer


def _model_info(model) -> ModelInfo:
    return info_from_config(
        model.config, architecture=type(model).__name__, dtype=str(model.dtype).replace("torch.", "")
    )


def info_from_config(c, *, architecture: str = "", dtype: str = "float32") -> ModelInfo:
    """The model's shapes from its transformers config alone (no weights loaded): what passes check their
    settings against before capture (:meth:`effx.passes.Pass.check_model`)."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ModelInfo(
        architecture=architecture or (getattr(c, "architectures", None) or [""])[0],
        model_type=c.model_type,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        intermediate_size=getattr(c, "intermediate_size", 0),
        num_heads=c.num_attention_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=head_dim,
        vocab_size=c.vocab_size,
        max_positions=getattr(c, "max_position_embeddings", 8192),
        dtype=dtype,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        source=str(getattr(c, "_name_or_path", "") or ""),
        rope_tables=max(1, len(_rope_types(c))),
    )


def capture(
    model,
    *,
    reuse_layer_graphs: bool = True,
    verify: bool = True,
    progress: bool = False,
) -> Program:
    """Capture ``model`` (a transformers causal LM of the Llama family) as a dense :class:`Program`.

    ``reuse_layer_graphs`` exports one decoder layer and re-binds its graph to the others' weights when their
    structure matches (set False to export each layer). ``verify`` checks the captured stages against the
    model's own forward on a short input and raises :class:`UnsupportedModelError` if they disagree.
    """
    _check_architecture(model)
    register_attention()
    info = _model_info(model)
    base = model.model
    dtype = model.dtype

    b, s, p = (
        Dim("batch", min=1, max=1024),
        Dim("seq", min=1, max=info.max_positions),
        Dim("past", min=0, max=info.max_positions),
    )
    B, S, P = 2, 3, 2
    ids = torch.zeros(B, S, dtype=torch.long)
    hidden = torch.zeros(B, S, info.hidden_size, dtype=dtype)
    with export_step(model, "export embed"):
        # distinct example tensors: export treats one tensor passed twice as one input
        pos = torch.arange(S).expand(B, S).clone()
        embed = _Embed(base.embed_tokens, base.rotary_emb, _rope_types(model.config))
        embed_gm = export_module(embed, (ids, pos), ({0: b, 1: s}, {0: b, 1: s}))
        with torch.no_grad():
            _, cos, sin = embed_gm(ids, pos)
        mask = torch.zeros(B, 1, S, P + S, dtype=dtype)
        past_k = torch.zeros(B, info.num_kv_heads, P, info.head_dim, dtype=dtype)
        layer_args = (hidden, cos, sin, mask, past_k, past_k.clone())
        layer_dyn = (
            {0: b, 1: s},
            {0: b, 1: s},
            {0: b, 1: s},
            {0: b, 2: s, 3: Dim.AUTO},
            {0: b, 2: p},
            {0: b, 2: p},
        )
    stages = [Stage("embed", "embed", embed_gm)]
    stages += _export_layers(model, info, layer_args, layer_dyn, reuse=reuse_layer_graphs, progress=progress)
    with export_step(model, "export head"):
        softcap = getattr(model.config, "final_logit_softcapping", None)
        head_gm = export_module(_Head(base.norm, model.lm_head, softcap), (hidden,), ({0: b, 1: s},))
    stages.append(Stage("head", "head", head_gm))

    for stage in stages:
        simplify(stage.graph)
        tag_roles(stage.graph, stage.kind, stage.layer)
    program = Program.from_stages(stages, info, generation_config=getattr(model, "generation_config", None))
    if verify:
        _verify(model, program)
    return program


def _export_layers(model, info: ModelInfo, args: tuple, dynamic: tuple, *, reuse: bool, progress: bool):
    """One ``layer.i`` stage per decoder layer, exported on ``args`` with ``dynamic`` shapes. With ``reuse``,
    a layer whose structure and rotary table match a layer exported before re-binds that one's graph to its
    own weights."""
    config = model.config
    windows = _layer_windows(config)
    rope_types = _rope_types(config)
    layer_types = getattr(config, "layer_types", None) or []
    exported: list[tuple[tuple, torch.fx.GraphModule]] = []
    layers = list(model.model.layers)
    indices = range(len(layers))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="capture layers", unit="layer")
    stages = []
    for i in indices:
        with export_step(model, f"export layer {i}"):
            rope = (rope_types.index(layer_types[i]), info.head_dim) if rope_types else None
            wrapper = _Layer(layers[i], rope)
            key = (structure(layers[i]), rope)  # the table a layer slices is part of its graph
            template = next((gm for k, gm in exported if k == key), None) if reuse else None
            if template is None:
                gm = export_module(_Layer(private_copy(layers[i]), rope), args, dynamic)
                exported.append((key, gm))
            else:
                gm = rebind(template, copy.deepcopy(template.graph), wrapper)
        stages.append(Stage(f"layer.{i}", "layer", gm, layer=i, attrs={"sliding_window": windows[i]}))
    return stages


def _verify(model, program: Program) -> None:
    """The captured stages must reproduce the model's own logits on a short input."""
    ids = torch.arange(1, 9, dtype=torch.long).remainder(program.info.vocab_size)[None]
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        got = forward_logits(program, ids)
    check_logits(model, ref, got, 1e-4 if ref.dtype == torch.float32 else 2e-2)
