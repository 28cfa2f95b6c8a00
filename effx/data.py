"""Prompts and text that are available offline.

``PROMPTS`` is a small suite of real instructions (explain, summarize, answer from context, write code,
continue) used by the integration tests, the demo and ``benchmarks/decode.py``.
"""

from __future__ import annotations

__all__ = ["PROMPTS", "encode_prompts", "pydoc_texts"]

PROMPTS: tuple[str, ...] = (
    "Explain why the sea has tides, in two or three sentences.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Summarize in one sentence: The city council voted on Tuesday to extend the bike lane network by 40 "
    "kilometres over the next three years, funded by a mix of federal grants and parking revenue.",
    "Context: Marie Curie won the Nobel Prize in Physics in 1903 and in Chemistry in 1911. "
    "Question: In which two fields did Marie Curie win Nobel Prizes?",
    "Give three tips for keeping houseplants alive.",
    "What is the difference between a list and a tuple in Python?",
    "Continue the story: The lighthouse keeper noticed that the lamp had gone out, and",
    "Translate to French: Good morning, how are you today?",
)


def encode_prompts(tokenizer, prompts, *, chat: bool = True):
    """Tokenize prompts as a left-padded batch: ``(input_ids, attention_mask)``.

    With ``chat=True`` and a tokenizer that has a chat template, each prompt is a user turn followed by the
    assistant's generation prompt.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if chat and getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
    else:
        texts = list(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"], enc["attention_mask"]


def pydoc_texts(split: str = "calib") -> list[str]:
    """Real English text that ships with Python: the ``pydoc_data.topics`` help pages, split by topic.

    ``split="calib"`` gives two of every three topics (for calibration and training), ``"heldout"`` the
    rest (for evaluation), so the two never share a page.
    """
    if split not in ("calib", "heldout"):
        raise ValueError(f"split must be 'calib' or 'heldout', got {split!r}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    keep = (lambda i: i % 3 != 2) if split == "calib" else (lambda i: i % 3 == 2)
    return [topics[n] for i, n in enumerate(names) if keep(i)]
