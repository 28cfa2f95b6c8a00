"""Prompts and text that are available offline.

``PROMPTS`` is a small suite of real instructions (explain, summarize, answer from context, write code,
continue, translate) used by the integration tests, the demo, ``effx bench`` and the benchmarks;
``REFERENCES`` holds reference answers for the prompts that have one honest answer. :func:`pydoc_texts`
is real English text that ships with Python; :func:`aclsum` is a summarization set with references (ACL
papers).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from .errors import DataLoadError

__all__ = [
    "ACLSUM_ASPECTS",
    "ACLSUM_SPLITS",
    "PROMPTS",
    "REFERENCES",
    "aclsum",
    "encode_prompts",
    "offline_texts",
    "pydoc_texts",
    "token_chunks",
    "training_prompts",
]

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

# Reference answers for the prompts of PROMPTS that have one answer a careful person would write (a summary
# of one given sentence, an answer stated in the context, a short translation); open-ended prompts (explain,
# write code, give tips, continue a story) have none: any reference there would be one taste among many.
REFERENCES: dict[str, str] = {
    PROMPTS[2]: "The city council voted to extend the bike lane network by 40 kilometres over three years, "
    "funded by federal grants and parking revenue.",
    PROMPTS[3]: "Marie Curie won Nobel Prizes in Physics and in Chemistry.",
    PROMPTS[7]: "Bonjour, comment allez-vous aujourd'hui ?",
}


def encode_prompts(tokenizer, prompts, *, chat: bool = True):
    """Tokenize prompts as a left-padded batch: ``(input_ids, attention_mask)``.

    With ``chat=True`` and a tokenizer that has a chat template, each prompt is a user turn followed by the
    assistant's generation prompt.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    templated = bool(chat and getattr(tokenizer, "chat_template", None))
    if templated:
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
        # a template writes its own special tokens; plain text gets the tokenizer's (a base model's <bos>)
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
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


_TOPICS = (
    "photosynthesis",
    "the water cycle",
    "compound interest",
    "how vaccines work",
    "black holes",
    "the French Revolution",
    "machine learning",
    "plate tectonics",
    "the immune system",
    "inflation",
    "recursion in programming",
    "climate change",
    "the printing press",
    "supply and demand",
    "volcanoes",
    "the human heart",
    "electric cars",
    "the Roman Empire",
    "sleep",
    "public key cryptography",
    "rainbows",
    "the stock market",
    "bees and pollination",
    "the internet",
    "earthquakes",
    "healthy breakfasts",
    "learning a new language",
    "time management",
    "composting",
    "the moon landing",
)
_ASKS = (
    "Explain {} in simple terms.",
    "Write a short paragraph about {}.",
    "Give three facts about {}.",
    "What are the pros and cons of {}?",
    "Write a short poem about {}.",
    "How would you teach {} to a ten-year-old?",
)


# everyday assistant tasks (code, stories, translation, advice, answers from a context), none of them from
# PROMPTS: what an open chat asks besides questions about a topic
_CODE = (
    "reverses a string",
    "checks whether a word is a palindrome",
    "counts the vowels in a sentence",
    "returns the largest number in a list",
    "merges two sorted lists into one sorted list",
    "removes duplicates from a list while keeping the order",
    "computes the factorial of n recursively",
    "tells whether a year is a leap year",
    "converts Celsius to Fahrenheit",
    "finds the most common word in a text",
    "flattens a nested list",
    "checks whether a number is prime",
    "returns the sum of the digits of an integer",
    "reads a CSV file and returns its rows as dictionaries",
    "implements binary search on a sorted list",
    "groups a list of words by their first letter",
)
_CONCEPTS = (
    ("a dictionary", "a set"),
    ("a for loop", "a while loop"),
    ("a function", "a method"),
    ("== and is", ""),
    ("a shallow copy", "a deep copy"),
    ("an exception", "a return code"),
    ("a class", "an instance"),
    ("a generator", "a list comprehension"),
)
_STORIES = (
    "The train stopped in the middle of the desert, and",
    "When the old clock in the hallway struck thirteen,",
    "The robot had never seen snow before, so",
    "On the first day at her new school, Maya found a note in her desk that said",
    "The baker opened the oven and, to his surprise,",
    "Deep in the forest, the two friends followed the map until",
    "The last message from the spaceship read",
    "Every night at midnight, the cat next door",
)
_SENTENCES = (
    "Where is the nearest train station?",
    "I would like a cup of coffee, please.",
    "The museum is closed on Mondays.",
    "My brother lives in a small village near the sea.",
    "Can you help me carry these boxes?",
    "We are going to the cinema tonight.",
)
_ADVICE = (
    "saving money on groceries",
    "studying for an exam",
    "sleeping better",
    "writing a good email",
    "running your first five kilometres",
    "staying focused while working from home",
    "preparing for a job interview",
    "reducing plastic waste at home",
)
_FACTS = (
    (
        "The Amazon River flows through Peru, Colombia and Brazil and carries more water than any other river.",
        "Which countries does the Amazon River flow through?",
    ),
    (
        "Alexander Fleming discovered penicillin in 1928 after noticing mould that killed bacteria in a dish.",
        "What did Alexander Fleming notice in 1928?",
    ),
    (
        "The Great Wall of China was built over many centuries, mostly to protect against raids from the north.",
        "Why was the Great Wall of China built?",
    ),
    (
        "Honey bees communicate the location of flowers to each other with a movement called the waggle dance.",
        "How do honey bees tell each other where flowers are?",
    ),
    (
        "Mount Kilimanjaro, in Tanzania, is the highest mountain in Africa at 5,895 metres.",
        "How high is Mount Kilimanjaro, and where is it?",
    ),
    (
        "The first modern Olympic Games were held in Athens in 1896, with athletes from 14 nations.",
        "Where and when were the first modern Olympic Games held?",
    ),
)


def _task_prompts() -> list[str]:
    prompts = [f"Write a Python function that {task}." for task in _CODE]
    prompts += [f"Explain what a Python function that {task} has to take care of." for task in _CODE[::2]]
    prompts += [
        f"What is the difference between {a} and {b} in Python?"
        if b
        else f"What is the difference between {a} in Python?"
        for a, b in _CONCEPTS
    ]
    prompts += [f"Continue the story: {start}" for start in _STORIES]
    prompts += [f"Translate to {lang}: {s}" for s in _SENTENCES for lang in ("French", "Spanish", "German")]
    prompts += [f"Give three tips for {topic}." for topic in _ADVICE]
    prompts += [f"Summarize in one sentence: {fact}" for fact, _ in _FACTS]
    prompts += [f"Context: {fact} Question: {question}" for fact, question in _FACTS]
    return prompts


def training_prompts() -> list[str]:
    """A varied set of instructions, for training on a model's own generations (exit heads, draft
    branches): general questions about 30 topics in six forms; 78 everyday tasks (Python functions and
    concepts, story openings, translations, advice, one-sentence summaries and answers from a given
    context); summaries and questions over the ACLSum ``train`` and ``val`` papers; and explanations of
    pydoc ``calib`` pages. 611 prompts, in a fixed shuffled order. The tasks take the forms an open chat
    asks in, ``PROMPTS``' among them, but the set shares no text with the evaluation sets (``PROMPTS``,
    ACLSum ``test``, pydoc ``heldout``); without the ``aclsum`` wheel the papers are left out."""
    import random

    prompts = [ask.format(topic) for topic in _TOPICS for ask in _ASKS] + _task_prompts()
    try:
        papers = aclsum("train") + aclsum("val")
    except DataLoadError:
        papers = []
    for p in papers:
        prompts.append(f"Summarize this paper in three sentences.\n\nTitle: {p['title']}\n\n{p['abstract']}")
        prompts.append(f"{p['introduction'][:1200]}\n\nWhat problem does this paper address, and how?")
    forms = ("Explain this in simple words:\n", "Summarize:\n", "Write a short example that uses this:\n")
    for i, page in enumerate(pydoc_texts("calib")[:120]):
        prompts.append(forms[i % len(forms)] + page[:600])
    random.Random(0).shuffle(prompts)
    return prompts


def offline_texts() -> list[str]:
    """Real English text for training that shares nothing with the evaluation sets: pydoc ``calib`` pages and
    the ACLSum ``train`` papers (abstract and introduction; left out without the ``aclsum`` wheel)."""
    try:
        papers = aclsum("train")
    except DataLoadError:
        papers = []
    return pydoc_texts("calib") + [f"{p['title']}\n\n{p['abstract']}\n\n{p['introduction']}" for p in papers]


ACLSUM_SPLITS = ("train", "val", "test")
ACLSUM_ASPECTS = ("challenge", "approach", "outcome")
_SECTIONS = ("abstract", "introduction", "conclusion")
# the corpus is word-tokenized ("a workflow ." , "( MT )"); these undo the spaces around punctuation
_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}]|'s\b|n't\b)")
_SPACE_AFTER = re.compile(r"([(\[{]) ")


def _detokenize(sentences: list[str]) -> str:
    text = " ".join(s.strip() for s in sentences if s.strip())
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))


def _aclsum_dir() -> Path:
    # found, not imported: importing aclsum pulls in its `sienna` dependency, which effx does not need
    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        raise DataLoadError(
            "the ACLSum data set is not installed; install it with `pip install --no-deps aclsum`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset"
    if not path.is_dir():
        raise DataLoadError(
            f"'aclsum' is installed but {path} is missing; reinstall it with "
            "`pip install --force-reinstall --no-deps aclsum`"
        )
    return path


def aclsum(split: str = "test", n: int | None = None) -> list[dict]:
    """Papers of ACLSum (Takeshita et al., 2024; MIT; the ``aclsum`` wheel, ``pip install --no-deps aclsum``),
    offline: 100 in ``"train"``, 50 in ``"val"``, 100 in ``"test"``; the first ``n`` of the split if given.

    Each paper is a dict with ``id``, ``title``, the text of its ``abstract``, ``introduction`` and
    ``conclusion``, ``summaries`` (the human reference summary of each aspect: ``challenge``, ``approach``,
    ``outcome``, one sentence each) and ``summary`` (the three joined in that order: the reference of a
    whole-paper summary). The corpus is word-tokenized; the text here has the spaces around punctuation
    undone so that prompts read naturally (ROUGE tokenizes again either way).
    """
    if split not in ACLSUM_SPLITS:
        raise DataLoadError(f"unknown ACLSum split {split!r}; choose one of {ACLSUM_SPLITS}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise DataLoadError(f"n must be a non-negative integer (how many papers), got {n!r}")
    path = _aclsum_dir() / f"{split}.jsonl"
    papers = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if n is not None and len(papers) >= n:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                summaries = {a: row["summary"][a].strip() for a in ACLSUM_ASPECTS}
                paper = {"id": row["id"], "title": row["title"]}
                paper.update({s: _detokenize(row["sentences"][s]) for s in _SECTIONS})
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise DataLoadError(
                    f"{path}, line {line_no}: not an ACLSum record ({type(e).__name__}: {e})"
                ) from e
            paper["summaries"] = summaries
            paper["summary"] = " ".join(summaries[a] for a in ACLSUM_ASPECTS)
            papers.append(paper)
    return papers


def token_chunks(tokenizer, texts, seq_len: int, max_tokens: int) -> list:
    """``texts`` tokenized and joined (end-of-text between texts) into ``[1, seq_len]`` LongTensors, at most
    ``max_tokens`` tokens in all: the chunks calibration and evaluation read teacher-forced. ``ValueError``
    when the text holds fewer than ``seq_len`` tokens."""
    import torch

    if isinstance(texts, str):
        texts = [texts]
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if eos is not None:
            ids.append(eos)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens of text, got {len(ids)}")
    return [torch.tensor(ids[i * seq_len : (i + 1) * seq_len])[None] for i in range(n)]
