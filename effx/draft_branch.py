"""Training a draft branch (EAGLE-style) on the model's own behaviour, on a CPU, in minutes.

The branch (:class:`effx.passes.draft_branch.BranchLayer`) reads the model's last-layer feature at
position t-1 and the embedding of token t and predicts the feature at t, whose head gives the model's next
token. Training has two phases:

1. **collect** (:func:`collect_branch_data`): the model's own greedy generations on a varied prompt set
   (:func:`effx.exit_heads.own_generations`, :func:`effx.data.training_prompts`), read once teacher-forced:
   per position the token, the last-layer feature and the model's greedy next token (in batches, and in
   bfloat16 where the CPU multiplies it natively: :func:`native_bf16`).
2. **fit** (:func:`fit_draft_branch`): the branch, initialised from the model's last decoder layer, is
   trained with the model frozen. Training-time test (EAGLE-3): the branch is unrolled ``steps`` times,
   each step fed the previous step's predicted features and attending to the keys a drafting round would
   hold (true-feature keys up to the round's start, then one key per earlier drafting step), so that
   acceptance holds past the first draft. The loss is the cross-entropy of the model's own distribution
   (its head on the true feature) under the branch's draft head, both over a static vocabulary of the
   ``vocab_k`` ids the model emits most (FR-Spec), at every step; soft targets carry more per token than
   the greedy token alone. A small regression of the predicted feature onto the true one is added.

Held-out acceptance is reported per draft position before and after: the share of rounds whose first
``j`` drafts all equal the model's greedy tokens, with the drafting chain run as at decode time. The
branch is saved as safetensors with the metadata ``DraftBranch`` checks (``effx.formats``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .exit_heads import backbone_states, own_generations, text_sequences
from .formats import BRANCH_KIND
from .fx import fetch
from .kernels.build import cpu_features
from .passes.draft_branch import BranchLayer
from .passes.vocab_reduce import static_subset_graph
from .program import torch_dtype
from .runtime.vocab import head_logits

__all__ = [
    "BranchData",
    "BranchResult",
    "acceptance",
    "chains",
    "collect_branch_data",
    "fit_draft_branch",
    "init_branch",
    "native_bf16",
    "save_draft_branch",
    "train_draft_branch",
]


@dataclass
class BranchData:
    """Sequences read teacher-forced: per sequence its tokens ``[n]``, last-layer features ``[n, d]``
    (float32), the model's greedy next token at each position ``[n]``, and ``first``, the position of the
    last prompt token (later positions generated the continuation)."""

    ids: list[torch.Tensor]
    features: list[torch.Tensor]
    targets: list[torch.Tensor]
    first: list[int]
    source: str = ""

    @property
    def tokens(self) -> int:
        return sum(int(t.numel()) for t in self.ids)

    def split(self, holdout: float) -> tuple[list[int], list[int]]:
        """Sequence indices ``(train, held_out)``: the last ``holdout`` share of the generated sequences (those
        with a prompt, ``first > 0``; of all sequences when none has one) held out whole; with one such
        sequence or ``holdout=0`` both are every sequence."""
        every = list(range(len(self.ids)))
        pool = [i for i in every if self.first[i] > 0] or every
        if holdout <= 0 or len(pool) < 2:
            return every, every
        held = pool[len(pool) - max(1, round(len(pool) * holdout)) :]
        return [i for i in every if i not in set(held)], held


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16, AMX, Arm's BF16): training then runs the
    model and the branch in bfloat16 (torch autocast: reading 1.9x and fitting 2.1x faster on a Zen 4
    core). Elsewhere bfloat16 is emulated and slower than float32, so training stays in float32."""
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & cpu_features())


def _precision(bf16: bool | None):
    """The autocast context of ``bf16`` (None: :func:`native_bf16`)."""
    on = native_bf16() if bf16 is None else bf16
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)


def collect_branch_data(
    program,
    sequences,
    *,
    batch_tokens: int = 4096,
    bf16: bool | None = None,
    progress: bool = True,
    source: str = "",
) -> BranchData:
    """``sequences`` (``(ids, first, last)`` from :func:`effx.exit_heads.own_generations` or
    :func:`effx.exit_heads.text_sequences`) read teacher-forced through ``program``, up to ``batch_tokens``
    tokens a batch (sequences of similar length right-padded together): tokens, last-layer features and
    greedy next tokens. ``bf16`` runs the model in bfloat16 (None: where the CPU has it natively,
    :func:`native_bf16`); the features then differ from float32's in about the third significant digit,
    which a draft tolerates (it is only a proposal), and the greedy targets come from the float32 head."""
    seqs = list(sequences)
    if not seqs:
        raise ValueError("collect_branch_data found no sequences")
    order = sorted(range(len(seqs)), key=lambda i: seqs[i][0].numel())
    groups: list[list[int]] = []
    for i in order:
        n = seqs[i][0].numel()
        if groups and n * (len(groups[-1]) + 1) <= max(batch_tokens, n):
            groups[-1].append(i)
        else:
            groups.append([i])
    features: dict[int, torch.Tensor] = {}
    targets: dict[int, torch.Tensor] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(s[0].numel() for s in seqs), desc="read features", unit="tok")
    try:
        with torch.inference_mode():
            for group in groups:
                lengths = [seqs[i][0].numel() for i in group]
                ids = torch.zeros(len(group), max(lengths), dtype=torch.long)
                for r, i in enumerate(group):
                    ids[r, : lengths[r]] = seqs[i][0]
                with _precision(bf16):
                    _, _, h = backbone_states(program, ids, ())
                h = h.float()
                for r, i in enumerate(group):
                    features[i] = h[r, : lengths[r]].clone()
                    targets[i] = head_logits(program, h[r : r + 1, : lengths[r]])[0].argmax(-1)
                if bar is not None:
                    bar.update(sum(lengths))
    finally:
        if bar is not None:
            bar.close()
    return BranchData(
        [seqs[i][0].clone() for i in range(len(seqs))],
        [features[i] for i in range(len(seqs))],
        [targets[i] for i in range(len(seqs))],
        [int(seqs[i][1]) for i in range(len(seqs))],
        source,
    )


# a decoder layer's norms by the names Llama-style models give them (their RMS norm multiplies by the weight);
# Gemma's norms are (1 + weight) and stand elsewhere, so its branch keeps norms at one
_NORMS = {"input_layernorm.weight": "norm_attn", "post_attention_layernorm.weight": "norm_mlp"}


def init_branch(program, ffn: int | None = None, seed: int = 0, scale: float = 1.0) -> BranchLayer:
    """A branch for ``program``: its attention and MLP weights copied from the model's last decoder layer
    where their shapes match (the MLP when ``ffn`` is the model's width), with that layer's norms where
    they are Llama-style; the fusion initialised to pass the previous feature through at RMS ``scale``
    (the features' own), so that the untrained branch runs the last layer on the previous feature."""
    info = program.info
    ffn = info.intermediate_size if ffn is None else ffn
    torch.manual_seed(seed)
    layer = BranchLayer(info, ffn)
    graph = program.layers[-1].graph
    targets = {"attn.q": layer.q, "attn.k": layer.k, "attn.v": layer.v, "attn.o": layer.o}
    targets.update({"mlp.gate": layer.gate, "mlp.up": layer.up, "mlp.down": layer.down})
    gemma = info.model_type.startswith("gemma")
    with torch.no_grad():
        for node in graph.graph.nodes:
            if node.op == "get_attr" and not gemma:
                norm = next((n for suffix, n in _NORMS.items() if str(node.target).endswith(suffix)), None)
                w = fetch(graph, node)
                if norm is not None and tuple(w.shape) == (info.hidden_size,):
                    getattr(layer, norm).copy_(w.float())
            module = targets.get(node.meta.get("effx_role", ""))
            if module is None or node.op != "call_function" or node.target != torch.ops.aten.linear.default:
                continue
            weight = node.args[1]
            if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
                w = fetch(graph, weight)
                if tuple(w.shape) == tuple(module.weight.shape):
                    module.weight.copy_(w.float())
        d = info.hidden_size
        layer.fc.weight.normal_(0, 0.02 / math.sqrt(2))
        layer.fc.weight[:, d:] += scale * torch.eye(d)
    return layer


@dataclass
class BranchResult:
    """What :func:`fit_draft_branch` did: the branch, its draft vocabulary, held-out acceptance per draft
    position before and after (``acceptance``: the share of rounds whose first j drafts are all accepted,
    j = 1..steps), and what it trained on."""

    layer: BranchLayer
    vocab: list[int] | None
    before: list[float]
    after: list[float]
    tokens: int
    heldout: int
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    source: str = ""
    collect_seconds: float = 0.0

    @property
    def accepted_per_round(self) -> float:
        """Expected accepted drafts per round of ``steps`` drafts (held out, after training)."""
        return float(sum(self.after))


class _Head:
    """The model's final norm and head over the draft vocabulary: ``(features) -> logits [.., k]``."""

    def __init__(self, program, ids: torch.Tensor | None) -> None:
        info = program.info
        graph = program.head.graph
        if ids is not None:
            graph = static_subset_graph(graph, ids, info, "draft-branch")
        for p in graph.parameters():
            p.requires_grad_(False)
        self.graph, self.ids, self.dtype = graph, ids, torch_dtype(info)
        # target id -> its column among the draft ids (-1: outside them)
        self.column = torch.full((info.vocab_size,), -1, dtype=torch.long)
        cols = torch.arange(info.vocab_size) if ids is None else ids
        self.column[cols] = torch.arange(cols.numel())

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.ndim == 2
        logits = self.graph(h.to(self.dtype)[None] if flat else h.to(self.dtype))[0]
        logits = logits[0] if flat else logits
        return logits if self.ids is None else logits[..., self.ids]


def _batches(data: BranchData, index: list[int], tokens: int, g: torch.Generator) -> list[list[int]]:
    order = [index[i] for i in torch.randperm(len(index), generator=g).tolist()]
    out: list[list[int]] = []
    for i in order:
        if out and sum(data.ids[j].numel() for j in out[-1]) + data.ids[i].numel() <= tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _pad(data: BranchData, rows: list[int]):
    n = max(data.ids[i].numel() for i in rows)
    b, d = len(rows), data.features[rows[0]].shape[1]
    ids = torch.zeros(b, n, dtype=torch.long)
    feats = torch.zeros(b, n, d)
    targets = torch.zeros(b, n, dtype=torch.long)
    valid = torch.zeros(b, n, dtype=torch.bool)
    first = torch.zeros(b, dtype=torch.long)
    for r, i in enumerate(rows):
        m = data.ids[i].numel()
        ids[r, :m], feats[r, :m], targets[r, :m], valid[r, :m] = (
            data.ids[i],
            data.features[i],
            data.targets[i],
            True,
        )
        first[r] = data.first[i]
    return ids, feats, targets, valid, first


def _masks(n: int, j: int, valid: torch.Tensor) -> torch.Tensor:
    """The additive mask of drafting step ``j`` over keys of steps 0..j: query t sees step 0's keys up to
    t - j (the round's start) and step i's key at t - j + i (i = 1..j); padding keys never."""
    t = torch.arange(n)[:, None]
    s = torch.arange(n)[None, :]
    parts = [(s <= t - j)] + [(s == t - j + i) for i in range(1, j + 1)]
    allowed = torch.cat(parts, dim=1)[None, None] & valid.repeat(1, j + 1)[:, None, None, :]
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


def _unroll(layer: BranchLayer, program, ids, feats, valid, steps: int) -> list[torch.Tensor]:
    """The branch unrolled ``steps`` drafting steps over teacher-forced tokens: step j's output at t is
    the draft for t drafted j steps into a round that started at t - j."""
    n = ids.shape[1]
    with torch.no_grad():
        emb, cos, sin = program.embed.graph(ids, torch.arange(n)[None].expand_as(ids))
    emb, cos, sin = emb.float(), cos.float(), sin.float()
    prev = torch.cat([torch.zeros_like(feats[:, :1]), feats[:, :-1]], dim=1)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    for j in range(steps):
        x = layer.fuse(emb, prev)
        q, k, v = layer.qkv(x, cos, sin)
        keys.append(k)
        values.append(v)
        out = layer.finish(x, q, torch.cat(keys, dim=2), torch.cat(values, dim=2), _masks(n, j, valid))
        outs.append(out)
        prev = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
    return outs


def _step_masks(ids, targets, valid, steps: int) -> list[torch.Tensor]:
    """Where step j is scored: step 0 at every real position; step j at ``t`` where a round that started at
    ``t - j`` reaches it, its drafts all right: the tokens at ``t - j + 1 .. t`` are the model's greedy
    choices after the token before each (always so in the model's own text; in other text only where it
    agrees)."""
    agree = torch.zeros_like(valid)
    agree[:, 1:] = ids[:, 1:] == targets[:, :-1]
    masks = [valid]
    chain = valid.clone()
    for j in range(1, steps):
        shifted = torch.zeros_like(agree)
        shifted[:, j - 1 :] = agree[:, : agree.shape[1] - j + 1]  # agree[t - j + 1] at t
        chain = chain & shifted
        chain[:, :j] = False
        masks.append(chain.clone())
    return masks


def chains(layer: BranchLayer, program, data: BranchData, i: int, head: _Head, steps: int) -> list[int]:
    """For every round that starts at a position ``p`` of sequence ``i``'s generated text (``p = first + 1
    .. n - 1``), how many of its first ``steps`` drafts equal the model's greedy tokens: the drafting chain
    run as a round runs it (step j drafts the token after ``p + j``)."""
    layer.eval()
    with torch.no_grad():
        ids, feats, targets, valid, first = _pad(data, [i])
        outs = _unroll(layer, program, ids, feats, valid, steps)
    n = ids.shape[1]
    want = head.column[targets[0]]
    correct = [(head.column[head_argmax(head, o)[0]] == want) & (want >= 0) for o in outs]
    lengths = []
    for p in range(int(first[0]) + 1, n):
        k = 0
        while k < steps and p + k < n and bool(correct[k][p + k]):
            k += 1
        lengths.append(k)
    return lengths


def acceptance(layer: BranchLayer, program, data: BranchData, index: list[int], head: _Head, steps: int):
    """Acceptance per draft position over the sequences ``index``: the share of rounds (one starting at
    every position of the generated text) whose first j drafts are all accepted, j = 1..steps."""
    lengths = [k for i in index for k in chains(layer, program, data, i, head, steps)]
    return [sum(k >= j for k in lengths) / max(len(lengths), 1) for j in range(1, steps + 1)]


def head_argmax(head: _Head, features: torch.Tensor) -> torch.Tensor:
    """The draft token ids of ``features``."""
    cols = head(features).argmax(-1)
    return cols if head.ids is None else head.ids[cols]


def fit_draft_branch(
    program,
    data: BranchData,
    *,
    ffn: int | None = None,
    steps: int = 3,
    vocab_k: int | None = 8192,
    epochs: int = 2,
    lr: float = 3e-3,
    batch_tokens: int = 1024,
    feature_weight: float = 0.1,
    holdout: float = 0.1,
    seed: int = 0,
    bf16: bool | None = None,
    progress: bool = True,
) -> BranchResult:
    """Fit a branch on ``data`` (see the module's docstring); the model stays frozen. The defaults are the
    settings measured in docs/draft-branch.md. ``bf16``: the products in bfloat16 (torch autocast; the
    weights and the optimizer stay float32), None where the CPU has it natively (:func:`native_bf16`).
    Acceptance is measured in float32, as the branch runs."""
    if steps < 1 or epochs < 1:
        raise ValueError(f"steps and epochs must be >= 1, got {steps} and {epochs}")
    info = program.info
    vocab = _draft_vocab(data, info.vocab_size, vocab_k, program.plan.eos_token_ids)
    ids = None if vocab is None else torch.tensor(vocab, dtype=torch.long)
    head = _Head(program, ids)
    train, held = data.split(holdout)
    scale = torch.cat([data.features[i] for i in train]).pow(2).mean().sqrt().item()
    layer = init_branch(program, ffn, seed, scale)
    before = acceptance(layer, program, data, held, head, steps)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=0.0)
    plan = [_batches(data, train, batch_tokens, g) for _ in range(epochs)]
    total = sum(len(p) for p in plan)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / max(1, total // 20)) * max(0.05, 1 - i / total)
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="fit draft branch", unit="batch")
    start = time.perf_counter()
    losses: list[float] = []
    layer.train()
    try:
        for epoch in plan:
            for rows in epoch:
                tokens, feats, targets, valid, _ = _pad(data, rows)
                with _precision(bf16):
                    loss = _loss(
                        layer, program, head, (tokens, feats, targets, valid), steps, scale, feature_weight
                    )
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    after = acceptance(layer, program, data, held, head, steps)
    n_train = sum(data.ids[i].numel() for i in train)
    n_held = sum(data.ids[i].numel() for i in held)
    return BranchResult(layer, vocab, before, after, n_train, n_held, steps, seconds, losses, data.source)


def _loss(layer: BranchLayer, program, head: _Head, batch, steps: int, scale: float, feature_weight: float):
    """A batch's loss: at each unrolled step, the cross-entropy of the model's own distribution over the
    draft ids under the branch's, where the step is scored, plus ``feature_weight`` times the smooth L1 of
    the predicted feature against the true one (in units of the features' RMS ``scale``)."""
    tokens, feats, targets, valid = batch
    outs = _unroll(layer, program, tokens, feats, valid, steps)
    cols = head.column[targets]
    loss = torch.zeros(())
    with torch.no_grad():  # the model's own distribution over the draft ids, at each position
        teacher = torch.softmax(head(feats).float(), dim=-1)
    for out, where in zip(outs, _step_masks(tokens, targets, valid, steps), strict=True):
        scored = where & (cols >= 0)
        if bool(scored.any()):
            logp = torch.log_softmax(head(out[scored]).float(), dim=-1)
            loss = loss - (teacher[scored] * logp).sum(-1).mean()
        if feature_weight and bool(where.any()):
            diff = (out[where].float() - feats[where]) / scale
            loss = loss + feature_weight * torch.nn.functional.smooth_l1_loss(diff, diff * 0)
    return loss


def _draft_vocab(data: BranchData, vocab_size: int, k: int | None, eos: tuple[int, ...]) -> list[int] | None:
    """The ``k`` ids the model emits most in ``data`` (its greedy next tokens), with the stop tokens; None
    for the whole vocabulary."""
    if k is None or k >= vocab_size:
        return None
    if k < 1:
        raise ValueError(f"vocab_k must be >= 1, got {k}")
    counts = torch.bincount(torch.cat(data.targets), minlength=vocab_size)
    ranked = torch.argsort(counts, descending=True, stable=True).tolist()
    chosen = list(dict.fromkeys([*[int(t) for t in eos], *ranked]))[:k]
    return sorted(chosen)


def save_draft_branch(program, result: BranchResult, path: str | os.PathLike) -> Path:
    """Write ``result``'s branch to ``path`` (safetensors, with the metadata ``DraftBranch`` checks)."""
    from safetensors.torch import save_file

    info = program.info
    layer = result.layer
    meta: dict[str, Any] = {
        "kind": BRANCH_KIND,
        "architecture": info.architecture,
        "hidden_size": info.hidden_size,
        "num_heads": info.num_heads,
        "num_kv_heads": info.num_kv_heads,
        "head_dim": info.head_dim,
        "vocab_size": info.vocab_size,
        "ffn": layer.gate.out_features,
        "eps": layer.eps,
        "steps": result.steps,
        "tokens": result.tokens,
        "source": result.source,
        "acceptance": [round(a, 4) for a in result.after],
    }
    if result.vocab is not None:
        meta["vocab"] = result.vocab
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().float().contiguous() for k, v in layer.state_dict().items()}
    save_file(state, str(tmp), metadata={"effx": json.dumps(meta)})
    tmp.replace(path)
    return path


def train_draft_branch(
    program,
    prompts,
    tokenizer,
    *,
    max_tokens: int = 16384,
    new_tokens: int = 128,
    texts=None,
    text_tokens: int = 0,
    path: str | os.PathLike | None = None,
    bf16: bool | None = None,
    progress: bool = True,
    **fit: Any,
) -> BranchResult:
    """Generate ``max_tokens`` tokens of the model's own text from ``prompts`` (``new_tokens`` each), add
    ``text_tokens`` tokens of ``texts`` read teacher-forced (in 256-token chunks; EAGLE trains on fixed text,
    and such text costs no generation), read them all once and fit a branch (``fit``:
    :func:`fit_draft_branch`'s settings); with ``path``, write it there. Acceptance is held out on the
    generations. ``bf16``: read and fit in bfloat16 (None: where the CPU has it natively)."""
    if max_tokens < 1 or new_tokens < 1 or text_tokens < 0:
        raise ValueError(
            f"max_tokens and new_tokens must be >= 1 and text_tokens >= 0, got {max_tokens}, {new_tokens} "
            f"and {text_tokens}"
        )
    if text_tokens and not texts:
        raise ValueError("text_tokens needs texts to read")
    start = time.perf_counter()
    sequences = own_generations(
        program, tokenizer, prompts, max_new_tokens=new_tokens, max_tokens=max_tokens, batch_size=16,
        bf16=native_bf16() if bf16 is None else bf16, progress=progress,
    )  # fmt: skip
    source = f"own generations ({new_tokens} new tokens per prompt)"
    if text_tokens:
        sequences = text_sequences(tokenizer, texts, 256, text_tokens) + sequences
        source += f" and {text_tokens} tokens of text"
    data = collect_branch_data(program, sequences, bf16=bf16, progress=progress, source=source)
    collect = time.perf_counter() - start
    result = fit_draft_branch(program, data, bf16=bf16, progress=progress, **fit)
    result.collect_seconds = collect
    if path is not None:
        save_draft_branch(program, result, path)
    return result
