"""Decoding with exit stages: lossy early exit with deferred KV, and self-speculative decoding.

Lossy early exit (FREE's synchronized parallel decoding). A decode step runs layers until every row of the
batch has passed an exit's threshold (each row takes the token of the first exit it passed; the batch stops
at the deepest such exit). The layers a token skipped have no keys and values for it yet: its hidden state
is kept, and the next token that goes deeper carries it along (a multi-token step at those layers), so every
cache entry is computed from the exact hidden state, as in the dense model; no token ever attends to a
missing or approximate entry. Layers may therefore be filled to different lengths (``KVCache.lengths``).

Self-speculative decoding (LayerSkip). The shallowest exit drafts tokens greedily through the first layers;
the remaining layers then run once over all drafted tokens, on the same cache, and the head's greedy
choices decide: drafts are kept while they agree, the first disagreement is replaced by the full model's
token, and the cache forgets the rejected slots. The output is the dense greedy output.
"""

from __future__ import annotations

import torch

from .forward import KVCache, MaskCache, run_layers
from .vocab import exit_logits, head_logits, select_vocab

__all__ = ["ExitDecoder", "speculative_round"]


def kv_projection(layer_graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The part of a layer graph that computes the new tokens' keys and values (norm, k/v projections, rope):
    the same graph with only ``(k, v)`` as output and everything else removed as dead code."""
    import copy

    graph = copy.deepcopy(layer_graph.graph)
    output = next(n for n in graph.nodes if n.op == "output")
    _, k, v = output.args[0]
    output.args = ((k, v),)
    # stage graphs hold no side effects; SDPA counts as impure (dropout) for fx, so say so explicitly
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    return torch.fx.GraphModule(layer_graph, graph)


class ExitDecoder:
    """Lossy early exit over a Program with exit stages. By default the skipped layers' KV are computed later
    and exactly (deferred); with ``copy=True`` they are projected from the exit hidden state at once (CALM)."""

    def __init__(self, program, cache: KVCache, *, copy: bool = False, stats: dict | None = None):
        self.program = program
        self.cache = cache
        self.stats = stats
        # slot -> (depth, hidden, cos, sin): tokens whose deeper layers are still to be computed
        self.pending: dict[int, tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.kv_only = {s.layer: kv_projection(s.graph) for s in program.layers} if copy else None

    def step(self, token: torch.Tensor, position: torch.Tensor, masks: MaskCache):
        """One new token per row. Returns the logits each row exits with ``[batch, vocab]`` and the number
        of layers each row's token went through ``[batch]``."""
        program, cache = self.program, self.cache
        slot = cache.lengths[0]
        hidden, cos, sin = program.embed.graph(token, position)
        prev = hidden
        start = slot  # the buffer holds slots start..slot, as input to the current layer
        batch = token.shape[0]
        decided = torch.zeros(batch, dtype=torch.bool)
        depth = torch.full((batch,), program.info.num_layers, dtype=torch.long)
        chosen = None
        ids = None  # the token ids a pruned exit scores (VocabReduce where="exits")
        prev_logits = None
        for stage in program.layers:
            i = stage.layer
            first = cache.lengths[i]
            if first < start:  # tokens that stopped at this depth join the step here
                hs, cs, ss = [], [], []
                for s in range(first, start):
                    d, h, c, n = self.pending.pop(s)
                    if d != i:  # an invariant of the per-layer fill lengths; -O must not remove it
                        raise RuntimeError(
                            f"KV bookkeeping broken: slot {s} pending at depth {d}, expected {i}"
                        )
                    hs.append(h)
                    cs.append(c)
                    ss.append(n)
                hidden = torch.cat(hs + [hidden], dim=1)
                cos = torch.cat(cs + [cos], dim=1)
                sin = torch.cat(ss + [sin], dim=1)
                start = first
            hidden = run_layers(program, cache, (stage,), hidden, cos, sin, masks)
            ex = program.exits.get(i)
            if ex is None:
                continue
            last = hidden[:, -1:]
            ids = select_vocab(prev_logits, ex, ids) if ex.attrs.get("vocab") == "pruned" else None
            logits, conf = exit_logits(ex, last, prev, ids)
            prev, prev_logits = last, logits[:, -1]
            fire = (conf[:, -1] >= ex.attrs["threshold"]) & ~decided
            if bool(fire.any()):
                if chosen is None:
                    chosen = torch.empty(batch, logits.shape[-1], dtype=logits.dtype)
                chosen[fire] = logits[fire, -1]
                depth[fire] = i + 1
                decided |= fire
            if bool(decided.all()):
                if self.kv_only is not None:  # CALM state copying: no pending tokens, approximate entries
                    for deeper in program.layers[i + 1 :]:
                        k, v = self.kv_only[deeper.layer](hidden, cos, sin, None, None, None)
                        cache.write(deeper.layer, k, v)
                    return chosen, depth
                for j in range(hidden.shape[1]):
                    self.pending[start + j] = (
                        i + 1,
                        hidden[:, j : j + 1],
                        cos[:, j : j + 1],
                        sin[:, j : j + 1],
                    )
                return chosen, depth
        logits = head_logits(program, hidden[:, -1:], self.stats)[:, -1]
        if chosen is None:
            return logits, depth
        chosen[~decided] = logits[~decided]
        return chosen, depth


def speculative_round(
    program, cache: KVCache, out, token, position, key_valid, draft: int, stats
) -> torch.Tensor:
    """Draft with the shallowest exit, verify with the remaining layers, emit the agreed tokens.

    ``token`` (one per row) is the last emitted token, not yet in the cache. Returns the position of the next
    token to process.
    """
    exit_layer = min(program.exits)
    ex = program.exits[exit_layer]
    shallow = [s for s in program.layers if s.layer <= exit_layer]
    deep = [s for s in program.layers if s.layer > exit_layer]
    base = cache.lengths[0]
    n = min(draft, out.remaining)
    drafts, hiddens, coss, sins = [], [], [], []
    tok, pos = token, position
    for j in range(n):
        masks = MaskCache(program, key_valid[:, : base + j + 1], cache.k[0].dtype)
        hidden, cos, sin = program.embed.graph(tok[:, None], pos)
        prev = hidden
        hidden = run_layers(program, cache, shallow, hidden, cos, sin, masks)
        logits, conf = ex.graph(hidden, prev)
        tok = logits[:, -1].float().argmax(-1)
        drafts.append(tok)
        hiddens.append(hidden)
        coss.append(cos)
        sins.append(sin)
        pos = pos + 1
        if bool((conf[:, -1] < ex.attrs["threshold"]).any()):
            break
    m = len(drafts)
    masks = MaskCache(program, key_valid[:, : base + m], cache.k[0].dtype)
    hidden = run_layers(
        program, cache, deep, torch.cat(hiddens, 1), torch.cat(coss, 1), torch.cat(sins, 1), masks
    )
    verified = head_logits(program, hidden, stats).float().argmax(-1)  # [batch, m]
    proposed = torch.stack(drafts, 1)
    agree = (proposed == verified).long().cumprod(1).sum(1)  # leading agreement per row
    k = int(agree.min())
    for j in range(k):
        out.emit(proposed[:, j])
        if out.done:
            break
    if k < m and not out.done:
        out.emit(verified[:, k])
    kept = min(k + 1, m)  # slots of token, d_1..d_k stay; rejected drafts' slots are forgotten
    cache.truncate(base + kept)
    if stats is not None:
        stats["drafted"] += m
        stats["accepted"] += k
        stats["rounds"] += 1
    return position + kept
