"""Tiny random models built from configs (no downloads), for tests and for checks on other machines.

``tiny_model("llama", layers=3, seed=4)`` is a Hugging Face model with random weights and a 96-token
vocabulary that captures, transforms and exports in seconds; ``related_models`` builds a small/large pair
for cascades; ``PARITY_PASSES`` is the set of pipelines that every backend must run to the same tokens and
decisions (``tests/test_onnx.py`` checks it here, ``benchmarks/onnx_providers.py`` on other providers).
"""

from __future__ import annotations

import torch

from .passes import EarlyExit, NeuronMask, PromptLookup, TokenDrop, VocabReduce

__all__ = [
    "PARITY_PASSES",
    "TINY_VOCAB",
    "left_padded_batch",
    "related_models",
    "tiny_config",
    "tiny_model",
    "tiny_tokenizer",
]

TINY_VOCAB = 96


def tiny_config(
    kind: str = "llama",
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = TINY_VOCAB,
    intermediate: int = 96,
    tie: bool = False,
    sliding_window: int | None = None,
):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

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
    if kind == "gemma3":
        # local (sliding) and global layers alternate, each kind with its own rotary base; q/k norms, norms
        # around the MLP, scaled embeddings (tie=True ties the head as Gemma does: tiny tied models repeat
        # the token they were fed)
        types = ("sliding_attention", "full_attention")
        return Gemma3TextConfig(
            **common,
            head_dim=hidden // heads,
            sliding_window=sliding_window or 6,
            layer_types=[types[i % 2] for i in range(layers)],
            query_pre_attn_scalar=hidden // heads,
        )
    raise ValueError(kind)


def tiny_model(kind: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **kw), attn_implementation="sdpa")
    if kind == "gemma3":  # its RMS norms scale by 1 + weight, initialized to 0: make them differ
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    return model.eval()


def tiny_tokenizer(vocab: int = TINY_VOCAB, *, chat_template: bool = True):
    """A word-level tokenizer for the tiny models: ``w0 .. w{vocab-1}`` are token ids 0.., split on spaces
    (``w2`` ends a sequence, ``w0`` pads); with a small chat template, as instruction-tuned models carry."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w1"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w2", pad_token="w0")
    if chat_template:
        out.chat_template = "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}w5"
    return out


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


# name -> passes(vocab_file): one pipeline per run-time decision, and all of them combined
PARITY_PASSES = {
    "lossy-exits": lambda v: [EarlyExit(layers=(0, 2), thresholds=(0.3,))],
    "pruned-exits": lambda v: [EarlyExit(layers=(0, 1, 2), thresholds=(0.3,)), VocabReduce(k=20)],
    "adaptive-exits": lambda v: [
        EarlyExit(layers=(0, 1, 2), thresholds=(0.3,)),
        VocabReduce(k=20, schedule="adaptive", mass=0.9, min_k=4),
    ],
    "self-speculative": lambda v: [
        EarlyExit(layers=(1,), thresholds=(0.2,), mode="self-speculative", draft=3),
        VocabReduce(k=40, where="draft", vocab=v),
    ],
    "prompt-lookup": lambda v: [PromptLookup(ngram=2, draft=4)],
    "lookup-and-exit": lambda v: [
        EarlyExit(layers=(1,), thresholds=(0.2,), mode="self-speculative", draft=3),
        PromptLookup(ngram=2, draft=5),
    ],
    "reduced-head": lambda v: [VocabReduce(k=30, where="head", vocab=v, fallback=0.9)],
    "neuron-mask": lambda v: [NeuronMask(keep=0.5, score="random", layers=(1, 2))],
    "token-drop": lambda v: [TokenDrop(at_layers=(1, 3), keep=(0.6, 0.3), protect_last=2)],
    "combined": lambda v: [
        NeuronMask(keep=0.5, score="random"),
        TokenDrop(at_layers=(2,), keep=(0.5,), protect_last=2),
        EarlyExit(layers=(0, 1), thresholds=(0.3,)),
        VocabReduce(k=24),
    ],
}
