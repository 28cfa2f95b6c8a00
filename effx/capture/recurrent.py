"""Capture a Mamba LM as a :class:`~effx.recurrent.RecurrentProgram` (the conv and SSM states are the
cache), and ``transform_mamba``: capture followed by EarlyExit, the one pass a recurrent program takes."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..fx import Dim, export_module, rebind, simplify
from ..passes import PassManager
from ..recurrent import RecurrentInfo, RecurrentProgram
from ..runtime.loop import as_ids
from .common import (
    RECURRENT_MODEL_TYPES,
    check_logits,
    export_step,
    fail,
    require_type,
    structure,
)

__all__ = ["capture_mamba", "transform_mamba"]


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
    config = require_type(model, RECURRENT_MODEL_TYPES, "a recurrent model")
    base = getattr(model, "backbone", None)
    if base is None or not hasattr(model, "lm_head"):
        raise fail(
            model, "check architecture", "expected model.backbone and model.lm_head (MambaForCausalLM)"
        )
    d, width = config.hidden_size, config.intermediate_size
    N, K = config.state_size, config.conv_kernel
    dtype = model.dtype
    batch, run = Dim("batch", min=1, max=1024), Dim("run", min=1, max=4096)
    B, S = 2, 3
    with export_step(model, "export embed"):
        ids = torch.zeros(B, S, dtype=torch.long)
        embed = export_module(_MambaEmbed(base.embeddings), (ids,), ({0: batch, 1: run},))
        args = (
            torch.randn(B, S, d, dtype=dtype),
            torch.ones(B, S, dtype=dtype),
            torch.randn(B, width, K - 1, dtype=dtype),
            torch.randn(B, width, N, dtype=dtype),
        )
    dyn = ({0: batch, 1: run}, {0: batch, 1: run}, {0: batch}, {0: batch})
    layers = []
    for i, block in enumerate(base.layers):
        with export_step(model, f"export layer {i}"):
            wrapper = _MambaLayer(block)
            if layers and structure(block) == structure(base.layers[0]):
                layers.append(rebind(layers[0], copy.deepcopy(layers[0].graph), wrapper))
            else:
                layers.append(export_module(wrapper, args, dyn))
    with export_step(model, "export head"):
        head = export_module(_MambaHead(base.norm_f, model.lm_head), (args[0],), ({0: batch, 1: run},))
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
        check_logits(model, ref, got, 1e-3)
    return program


def transform_mamba(model, passes=(), *, verify: bool = True):
    """Capture a Mamba LM and apply ``passes``: EarlyExit (lossy with deferred state, or self-speculative
    with state rollback) is the one that applies; the others are refused with the pass and the architecture
    named."""
    manager = PassManager(passes)
    manager.check_family(RecurrentInfo.family, type(model).__name__)
    return manager.run(capture_mamba(model, verify=verify))
