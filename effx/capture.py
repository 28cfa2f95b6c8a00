"""Capture a Hugging Face decoder-only model as a staged :class:`~effx.program.Program`.

This is the one module that reaches into transformers internals; it exports through ``effx.fx`` (the one
module that calls ``torch.export``), non-strict, three kinds of stage:

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

Attention is exported through a registered transformers attention function (``"effx"``) that calls
``scaled_dot_product_attention`` with the explicit mask the runtime builds. It has no shape-dependent
branches, and on CPU it is bitwise equal to the ``sdpa`` path that ``model.generate`` takes.

Capture checks its stages against the model's own logits with the runtime, so it sits above the runtime
(and above encoders: ``transform_encoder`` is capture followed by encoder token drop).

Three other kinds of model are captured by their own functions, as their own kinds of program: BERT-style
encoders (``capture_encoder``, :class:`~effx.encoder.EncoderProgram`), BART and T5 encoder-decoders
(``capture_seq2seq``, :class:`~effx.seq2seq.Seq2SeqProgram`: encoder stages, decoder stages with explicit
self-attention cache and once-per-prompt cross-attention K/V) and Mamba (``capture_mamba``,
:class:`~effx.recurrent.RecurrentProgram`: the conv and SSM states as the cache). ``capture`` refuses them
with the function to use.
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F

from .errors import PassError, UnsupportedModelError
from .fx import Dim, export_module, rebind, simplify
from .program import ModelInfo, Program, Stage
from .runtime.loop import as_ids

__all__ = [
    "ENCODER_MODEL_TYPES",
    "RECURRENT_MODEL_TYPES",
    "SEQ2SEQ_MODEL_TYPES",
    "SUPPORTED_MODEL_TYPES",
    "capture",
    "capture_encoder",
    "capture_mamba",
    "capture_seq2seq",
    "transform_encoder",
    "transform_mamba",
    "transform_seq2seq",
]

# Model types whose glue between layers (embedding, rotary tables, mask, final norm) is the plain Llama one
# that the runtime reproduces. Capture also checks the result numerically against the model's own forward.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# captured by their own functions below, as their own kinds of program
ENCODER_MODEL_TYPES = ("bert",)
SEQ2SEQ_MODEL_TYPES = ("bart", "t5")
RECURRENT_MODEL_TYPES = ("mamba",)

_ATTN_NAME = "effx"

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


def _effx_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_bias=None, **kwargs):
    """SDPA with the runtime's explicit additive mask; ``query`` may have more heads than ``key`` (GQA). T5's
    ``position_bias`` (which its stages take as their mask) is added to the mask."""
    if position_bias is not None:
        attention_mask = position_bias if attention_mask is None else attention_mask + position_bias
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


class _StageCache:
    """The cache object a decoder layer sees during export: cached K/V in, new K/V recorded."""

    def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor):
        self.past_k, self.past_v = past_k, past_v
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        self.new = (key_states, value_states)
        return torch.cat([self.past_k, key_states], dim=2), torch.cat([self.past_v, value_states], dim=2)

    def get_seq_length(self, layer_idx=0) -> int:
        return self.past_k.shape[2]


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
        cache = _StageCache(past_k, past_v)
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


def _fail(model, step: str, detail: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"cannot capture {type(model).__name__} (model_type={getattr(model.config, 'model_type', '?')!r}): "
        f"step '{step}' failed: {detail}"
    )


def _require_type(model, types: tuple[str, ...], what: str):
    """``model.config``, or an ``UnsupportedModelError`` when its model_type is not one of ``types``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or model_type not in types:
        raise UnsupportedModelError(
            f"cannot capture {type(model).__name__} as {what}: model_type {model_type!r} is not one of "
            f"{', '.join(types)}"
        )
    return config


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


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
            **dict.fromkeys(RECURRENT_MODEL_TYPES, "a recurrent (state-space) model: use effx.transform_mamba"),
            **dict.fromkeys(ENCODER_MODEL_TYPES, "an encoder: use effx.transform_encoder"),
        }.get(model_type)
        raise _fail(
            model,
            "check architecture",
            f"model_type {model_type!r} is not supported"
            + (f" here ({other})" if other else f"; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"),
        )
    base = getattr(model, "model", None)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if base is None or not hasattr(base, attr):
            raise _fail(
                model, "check architecture", f"expected model.model.{attr} (a decoder-only LM with a head)"
            )
    if not hasattr(model, "lm_head"):
        raise _fail(
            model, "check architecture", "expected model.lm_head: capture needs a causal LM, not a base model"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise _fail(
            model,
            "check architecture",
            "attention logit soft-capping (attn_logit_softcapping) is not supported: the runtime's attention "
            "is plain scaled dot-product attention",
        )


def _register_attention() -> None:
    from transformers import AttentionInterface

    if _ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(_ATTN_NAME, _effx_attention)


def _private_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` that shares its parameters and buffers but has its own config objects, set to
    the effx attention function. The user's model is left exactly as it was."""
    memo = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    clone = copy.deepcopy(module, memo)
    for sub in clone.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = _ATTN_NAME
    return clone


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


def _structure(module: torch.nn.Module) -> tuple:
    """What must match for two layers to share one exported graph."""
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in module.named_buffers())
    classes = tuple((n, type(m).__qualname__) for n, m in module.named_modules())
    return params, buffers, classes


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
    _register_attention()
    info = _model_info(model)
    base = model.model
    dtype = model.dtype
    windows = _layer_windows(model.config)
    rope_types = _rope_types(model.config)
    layer_types = getattr(model.config, "layer_types", None) or []

    b, s, p = (
        Dim("batch", min=1, max=1024),
        Dim("seq", min=1, max=info.max_positions),
        Dim("past", min=0, max=info.max_positions),
    )
    B, S, P = 2, 3, 2
    ids = torch.zeros(B, S, dtype=torch.long)
    hidden = torch.zeros(B, S, info.hidden_size, dtype=dtype)
    step = "export embed"
    try:
        # distinct example tensors: export treats one tensor passed twice as one input
        pos = torch.arange(S).expand(B, S).clone()
        embed_gm = export_module(
            _Embed(base.embed_tokens, base.rotary_emb, rope_types), (ids, pos), ({0: b, 1: s}, {0: b, 1: s})
        )
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
        exported: list[tuple[tuple, torch.fx.GraphModule]] = []
        layers = list(base.layers)
        indices = range(len(layers))
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc="capture layers", unit="layer")
        for i in indices:
            step = f"export layer {i}"
            rope = (rope_types.index(layer_types[i]), info.head_dim) if rope_types else None
            wrapper = _Layer(layers[i], rope)
            key = (_structure(layers[i]), rope)  # the table a layer slices is part of its graph
            template = next((gm for k, gm in exported if k == key), None) if reuse_layer_graphs else None
            if template is None:
                gm = export_module(_Layer(_private_copy(layers[i]), rope), layer_args, layer_dyn)
                exported.append((key, gm))
            else:
                gm = rebind(template, copy.deepcopy(template.graph), wrapper)
            stages.append(Stage(f"layer.{i}", "layer", gm, layer=i, attrs={"sliding_window": windows[i]}))
        step = "export head"
        softcap = getattr(model.config, "final_logit_softcapping", None)
        head_gm = export_module(_Head(base.norm, model.lm_head, softcap), (hidden,), ({0: b, 1: s},))
        stages.append(Stage("head", "head", head_gm))
    except UnsupportedModelError:
        raise
    except Exception as e:  # torch.export raises many types; the user gets one with the step named
        raise _fail(model, step, _first_line(e)) from e

    for stage in stages:
        simplify(stage.graph)
        tag_roles(stage.graph, stage.kind, stage.layer)
    program = Program.from_stages(stages, info, generation_config=getattr(model, "generation_config", None))
    if verify:
        _verify(model, program)
    return program


def _verify(model, program: Program) -> None:
    """The captured stages must reproduce the model's own logits on a short input."""
    from .runtime.forward import forward_logits

    ids = torch.arange(1, 9, dtype=torch.long).remainder(program.info.vocab_size)[None]
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        got = forward_logits(program, ids)
    _check_logits(model, ref, got, 1e-4 if ref.dtype == torch.float32 else 2e-2)


def _check_logits(model, ref: torch.Tensor, got: torch.Tensor, rel: float) -> None:
    """The captured stages' logits ``got`` within ``rel`` of the logit scale of the model's own ``ref``."""
    err = (ref - got).abs().max().item()
    if not err <= rel * (ref.abs().max().item() + 1.0):
        raise _fail(model, "verify", f"captured stages differ from the model's forward by {err:.3g} (max |logit|)")


# -- encoders (BERT-style) ---------------------------------------------------------------------------------

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


class _EncoderLayer(torch.nn.Module):
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
    from .encoder import EncoderInfo, EncoderProgram

    config = _require_type(model, ENCODER_MODEL_TYPES, "an encoder")
    base = getattr(model, "bert", model)
    if not (hasattr(base, "embeddings") and hasattr(base, "encoder")):
        raise _fail(model, "check architecture", "expected .embeddings and .encoder.layer (a BERT encoder)")
    _register_attention()
    clone = _private_copy(base)
    b, s, d = 2, 7, config.hidden_size
    seq = Dim("seq", min=1, max=config.max_position_embeddings)  # position embeddings bound the length
    batch = Dim("batch", min=1)
    ids = torch.randint(0, config.vocab_size, (b, s))
    types = torch.zeros(b, s, dtype=torch.long)
    try:
        embed = export_module(
            _EncoderEmbed(clone.embeddings), (ids, types), ({0: batch, 1: seq}, {0: batch, 1: seq})
        )
        hidden = torch.randn(b, s, d)
        mask = torch.zeros(b, 1, s, s)
        template = export_module(
            _EncoderLayer(clone.encoder.layer[0]),
            (hidden, mask),
            ({0: batch, 1: seq}, {0: batch, 2: seq, 3: seq}),
        )
    except Exception as e:  # noqa: BLE001 - any export failure is a capture failure
        raise _fail(model, "export", _first_line(e)) from e
    _tag_encoder(embed, None)
    layers = []
    for i, layer in enumerate(clone.encoder.layer):
        wrapped = _EncoderLayer(layer)
        if _structure(layer) != _structure(clone.encoder.layer[0]):
            raise _fail(model, "export", f"layer {i} differs in structure from layer 0")
        gm = template if i == 0 else rebind(template, copy.deepcopy(template.graph), wrapped)
        _tag_encoder(gm, i)
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
            raise _fail(model, "verify", f"captured encoder differs from the model by {err:.2e}")
    return program


def _tag_encoder(gm: torch.fx.GraphModule, layer: int | None) -> None:
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


def _apply_allowed(model, passes, allowed, what: str, capture_fn, apply_fn, *, verify: bool):
    """Capture ``model`` with ``capture_fn`` and apply ``passes`` (objects or a pipeline string) with
    ``apply_fn``; a pass that is not an ``allowed`` one is refused before capture, naming the pass and the
    architecture (``what``: its kind, and the pass it takes)."""
    from .passes import parse_pipeline

    passes = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
    for p in passes:
        if not isinstance(p, allowed):
            raise PassError(f"pass {p.name!r} does not apply to {type(model).__name__} ({what})")
    program = capture_fn(model, verify=verify)
    for p in passes:
        program = apply_fn(p, program)
    return program


def transform_encoder(model, passes=(), *, verify: bool = True):
    """Capture a BERT-style encoder and apply ``passes`` (TokenDrop only: the other passes rewrite decoder
    LMs)."""
    from .encoder import apply_token_drop
    from .passes import TokenDrop

    what = "an encoder: the other passes rewrite decoder LMs; encoders take token-drop only"
    return _apply_allowed(model, passes, TokenDrop, what, capture_encoder, apply_token_drop, verify=verify)

# -- encoder-decoder (BART-style) --------------------------------------------------------------------------


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
            self.self_attention_cache = _StageCache(past_k, past_v)
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
        self.buckets, self.max_distance = attn.relative_attention_num_buckets, attn.relative_attention_max_distance

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
            enc, dec = _private_copy(model.encoder), _private_copy(model.decoder)
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
            base = _private_copy(model.model)
            enc, dec = base.encoder, base.decoder
            self.enc_blocks, self.dec_blocks = list(enc.layers), list(dec.layers)
            self.enc_embed = _EncoderEmbedIds(_Seq2SeqEmbed(enc))
            self.dec_embed = _DecoderEmbed(_Seq2SeqEmbed(dec))
            self.enc_layer = _EncoderLayer
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
    model_type = _require_type(model, SEQ2SEQ_MODEL_TYPES, "an encoder-decoder model").model_type
    if not hasattr(model, "lm_head"):
        raise _fail(model, "check architecture", "expected model.lm_head: a ...ForConditionalGeneration model")
    if model_type == "t5":
        if not (hasattr(model, "encoder") and hasattr(model, "decoder")):
            raise _fail(model, "check architecture", "expected model.encoder and .decoder (T5ForConditionalGeneration)")
        return
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "encoder") or not hasattr(base, "decoder"):
        raise _fail(model, "check architecture", "expected model.model.encoder and .decoder (a seq2seq LM)")
    for side in (base.encoder, base.decoder):
        if getattr(side, "layer_norm", None) is not None:
            raise _fail(model, "check architecture", "a final encoder/decoder layer norm (mBART) is not supported")


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
    from .encoder import EncoderInfo, EncoderProgram
    from .seq2seq import Seq2SeqInfo, Seq2SeqProgram

    _check_seq2seq(model)
    _register_attention()
    config = model.config
    parts = _Seq2SeqParts(model)
    d = config.d_model
    heads, head_dim, max_pos = parts.heads, parts.head_dim, parts.max_positions
    batch, seq, past, kept = (
        Dim("batch", min=1, max=1024),
        Dim("seq", min=1, max=max_pos),
        Dim("past", min=0, max=max_pos),
        Dim("kept", min=1, max=max_pos),
    )
    B, S, P, E = 2, 3, 2, 5
    dtype = model.dtype
    mask_heads = parts.enc_heads if parts.t5 else 1  # T5's masks carry the per-head bias
    step = "export encoder embed"
    try:
        enc_embed = export_module(parts.enc_embed, (torch.zeros(B, E, dtype=torch.long),), ({0: batch, 1: kept},))
        hidden = torch.randn(B, E, d, dtype=dtype)
        enc_layers = []
        for i, block in enumerate(parts.enc_blocks):
            step = f"export encoder layer {i}"
            first = parts.enc_blocks[0]
            # T5's first block owns the bias table: its structure differs, its graph (bias given) does not
            same = enc_layers and (parts.t5 or _structure(block) == _structure(first))
            if same:
                gm = rebind(enc_layers[0], copy.deepcopy(enc_layers[0].graph), parts.enc_layer(block))
            else:
                gm = export_module(
                    parts.enc_layer(block),
                    (hidden, torch.zeros(B, mask_heads, E, E, dtype=dtype)),
                    ({0: batch, 1: kept}, {0: batch, 2: kept, 3: kept}),
                )
            enc_layers.append(gm)
        enc_bias = dec_bias = None
        if parts.t5:
            step = "export relative position bias"
            positions = torch.arange(E).expand(B, E).clone()
            enc_bias = export_module(parts.enc_bias, (positions,), ({0: batch, 1: kept},))
            dec_bias = export_module(
                parts.dec_bias,
                (torch.arange(S).expand(B, S) + P, torch.arange(P + S).expand(B, P + S).clone()),
                ({0: batch, 1: seq}, {0: batch, 1: Dim.AUTO}),
            )
        step = "export decoder embed"
        ids = torch.zeros(B, S, dtype=torch.long)
        pos = torch.arange(S).expand(B, S).clone()
        dec_embed = export_module(parts.dec_embed, (ids, pos), ({0: batch, 1: seq},) * 2)
        cross, layers = [], []
        x = torch.randn(B, S, d, dtype=dtype)
        kv = torch.randn(B, heads, P, head_dim, dtype=dtype)
        ckv = torch.randn(B, heads, E, head_dim, dtype=dtype)
        self_mask = torch.zeros(B, mask_heads, S, P + S, dtype=dtype)
        layer_args = (x, self_mask, kv, kv.clone(), ckv, ckv.clone(), torch.zeros(B, 1, 1, E, dtype=dtype))
        layer_dyn = (
            {0: batch, 1: seq},
            {0: batch, 2: seq, 3: Dim.AUTO},
            {0: batch, 2: past},
            {0: batch, 2: past},
            {0: batch, 2: kept},
            {0: batch, 2: kept},
            {0: batch, 3: kept},
        )
        for i, block in enumerate(parts.dec_blocks):
            step = f"export decoder layer {i}"
            if layers and (parts.t5 or _structure(block) == _structure(parts.dec_blocks[0])):
                cross.append(rebind(cross[0], copy.deepcopy(cross[0].graph), parts.cross(i)))
                layers.append(rebind(layers[0], copy.deepcopy(layers[0].graph), parts.dec_layer(i)))
            else:
                cross.append(export_module(parts.cross(i), (hidden,), ({0: batch, 1: kept},)))
                layers.append(export_module(parts.dec_layer(i), layer_args, layer_dyn))
        step = "export head"
        head = export_module(parts.head, (x,), ({0: batch, 1: seq},))
    except UnsupportedModelError:
        raise
    except Exception as e:  # noqa: BLE001 - any export failure is a capture failure, with the step named
        raise _fail(model, step, _first_line(e)) from e
    for gm, layer in [(enc_embed, None), *[(g, i) for i, g in enumerate(enc_layers)]]:
        _tag_encoder(gm, layer)
    stages = [(dec_embed, None), *[(g, i) for i, g in enumerate(cross)], *[(g, i) for i, g in enumerate(layers)]]
    for gm, layer in [*stages, (head, None), *[(g, None) for g in (enc_bias, dec_bias) if g is not None]]:
        simplify(gm)
        _tag_encoder(gm, layer)
    enc_info = EncoderInfo(
        architecture=type(model).__name__,
        model_type=config.model_type,
        num_layers=len(enc_layers),
        hidden_size=d,
        num_heads=parts.enc_heads,
        max_positions=max_pos,
    )
    encoder = EncoderProgram(enc_embed, enc_layers, enc_info, token_types=False, bias=enc_bias)
    info = Seq2SeqInfo(
        architecture=type(model).__name__,
        model_type=config.model_type,
        encoder_layers=len(enc_layers),
        decoder_layers=len(layers),
        hidden_size=d,
        num_heads=heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        max_positions=max_pos,
        dtype=str(dtype).replace("torch.", ""),
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
        raise _fail(model, "generation defaults", "the model's generation config has no decoder_start_token_id")
    return {
        "decoder_start_token_id": int(start),
        "eos_token_id": eos,
        "pad_token_id": int(pad) if pad is not None else (eos[0] if eos else 0),
        "forced_bos_token_id": None if pick("forced_bos_token_id") is None else int(pick("forced_bos_token_id")),
        "forced_eos_token_id": None if pick("forced_eos_token_id") is None else int(pick("forced_eos_token_id")),
    }


def _verify_seq2seq(model, program) -> None:
    ids = torch.arange(3, 12, dtype=torch.long).remainder(program.info.vocab_size)[None].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    dec = torch.arange(4, 9, dtype=torch.long).remainder(program.info.vocab_size)[None].repeat(2, 1)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
        got = program.logits(ids, dec, mask)
    _check_logits(model, ref, got, 1e-4)


def transform_seq2seq(model, passes=(), *, verify: bool = True):
    """Capture an encoder-decoder LM (BART, T5) and apply ``passes``: TokenDrop, on the encoder (ELITE), is the
    one that applies; the decoder's cross-attention then reads the kept tokens only. The other passes are
    refused with the pass and the architecture named."""
    from .passes import TokenDrop
    from .seq2seq import apply_token_drop_seq2seq

    what = "an encoder-decoder model: encoder-decoder programs take token-drop, on the encoder, only"
    return _apply_allowed(model, passes, TokenDrop, what, capture_seq2seq, apply_token_drop_seq2seq, verify=verify)

# -- recurrent (Mamba) ------------------------------------------------------------------------------------


class _MambaEmbed(torch.nn.Module):
    def __init__(self, embeddings):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids):
        return (self.embeddings(input_ids),)


def _ssm_step(h, xs):
    """One token of the selective scan: ``h = h * dA + dB x``; the state (a copy: a scan's carry and output
    may not alias) and ``h . C`` out."""
    decay, update, c = xs
    h = h * decay + update
    return h, (h.clone(), (h * c[:, None, :]).sum(-1))


class _MambaLayer(torch.nn.Module):
    """One Mamba block over a run of tokens, with its recurrent state explicit.

    ``(hidden [b, s, d], valid [b, s], conv_state [b, I, K-1], ssm_state [b, I, N])`` ->
    ``(hidden, conv_in [b, I, K-1+s], states [b, s, I, N])``: ``conv_in`` is the convolution's input with the
    cached columns in front (the conv state after token ``t`` is its columns ``t+1 .. t+K-1``), ``states`` the
    SSM state after every token, so that the runtime can keep any prefix of the run (self-speculative
    rollback, deferred exits). ``valid`` zeroes padding, as the model does. The projections and the
    convolution run on the whole run at once, the selective scan token by token (``torch.ops.higher_order.
    scan``: one graph for any run length), with the model's own per-token arithmetic."""

    def __init__(self, block):
        super().__init__()
        mixer = block.mixer
        self.norm = block.norm
        self.in_proj, self.conv1d, self.x_proj = mixer.in_proj, mixer.conv1d, mixer.x_proj
        self.dt_proj, self.out_proj = mixer.dt_proj, mixer.out_proj
        self.A_log, self.D = mixer.A_log, mixer.D
        self.act = mixer.act
        self.rank, self.state_size = mixer.time_step_rank, mixer.ssm_state_size
        self.width = mixer.intermediate_size

    def forward(self, hidden, valid, conv_state, ssm_state):
        from torch._higher_order_ops.scan import scan

        residual = hidden
        mask = valid[..., None].to(hidden.dtype)
        x, gate = self.in_proj(self.norm(hidden) * mask).transpose(1, 2).chunk(2, dim=1)
        conv_in = torch.cat([conv_state, x], dim=-1)
        x = self.act(F.conv1d(conv_in, self.conv1d.weight, self.conv1d.bias, groups=self.width))
        x = x.transpose(1, 2) * mask  # [b, s, I]
        step, B, C = torch.split(self.x_proj(x), [self.rank, self.state_size, self.state_size], dim=-1)
        dt = F.softplus(self.dt_proj(step)).float()  # [b, s, I]
        A = -torch.exp(self.A_log.float())  # [I, N]
        decay = torch.exp(dt[..., None] * A)  # [b, s, I, N]
        update = (dt[..., None] * B.float()[:, :, None, :]) * x.float()[..., None]
        _, (states, y) = scan(_ssm_step, ssm_state.float(), (decay, update, C.float()), dim=1)
        y = (y + x.float() * self.D.float()) * F.silu(gate.transpose(1, 2).float())
        return residual + self.out_proj(y.to(hidden.dtype)), conv_in, states.to(ssm_state.dtype)


class _MambaHead(torch.nn.Module):
    def __init__(self, norm, lm_head):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, hidden):
        return (self.lm_head(self.norm(hidden)),)


def capture_mamba(model, *, verify: bool = True):
    """Capture a ``MambaForCausalLM`` as a :class:`~effx.recurrent.RecurrentProgram`: ``embed (input_ids) ->
    hidden``, ``layer.i`` (see :class:`_MambaLayer`: the conv and SSM states are the cache) and ``head``
    (final norm and LM head). Batch and run length are dynamic. ``verify`` checks the stages against the
    model's own forward."""
    from .recurrent import RecurrentInfo, RecurrentProgram

    config = _require_type(model, RECURRENT_MODEL_TYPES, "a recurrent model")
    base = getattr(model, "backbone", None)
    if base is None or not hasattr(model, "lm_head"):
        raise _fail(model, "check architecture", "expected model.backbone and model.lm_head (MambaForCausalLM)")
    d, width = config.hidden_size, config.intermediate_size
    N, K = config.state_size, config.conv_kernel
    dtype = model.dtype
    batch, run = Dim("batch", min=1, max=1024), Dim("run", min=1, max=4096)
    B, S = 2, 3
    step = "export embed"
    try:
        embed = export_module(_MambaEmbed(base.embeddings), (torch.zeros(B, S, dtype=torch.long),), ({0: batch, 1: run},))
        args = (
            torch.randn(B, S, d, dtype=dtype),
            torch.ones(B, S, dtype=dtype),
            torch.randn(B, width, K - 1, dtype=dtype),
            torch.randn(B, width, N, dtype=dtype),
        )
        dyn = ({0: batch, 1: run}, {0: batch, 1: run}, {0: batch}, {0: batch})
        layers = []
        for i, block in enumerate(base.layers):
            step = f"export layer {i}"
            wrapper = _MambaLayer(block)
            if layers and _structure(block) == _structure(base.layers[0]):
                layers.append(rebind(layers[0], copy.deepcopy(layers[0].graph), wrapper))
            else:
                layers.append(export_module(wrapper, args, dyn))
        step = "export head"
        head = export_module(_MambaHead(base.norm_f, model.lm_head), (args[0],), ({0: batch, 1: run},))
    except Exception as e:  # noqa: BLE001 - any export failure is a capture failure, with the step named
        raise _fail(model, step, _first_line(e)) from e
    for gm in (embed, *layers, head):
        simplify(gm)
    gen = getattr(model, "generation_config", None)
    eos = as_ids(getattr(gen, "eos_token_id", None) if gen is not None else config.eos_token_id)
    pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    info = RecurrentInfo(
        architecture=type(model).__name__,
        model_type=config.model_type,
        num_layers=len(layers),
        hidden_size=d,
        intermediate_size=width,
        state_size=N,
        conv_kernel=K,
        vocab_size=config.vocab_size,
        dtype=str(dtype).replace("torch.", ""),
    )
    program = RecurrentProgram(
        embed, layers, head, info, eos_token_ids=eos, pad_token_id=eos[0] if pad is None and eos else pad
    )
    if verify:
        ids = torch.arange(1, 10, dtype=torch.long).remainder(config.vocab_size)[None]
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
            got = program.logits(ids)
        # 1e-3 of the logit scale, not 1e-4 as for attention: 24 float32 Mamba layers round to ~2e-4 of it,
        # the model's own forward as much as the stages (both against a float64 run, Mamba-130m shapes)
        _check_logits(model, ref, got, 1e-3)
    return program


def transform_mamba(model, passes=(), *, verify: bool = True):
    """Capture a Mamba LM and apply ``passes``: EarlyExit (lossy with deferred state, or self-speculative
    with state rollback) is the one that applies; the others are refused with the pass and the architecture
    named."""
    from .passes import EarlyExit
    from .recurrent import apply_early_exit

    what = (
        "a recurrent state-space model: the other passes rewrite attention or FFN layers; recurrent programs "
        "take early-exit only"
    )
    return _apply_allowed(model, passes, EarlyExit, what, capture_mamba, apply_early_exit, verify=verify)
