"""The decode loop of recurrent (Mamba) programs: dense, early exits with deferred state, self-speculative
with state rollback. Written against the array API over ``run(name, *arrays) -> tuple`` like
:mod:`effx.runtime.seq2seq`; stage names ``embed``, ``layer.i``, ``head`` and ``exit`` (see
:func:`effx.capture.capture_mamba` and :mod:`effx.recurrent`).

The cache is each layer's conv state ``[batch, I, K-1]`` and SSM state ``[batch, I, N]``. A layer stage
returns its convolution's input and the SSM state after every token of the run, so the loop can keep the
state after any prefix of a run.

* **Lossy exits with deferred state.** A token that exits after layer ``e`` waits, with its hidden state
  after layer ``e``, until the next token that goes deeper reaches layer ``e + 1``; from there the two run
  as one block, oldest first, so that every layer's state takes every token in order (CALM's state
  propagation, done later instead of approximated). Waiting tokens are always deeper the older they are: a
  newer token that passes a waiting one's depth takes it along. After all tokens are flushed, every
  layer's state is the one a dense run over the same tokens gives.
* **Self-speculative.** The shallowest exit drafts up to ``draft`` tokens (stopping after the first whose
  confidence is below its threshold); the deeper layers verify them in one block and keep the longest
  agreeing prefix plus the full model's own next token. The states roll back to the last token kept: the
  shallow layers' from the draft step that ran it, the deep layers' from the block's per-token states.
  The output is the dense greedy output.

Exit modes decode each row on its own (a row's tokens exit at their own layers), without its padding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..arrays import Array, Namespace
from .stats import DecodeStats

__all__ = ["CHUNK", "States", "decode_row", "generate_dense", "prefill"]

Run = Callable[..., tuple[Array, ...]]
# a token waiting for the next one that goes deeper: (depth, hidden [1, m, d])
Waiting = list[tuple[int, Array]]

# prompt tokens per layer call: a layer holds [batch, run, I, N] tensors (decays, updates, states)
CHUNK = 256


class States:
    """Per layer: the conv state and the SSM state (lists, replaced, never written in place)."""

    def __init__(self, conv: list[Array], ssm: list[Array]) -> None:
        self.conv, self.ssm = conv, ssm

    @classmethod
    def zeros(
        cls, xp: Namespace, batch: int, layers: int, width: int, kernel: int, state: int, dtype: Any
    ) -> States:
        return cls(
            [xp.zeros((batch, width, kernel - 1), dtype=dtype) for _ in range(layers)],
            [xp.zeros((batch, width, state), dtype=dtype) for _ in range(layers)],
        )

    def copy(self) -> States:
        return States(list(self.conv), list(self.ssm))


def run_layer(
    run: Run, states: States, i: int, hidden: Array, valid: Array, keep: int | None = None
) -> tuple[Array, tuple[Array, Array]]:
    """Layer ``i`` over ``hidden [batch, s, d]``; its state becomes that after token ``keep`` of the run (the
    last by default). Returns the hidden states and the per-token ``(conv_in, states)``."""
    hidden, conv_in, ssm_all = run(f"layer.{i}", hidden, valid, states.conv[i], states.ssm[i])
    t = hidden.shape[1] - 1 if keep is None else keep
    kernel_minus_1 = states.conv[i].shape[2]
    states.conv[i] = conv_in[:, :, t + 1 : t + 1 + kernel_minus_1]
    states.ssm[i] = ssm_all[:, t]
    return hidden, (conv_in, ssm_all)


def keep_prefix(states: States, i: int, per_token: tuple[Array, Array], t: int) -> None:
    """Layer ``i``'s state after token ``t`` of a run whose ``per_token`` outputs were kept."""
    conv_in, ssm_all = per_token
    k = states.conv[i].shape[2]
    states.conv[i] = conv_in[:, :, t + 1 : t + 1 + k]
    states.ssm[i] = ssm_all[:, t]


def prefill(
    run: Run, xp: Namespace, states: States, input_ids: Array, valid: Array, num_layers: int, dtype: Any
) -> Array:
    """Every layer over ``input_ids`` in chunks of :data:`CHUNK`; returns the last token's hidden state
    ``[batch, 1, d]`` after the last layer."""
    n = input_ids.shape[1]
    hidden: Array = None
    for start in range(0, n, CHUNK):
        ids = input_ids[:, start : start + CHUNK]
        v = xp.astype(valid[:, start : start + CHUNK], dtype)
        hidden = run("embed", ids)[0]
        for i in range(num_layers):
            hidden = run_layer(run, states, i, hidden, v)[0]
    return hidden[:, -1:]


def generate_dense(
    run: Run,
    xp: Namespace,
    states: States,
    input_ids: Array,
    valid: Array,
    *,
    num_layers: int,
    max_new: int,
    eos: list[int],
    pad: int,
    dtype: Any,
) -> Array:
    """Greedy decoding of a (left-padded) batch through every layer: the new tokens ``[batch, new]``."""
    batch = input_ids.shape[0]
    hidden = prefill(run, xp, states, input_ids, valid, num_layers, dtype)
    done = xp.zeros((batch,), dtype=xp.bool)
    stop = xp.asarray(list(eos) or [-1], dtype=xp.int64)
    ones = xp.ones((batch, 1), dtype=dtype)
    out: list[Array] = []
    while True:
        token = xp.astype(xp.argmax(run("head", hidden)[0][:, -1], axis=-1), xp.int64)
        token = xp.where(done, xp.asarray(pad, dtype=xp.int64), token)
        done = done | xp.isin(token, stop)
        out.append(token[:, None])
        if len(out) == max_new or bool(xp.all(done)):
            return xp.concat(out, axis=1)
        hidden = run("embed", token[:, None])[0]
        for i in range(num_layers):
            hidden = run_layer(run, states, i, hidden, ones)[0]


def decode_row(
    run: Run,
    xp: Namespace,
    states: States,
    first: int,
    *,
    num_layers: int,
    exits: dict[int, float],
    mode: str,
    draft: int,
    max_new: int,
    eos: list[int],
    dtype: Any,
    stats: DecodeStats,
) -> list[int]:
    """The new tokens of one row after its prefill gave ``first`` (a round may emit past a stop token: the
    caller cuts them; all but the last are in the states): ``mode`` ``"lossy"`` or
    ``"self-speculative"`` over the exits ``{layer: threshold}``. ``stats`` accumulates ``exits`` (tokens per
    exit layer, ``num_layers - 1`` for the last), and for self-speculative ``drafted``/``accepted``/``rounds``.
    In lossy mode the waiting tokens are flushed at the end, so the states are complete."""
    tokens = [first]
    if mode == "lossy":
        waiting: Waiting = []  # (depth, hidden [1, m, d]), oldest (deepest) first
        while len(tokens) < max_new and tokens[-1] not in eos:
            token, depth, hidden = _lossy_step(run, xp, states, tokens[-1], waiting, num_layers, exits, dtype)
            stats.count_exit_layer(depth - 1)
            if depth < num_layers:
                if waiting and waiting[-1][0] == depth:
                    hidden = xp.concat([waiting.pop()[1], hidden], axis=1)
                waiting.append((depth, hidden))
            tokens.append(token)
        flush(run, xp, states, waiting, num_layers, dtype)
        return tokens
    shallow = min(exits)
    threshold = exits[shallow]
    while len(tokens) < max_new and not any(t in eos for t in tokens):
        tokens += _speculate(
            run,
            xp,
            states,
            tokens[-1],
            shallow,
            threshold,
            min(draft, max_new - len(tokens)),
            num_layers,
            dtype,
            stats,
        )
    return tokens


def _ids(xp: Namespace, token: int) -> Array:
    return xp.asarray([[token]], dtype=xp.int64)


def _advance(
    run: Run,
    xp: Namespace,
    states: States,
    hidden: Array,
    start: int,
    waiting: Waiting,
    num_layers: int,
    exits: dict[int, float],
    dtype: Any,
) -> tuple[Array, int, Array | None]:
    """Run ``hidden`` from layer ``start``, taking waiting tokens along as it reaches their depth, until an
    exit whose confidence (for the newest token) passes its threshold or the last layer. Returns
    ``(hidden, depth, logits)``: ``depth`` the layers run (``num_layers`` when it reached the end; logits
    None then)."""
    for i in range(start, num_layers):
        if waiting and waiting[-1][0] == i:
            hidden = xp.concat([waiting.pop()[1], hidden], axis=1)
        hidden = run_layer(run, states, i, hidden, xp.ones(hidden.shape[:2], dtype=dtype))[0]
        if i in exits:
            logits, confidence = run("exit", hidden[:, -1:])
            if float(confidence[0, -1]) >= exits[i]:
                return hidden, i + 1, logits
    return hidden, num_layers, None


def _lossy_step(
    run: Run,
    xp: Namespace,
    states: States,
    token: int,
    waiting: Waiting,
    num_layers: int,
    exits: dict[int, float],
    dtype: Any,
) -> tuple[int, int, Array]:
    hidden = run("embed", _ids(xp, token))[0]
    hidden, depth, logits = _advance(run, xp, states, hidden, 0, waiting, num_layers, exits, dtype)
    if logits is None:
        logits = run("head", hidden[:, -1:])[0]
    return int(xp.argmax(logits[0, -1])), depth, hidden


def flush(run: Run, xp: Namespace, states: States, waiting: Waiting, num_layers: int, dtype: Any) -> None:
    """Run the waiting tokens through the layers they skipped (oldest last to be taken along)."""
    while waiting:
        depth, hidden = waiting.pop()
        _advance(run, xp, states, hidden, depth, waiting, num_layers, {}, dtype)


def _speculate(
    run: Run,
    xp: Namespace,
    states: States,
    token: int,
    shallow: int,
    threshold: float,
    k: int,
    num_layers: int,
    dtype: Any,
    stats: DecodeStats,
) -> list[int]:
    """One draft-and-verify round from ``token`` (fed, not yet run); returns the tokens it emits."""
    before = states.copy()
    drafts: list[int] = []
    hiddens: list[Array] = []
    shallow_states: list[States] = []
    one = xp.ones((1, 1), dtype=dtype)
    current = token
    for _ in range(k):
        hidden = run("embed", _ids(xp, current))[0]
        for i in range(shallow + 1):
            hidden = run_layer(run, states, i, hidden, one)[0]
        logits, confidence = run("exit", hidden)
        current = int(xp.argmax(logits[0, -1]))
        drafts.append(current)
        hiddens.append(hidden)
        shallow_states.append(states.copy())
        if float(confidence[0, -1]) < threshold:
            break
    m = len(drafts)
    block = xp.concat(hiddens, axis=1)
    per_layer: dict[int, tuple[Array, Array]] = {}
    ones = xp.ones((1, m), dtype=dtype)
    for i in range(shallow + 1, num_layers):
        states.conv[i], states.ssm[i] = before.conv[i], before.ssm[i]
        block, per_layer[i] = run_layer(run, states, i, block, ones)
    full = xp.argmax(run("head", block)[0][0], axis=-1)
    accepted = 0
    while accepted < m and drafts[accepted] == int(full[accepted]):
        accepted += 1
    emitted = drafts[:accepted] + ([int(full[accepted])] if accepted < m else [])
    kept = min(accepted + 1, m)  # tokens run that stay in the state: ``token`` and the accepted drafts
    for i in range(shallow + 1):
        states.conv[i], states.ssm[i] = shallow_states[kept - 1].conv[i], shallow_states[kept - 1].ssm[i]
    for i in range(shallow + 1, num_layers):
        keep_prefix(states, i, per_layer[i], kept - 1)
    stats.count(drafted=m, accepted=accepted, rounds=1)
    return emitted
