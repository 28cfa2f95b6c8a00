"""Cheap trained exit heads (EE-Tuning style): small adapters before the shared norm + LM head.

A stock model was not trained to predict from its middle layers, so an exit that reuses the final norm and
head directly is a poor predictor. Exit heads keep the backbone frozen and train, per exit layer ``e``, a
residual adapter ``h -> h + up(down(h))`` of rank ``r`` (``up`` starts at zero, so training starts from the
shared head; ``r`` up to the hidden size, where it is a full linear map) to predict what the final layer
predicts. Training has two phases:

1. **collect** (:func:`collect_exit_states`): the backbone runs once, teacher-forced, over many tokens and
   keeps, position by position, the hidden state after each exit layer and the final layer's top-k
   next-token log-probabilities (:class:`ExitStates`). The tokens are the model's own greedy generations on
   a varied prompt set (:func:`own_generations`, :func:`effx.data.training_prompts`: the text a drafting
   exit sees when it decodes) or offline text (:func:`text_sequences`).
2. **fit** (:func:`fit_exit_heads`): the adapters are fitted on the cached states, with the head's own
   weights frozen: cross-entropy against the final layer's top-k distribution (``loss="kl"``, KL up to the
   teacher's entropy) or against its greedy token (``loss="greedy"``). With ``vocab=`` (a ranking file from
   :func:`effx.calibrate_vocab`) and ``vocab_k=``, the exit scores only those ``k`` ids, as a drafting exit
   reduced by ``VocabReduce(where="draft")`` does: training is about ``V/k`` times cheaper and sees the
   head it will run with.

The result reports, per layer and on held-out sequences, the exit's agreement with the final layer's greedy
token before (the shared head) and after training: the acceptance rate of a one-token draft from that exit.
:func:`train_exit_heads` does both phases; the adapters are saved as safetensors with JSON metadata and
loaded by ``EarlyExit(head="trained", heads=path)``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import encode_prompts, token_chunks
from .errors import ArtifactError
from .formats import EXIT_HEADS_KIND, load_exit_heads
from .passes.vocab_reduce import static_subset_graph
from .program import torch_dtype
from .runtime.forward import KVCache, MaskCache, run_layers
from .runtime.vocab import head_logits
from .vocab import load_vocab, subset_ids

__all__ = [
    "LOSSES",
    "ExitStates",
    "backbone_states",
    "collect_exit_states",
    "exit_agreement",
    "fit_exit_heads",
    "load_exit_heads",
    "own_generations",
    "save_exit_heads",
    "text_sequences",
    "train_exit_heads",
]

LOSSES = ("kl", "greedy")
STATES_KIND = "effx-exit-states"


def own_generations(
    program,
    tokenizer,
    prompts,
    *,
    max_new_tokens: int = 128,
    max_tokens: int | None = None,
    batch_size: int = 8,
    bf16: bool = False,
    progress: bool = True,
) -> list[tuple[torch.Tensor, int, int]]:
    """The program's own greedy continuations of ``prompts`` (chat-formatted where the tokenizer has a
    template), ``batch_size`` at a time, until ``max_tokens`` new tokens (if given) are generated. Within
    each window of ``8 * batch_size`` prompts, batches are formed by prompt length (left padding costs a
    prefill); the sequences come back in the prompts' order. ``bf16``: generate under bfloat16 autocast
    (1.4x on Zen 4, where it is native; the text is then the model's own in bfloat16, which can part from
    float32's after a near-tie).

    Returns sequences ``(ids, first, last)``: the prompt and its continuation (cut after the first stop
    token), and the positions ``first..last-1`` that generated the continuation."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("own_generations needs at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stop = set(program.plan.eos_token_ids) | {program.plan.pad_token_id}
    done: dict[int, tuple[torch.Tensor, int, int]] = {}
    total = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens, desc="generate own text", unit="tok")
    try:
        order = [  # prompt indices: each window of 8 batches by length (left padding costs a prefill)
            i
            for w in range(0, len(prompts), 8 * batch_size)
            for i in sorted(range(w, min(w + 8 * batch_size, len(prompts))), key=lambda i: len(prompts[i]))
        ]
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            ids, mask = encode_prompts(tokenizer, [prompts[i] for i in batch])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                gen = program.generate(
                    ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False
                )
            for row, i in enumerate(batch):
                prompt = ids[row][mask[row].bool()]
                new = gen[row, ids.shape[1] :].tolist()
                cut = next((j + 1 for j, t in enumerate(new) if t in stop), len(new))
                seq = torch.cat([prompt, torch.tensor(new[:cut], dtype=prompt.dtype)])
                done[i] = (seq, prompt.numel() - 1, seq.numel() - 1)
                total += cut
                if bar is not None:
                    bar.update(cut)
            if max_tokens is not None and total >= max_tokens:
                break
    finally:
        if bar is not None:
            bar.close()
    return [done[i] for i in sorted(done)]  # in the prompts' order


def text_sequences(tokenizer, texts, seq_len: int = 128, max_tokens: int = 4096):
    """``texts`` as sequences for :func:`collect_exit_states`: chunks of ``seq_len`` tokens (at most
    ``max_tokens`` in all), every position kept."""
    return [(chunk[0], 0, chunk.shape[1]) for chunk in token_chunks(tokenizer, texts, seq_len, max_tokens)]


def backbone_states(program, ids: torch.Tensor, layers):
    """``ids [b, n]`` teacher-forced through ``program``'s layers: ``(embedded, {layer: hidden}, last)``, the
    embedding output, the hidden state after each of ``layers`` and after the last layer, each ``[b, n, d]``.
    Rows may be right-padded: a position sees only the positions before it."""

    batch, length = ids.shape
    cache = KVCache.for_program(program, batch, length)
    hidden, cos, sin = program.embed.graph(ids, torch.arange(length)[None].expand(batch, -1))
    masks = MaskCache(program, torch.ones_like(ids, dtype=torch.bool), hidden.dtype)
    embedded = hidden
    taken = {}
    for stage in program.layers:
        hidden = run_layers(program, cache, (stage,), hidden, cos, sin, masks)
        if stage.layer in layers:
            taken[stage.layer] = hidden
    return embedded, taken, hidden


@dataclass
class ExitStates:
    """Per position: the hidden state after each exit layer and the final layer's top-k next tokens."""

    hidden: dict[int, torch.Tensor]  # layer -> [N, d] float32
    top_ids: torch.Tensor  # [N, k] the final layer's top-k ids, its greedy token first
    top_logprobs: torch.Tensor  # [N, k] their log-probabilities
    group: torch.Tensor  # [N] the sequence each position came from
    source: str = ""

    @property
    def tokens(self) -> int:
        return int(self.top_ids.shape[0])

    @property
    def layers(self) -> list[int]:
        return sorted(self.hidden)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the states to ``path`` (safetensors), to fit again later without running the model."""
        from safetensors.torch import save_file

        tensors = {f"hidden.{e}": h.contiguous() for e, h in self.hidden.items()}
        tensors.update(top_ids=self.top_ids, top_logprobs=self.top_logprobs, group=self.group)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            tensors, str(tmp), metadata={"effx": json.dumps({"kind": STATES_KIND, "source": self.source})}
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExitStates:
        """States written by :meth:`save`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("effx", "{}"))
            tensors = load_file(str(path))
        except (SafetensorError, ValueError, OSError) as e:
            raise ArtifactError(f"{path} is not a readable exit-states file: {e}") from e
        if meta.get("kind") != STATES_KIND:
            raise ArtifactError(f"{path} was not written by ExitStates.save")
        hidden = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("hidden.")}
        return cls(
            hidden, tensors["top_ids"], tensors["top_logprobs"], tensors["group"], meta.get("source", "")
        )

    def split(self, holdout: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Position indices ``(train, held_out)``: the last ``holdout`` share of the sequences is held out
        (whole sequences, so no held-out position shares text with a training one). With one sequence or
        ``holdout=0`` both are every position."""
        groups = int(self.group.max()) + 1 if self.tokens else 0
        every = torch.arange(self.tokens)
        if holdout <= 0 or groups < 2:
            return every, every
        cut = groups - max(1, round(groups * holdout))
        return every[self.group < cut], every[self.group >= cut]


def _check_layers(info, layers) -> None:
    if any(not 0 <= x < info.num_layers - 1 for x in layers):
        raise ValueError(f"exit layers must be in 0..{info.num_layers - 2}, got {layers}")


def collect_exit_states(
    program, sequences, layers, *, top_k: int = 32, progress: bool = True, source: str = ""
) -> ExitStates:
    """Run ``program``'s backbone teacher-forced over ``sequences`` (``(ids, first, last)`` from
    :func:`own_generations` or :func:`text_sequences`) and keep positions ``first..last-1`` of each."""

    layers = sorted(layers)
    info = program.info
    if not layers:
        raise ValueError("collect_exit_states needs at least one layer")
    _check_layers(info, layers)
    top_k = min(top_k, info.vocab_size)
    hidden: dict[int, list[torch.Tensor]] = {e: [] for e in layers}
    ids_parts, lp_parts, groups = [], [], []
    seqs = list(sequences)
    if progress:
        from tqdm.auto import tqdm

        seqs = tqdm(seqs, desc="collect exit states", unit="seq")
    with torch.inference_mode():
        for g, (ids, first, last) in enumerate(seqs):
            if last <= first:
                continue
            _, taken, h = backbone_states(program, ids[None], hidden)
            for e, states in taken.items():
                hidden[e].append(states[0, first:last].float().clone())
            logprobs = head_logits(program, h[:, first:last]).float().log_softmax(-1)[0]
            values, top = logprobs.topk(top_k, dim=-1)
            ids_parts.append(top)
            lp_parts.append(values)
            groups.append(torch.full((last - first,), g, dtype=torch.int64))
    if not groups:
        raise ValueError("collect_exit_states found no positions to keep in the sequences")
    return ExitStates(
        {e: torch.cat(v) for e, v in hidden.items()},
        torch.cat(ids_parts),
        torch.cat(lp_parts),
        torch.cat(groups),
        source,
    )


def _draft_ids(program, vocab, vocab_k):
    """The ids an exit is trained to score: None for the whole vocabulary, else the static subset
    ``VocabReduce(where="draft", vocab=vocab, k=vocab_k)`` would give its drafting exit."""
    if not vocab:
        if vocab_k is not None:
            raise ValueError("vocab_k needs vocab=<ranking file> (write one with effx.calibrate_vocab)")
        return None

    if vocab_k is None:
        raise ValueError("vocab=<file> needs vocab_k: how many of its top-ranked ids the exit scores")
    return subset_ids(load_vocab(vocab, program.info.vocab_size), vocab_k, program.plan.eos_token_ids)


def _check_fit(program, *, rank, loss, epochs, batch_size, vocab, vocab_k):
    """Every fitting argument checked (before any minutes of generating or collecting); returns the draft
    ids (:func:`_draft_ids`)."""
    d = program.info.hidden_size
    if not 1 <= rank <= d:
        raise ValueError(f"rank must be in 1..{d} (the hidden size), got {rank}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if epochs < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    return _draft_ids(program, vocab, vocab_k)


def _adapt(x, down, up):
    """An exit adapter: ``x + up(down(x))``."""
    return x + (x @ down.T) @ up.T


class _Scorer:
    """The exit's head (the program's, or its static draft subset) on cached states, with the loss and the
    agreement :func:`fit_exit_heads` and :func:`exit_agreement` report."""

    def __init__(self, program, states: ExitStates, loss: str, ids):
        self.head = program.head.graph
        if ids is not None:
            self.head = static_subset_graph(self.head, ids, program.info, "exit-heads")
        self.frozen = {
            n: t.detach() for n, t in list(self.head.named_parameters()) + list(self.head.named_buffers())
        }
        self.states, self.loss = states, loss
        # adapters train in float32; the head runs in the model's dtype
        self.dtype = torch_dtype(program.info)
        self.greedy = states.top_ids[:, 0]
        self.teacher = states.top_logprobs.softmax(-1)

    def logprobs(self, hidden):
        logits = torch.func.functional_call(self.head, self.frozen, (hidden[None].to(self.dtype),))[0][0]
        return logits.float().log_softmax(-1)

    def objective(self, logprobs, rows):
        # positions whose targets the (reduced) head cannot score drop out of the loss
        if self.loss == "greedy":
            target = logprobs.gather(1, self.greedy[rows][:, None])[:, 0]
            ok = torch.isfinite(target)
            return -(target[ok].sum()) / max(1, int(ok.sum()))
        picked = logprobs.gather(1, self.states.top_ids[rows])
        ok = torch.isfinite(picked)
        weights = torch.where(ok, self.teacher[rows], 0.0)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
        return -(weights * torch.where(ok, picked, 0.0)).sum() / len(rows)

    def evaluate(self, hidden, rows, adapt=None) -> tuple[float, float]:
        """``(agreement, mean loss)`` over ``rows`` of ``hidden [N, d]``, adapted by ``adapt`` if given."""
        hits, total = 0, 0.0
        with torch.no_grad():
            for i in range(0, len(rows), 1024):
                part = rows[i : i + 1024]
                h = hidden[part] if adapt is None else adapt(hidden[part])
                logprobs = self.logprobs(h)
                hits += int((logprobs.argmax(-1) == self.greedy[part]).sum())
                total += float(self.objective(logprobs, part)) * len(part)
        return hits / len(rows), total / len(rows)


def exit_agreement(
    program,
    states: ExitStates,
    heads: str | os.PathLike | None = None,
    *,
    vocab: str | os.PathLike | None = None,
    vocab_k: int | None = None,
    holdout: float = 0.1,
) -> dict[int, float]:
    """Per layer of ``states``: how often the exit's greedy token equals the final layer's on the held-out
    positions (the acceptance rate of a one-token draft), with the shared head or with the adapters of a
    ``heads`` file (layers it lacks are left out), scoring the full vocabulary or ``vocab``/``vocab_k``."""
    scorer = _Scorer(program, states, "kl", _draft_ids(program, vocab, vocab_k))
    adapters = load_exit_heads(heads, program.info) if heads is not None else None
    _, test = states.split(holdout)
    out = {}
    for e in states.layers:
        if adapters is None:
            out[e] = scorer.evaluate(states.hidden[e], test)[0]
        elif e in adapters:
            down, up = adapters[e]["down"].float(), adapters[e]["up"].float()
            out[e] = scorer.evaluate(states.hidden[e], test, lambda x, d=down, u=up: _adapt(x, d, u))[0]
    return out


def fit_exit_heads(
    program,
    states: ExitStates,
    *,
    layers: list[int] | None = None,
    rank: int = 64,
    loss: str = "kl",
    vocab: str | os.PathLike | None = None,
    vocab_k: int | None = None,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int | None = None,
    holdout: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Fit one adapter per layer of ``layers`` (default: every layer of ``states``) on cached states.

    Adam with a one-cycle schedule peaking at ``lr``, ``epochs`` passes over the training positions in
    shuffled minibatches of ``batch_size`` (default: a hundredth of the training positions, within 32..256,
    so that a few thousand tokens still take enough steps). Returns ``{"layers", "rank", "batch_size",
    "loss", "vocab_k", "tokens", "heldout", "agreement_before", "agreement_after", "loss_before", "loss_after", "seconds", "state"}``:
    agreement with the final layer's greedy token and mean loss per layer on the held-out positions, with the
    shared head (before) and with the adapter (after); ``seconds`` per layer of fitting."""
    info = program.info
    d = info.hidden_size
    layers = _fit_layers(states, layers)
    ids = _check_fit(
        program, rank=rank, loss=loss, epochs=epochs, batch_size=batch_size, vocab=vocab, vocab_k=vocab_k
    )
    scorer = _Scorer(program, states, loss, ids)
    train, test = states.split(holdout)
    if batch_size is None:
        batch_size = max(32, min(256, len(train) // 100))

    g = torch.Generator().manual_seed(seed)
    per_epoch = max(1, math.ceil(len(train) / batch_size))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(layers) * epochs * per_epoch, desc="fit exit heads", unit="batch")
    state: dict[str, torch.Tensor] = {}
    before: dict[int, float] = {}
    after: dict[int, float] = {}
    loss_before: dict[int, float] = {}
    loss_after: dict[int, float] = {}
    seconds: dict[int, float] = {}
    try:
        for e in layers:
            start = time.perf_counter()
            h = states.hidden[e]
            before[e], loss_before[e] = scorer.evaluate(h, test)
            down, up = _train_adapter(
                scorer, h, train, g, bar, d=d, rank=rank, lr=lr, epochs=epochs, batch_size=batch_size
            )
            after[e], loss_after[e] = scorer.evaluate(h, test, functools.partial(_adapt, down=down, up=up))
            state[f"exit.{e}.down"] = down.detach().clone().contiguous()
            state[f"exit.{e}.up"] = up.detach().clone().contiguous()
            seconds[e] = time.perf_counter() - start
    finally:
        if bar is not None:
            bar.close()
    return {
        "layers": layers,
        "rank": rank,
        "batch_size": batch_size,
        "loss": loss,
        "vocab_k": vocab_k if vocab else None,
        "tokens": len(train),
        "heldout": len(test),
        "agreement_before": before,
        "agreement_after": after,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "seconds": seconds,
        "state": state,
    }


def _fit_layers(states: ExitStates, layers: list[int] | None) -> list[int]:
    """The layers to fit, sorted: ``layers`` (ValueError naming those the states lack), else all of them."""
    layers = sorted(layers if layers is not None else states.layers)
    missing = [x for x in layers if x not in states.hidden]
    if missing:
        raise ValueError(f"the states hold layers {states.layers}, not {missing}")
    return layers


def _train_adapter(scorer, h, train, g, bar, *, d: int, rank: int, lr: float, epochs: int, batch_size: int):
    """One layer's adapter ``(down, up)`` trained on the states ``h`` at the positions ``train``: ``down``
    random (from ``g``) and ``up`` zero, so training starts from the shared head; Adam with a one-cycle
    schedule peaking at ``lr``, ``epochs`` passes in shuffled minibatches of ``batch_size`` (``bar``, if
    any, counts them); ``d``: the model's hidden size."""
    per_epoch = max(1, math.ceil(len(train) / batch_size))
    down = torch.nn.Parameter(torch.randn(rank, d, generator=g) / d**0.5)
    up = torch.nn.Parameter(torch.zeros(d, rank))
    optim = torch.optim.Adam([down, up], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, lr, total_steps=epochs * per_epoch)
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            optim.zero_grad()
            scorer.objective(scorer.logprobs(_adapt(h[rows], down, up)), rows).backward()
            optim.step()
            sched.step()
            if bar is not None:
                bar.update()
    return down, up


def save_exit_heads(program, result: dict, path: str | os.PathLike, *, source: str = "") -> Path:
    """Write the adapters of a :func:`fit_exit_heads` result to ``path`` (safetensors, with the metadata
    ``EarlyExit(head="trained")`` checks against the model)."""
    from safetensors.torch import save_file

    info = program.info
    meta = {
        "kind": EXIT_HEADS_KIND,
        "architecture": info.architecture,
        "hidden_size": info.hidden_size,
        "num_layers": info.num_layers,
        "vocab_size": info.vocab_size,
        "layers": result["layers"],
        "rank": result["rank"],
        "tokens": result["tokens"],
        "loss": result["loss"],
        "vocab_k": result["vocab_k"],
        "source": source,
        "agreement": {str(e): round(a, 4) for e, a in result["agreement_after"].items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(result["state"], str(tmp), metadata={"effx": json.dumps(meta)})
    tmp.replace(path)
    return path


def train_exit_heads(
    program,
    texts,
    tokenizer,
    *,
    layers: list[int] | None = None,
    rank: int = 64,
    generate: int = 0,
    seq_len: int = 128,
    max_tokens: int = 4096,
    loss: str = "kl",
    top_k: int = 32,
    vocab: str | os.PathLike | None = None,
    vocab_k: int | None = None,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int | None = None,
    holdout: float = 0.1,
    path: str | os.PathLike | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Train one adapter per exit layer (``layers``, default: the program's exits) with the backbone frozen.

    With ``generate=n`` the ``texts`` are prompts (:func:`effx.data.training_prompts` is a varied set) and the
    training tokens are the program's own greedy continuations of them, ``n`` new tokens each, until
    ``max_tokens`` are generated; otherwise the ``texts`` are read teacher-forced in chunks of ``seq_len``
    tokens, ``max_tokens`` in all. The other arguments are :func:`fit_exit_heads`'s.

    Returns :func:`fit_exit_heads`'s result plus ``"source"`` and ``"collect_seconds"`` (generating and
    collecting) and, with ``path``, writes the adapters there.
    """
    layers = sorted(layers if layers is not None else program.exits)
    if not layers:
        raise ValueError("no exit layers: pass layers=[...] or apply EarlyExit first")
    # every argument checked before the minutes of generating and collecting
    _check_layers(program.info, layers)
    _check_fit(
        program, rank=rank, loss=loss, epochs=epochs, batch_size=batch_size, vocab=vocab, vocab_k=vocab_k
    )
    start = time.perf_counter()
    if generate:
        sequences = own_generations(
            program, tokenizer, texts, max_new_tokens=generate, max_tokens=max_tokens, progress=progress
        )
        source = f"own generations ({generate} new tokens per prompt)"
    else:
        sequences = text_sequences(tokenizer, texts, seq_len, max_tokens)
        source = "text"
    states = collect_exit_states(program, sequences, layers, top_k=top_k, progress=progress, source=source)
    collect_seconds = time.perf_counter() - start
    result = fit_exit_heads(
        program,
        states,
        rank=rank,
        loss=loss,
        vocab=vocab,
        vocab_k=vocab_k,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        holdout=holdout,
        seed=seed,
        progress=progress,
    )
    result.update(source=source, collect_seconds=collect_seconds)
    if path is not None:
        save_exit_heads(program, result, path, source=source)
    return result
