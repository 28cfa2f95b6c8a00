"""What every family's capture shares: the model types each family takes, the attention function the
stages are exported with, the cache a layer sees during export, parameter-sharing copies, structure keys,
the one error shape for a failed step, and the logit check."""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError

__all__ = [
    "ENCODER_MODEL_TYPES",
    "RECURRENT_MODEL_TYPES",
    "SEQ2SEQ_MODEL_TYPES",
    "SUPPORTED_MODEL_TYPES",
    "StageCache",
    "check_logits",
    "export_step",
    "fail",
    "first_line",
    "private_copy",
    "register_attention",
    "require_type",
    "structure",
]

# Model types whose glue between layers (embedding, rotary tables, mask, final norm) is the plain Llama one
# that the runtime reproduces. Capture also checks the result numerically against the model's own forward.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# captured by their own functions (capture.encoder, capture.seq2seq, capture.recurrent), as their own
# kinds of program
ENCODER_MODEL_TYPES = ("bert",)
SEQ2SEQ_MODEL_TYPES = ("bart", "t5")
RECURRENT_MODEL_TYPES = ("mamba",)

_ATTN_NAME = "effx"


def _effx_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_bias=None, **kwargs
):
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


def register_attention() -> None:
    """Register the effx attention function (``"effx"``) with transformers, once."""
    from transformers import AttentionInterface

    if _ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(_ATTN_NAME, _effx_attention)


class StageCache:
    """The cache object a decoder layer sees during export: cached K/V in, new K/V recorded."""

    def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor):
        self.past_k, self.past_v = past_k, past_v
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        self.new = (key_states, value_states)
        return torch.cat([self.past_k, key_states], dim=2), torch.cat([self.past_v, value_states], dim=2)

    def get_seq_length(self, layer_idx=0) -> int:
        return self.past_k.shape[2]


def fail(model, step: str, detail: str) -> UnsupportedModelError:
    """The error of a capture step that failed, naming the model, its type and the step."""
    return UnsupportedModelError(
        f"cannot capture {type(model).__name__} (model_type={getattr(model.config, 'model_type', '?')!r}): "
        f"step '{step}' failed: {detail}"
    )


def require_type(model, types: tuple[str, ...], what: str):
    """``model.config``, or an ``UnsupportedModelError`` when its model_type is not one of ``types``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or model_type not in types:
        raise UnsupportedModelError(
            f"cannot capture {type(model).__name__} as {what}: model_type {model_type!r} is not one of "
            f"{', '.join(types)}"
        )
    return config


def first_line(e: BaseException) -> str:
    """``"TypeName: first line of the message"``: what a failed step reports of the error behind it."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def export_step(model, step: str):
    """Run one export step: an exception raised in it (torch.export raises many types) becomes one
    ``UnsupportedModelError`` with the step named; one that is already an ``UnsupportedModelError`` passes."""
    try:
        yield
    except UnsupportedModelError:
        raise
    except Exception as e:
        raise fail(model, step, first_line(e)) from e


def private_copy(module: torch.nn.Module) -> torch.nn.Module:
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


def structure(module: torch.nn.Module) -> tuple:
    """What must match for two layers to share one exported graph."""
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in module.named_buffers())
    classes = tuple((n, type(m).__qualname__) for n, m in module.named_modules())
    return params, buffers, classes


def check_logits(model, ref: torch.Tensor, got: torch.Tensor, rel: float) -> None:
    """The captured stages' logits ``got`` within ``rel`` of the logit scale of the model's own ``ref``."""
    err = (ref - got).abs().max().item()
    if not err <= rel * (ref.abs().max().item() + 1.0):
        raise fail(
            model, "verify", f"captured stages differ from the model's forward by {err:.3g} (max |logit|)"
        )
