"""Speculative sampling's rejection rule (effx.runtime.rejection): whatever the draft distribution, the
emitted tokens are distributed as the target's own sampling; the sampler's distribution is the one it draws
from. Groundwork for sampled speculative decoding (issue 39): not yet wired into the verifier."""

import array_api_compat.numpy as xnp
import array_api_compat.torch as xtorch
import numpy as np
import pytest
import torch

from effx.arrays import new_rng
from effx.runtime.rejection import accept
from effx.runtime.sampling import Sampler

V = 6


def _dist(rng, sharp=1.0):
    p = rng.random(V) ** (3 * sharp)
    return p / p.sum()


def _round(p0, p1, q0, samples, seed):
    """Draw ``samples`` one-draft rounds: the draft from q0, the target p0 (then p1 after it)."""
    rng = np.random.default_rng(seed)
    draws = rng.choice(V, size=samples, p=q0)
    target = np.broadcast_to(np.stack([p0, p1])[None], (samples, 2, V))
    draft = np.broadcast_to(q0[None, None], (samples, 1, V))
    return accept(xnp, target, draft, draws[:, None], [1] * samples, new_rng(xnp, seed + 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_first_token_is_distributed_as_the_target_whatever_the_draft(seed):
    rng = np.random.default_rng(100 + seed)
    p0, p1, q0 = _dist(rng), _dist(rng), _dist(rng, sharp=2.0)
    n = 40_000
    accepted, nxt = _round(p0, p1, q0, n, seed)
    draws = np.random.default_rng(seed).choice(V, size=n, p=q0)
    first = np.where(np.asarray(accepted) == 1, draws, np.asarray(nxt))
    freq = np.bincount(first, minlength=V) / n
    # 40k draws: a frequency's standard error is at most 0.0025; 0.015 is 6 of them
    assert np.abs(freq - p0).max() < 0.015, (freq, p0)
    # the acceptance rate is sum_x min(p, q), as the rule promises
    assert abs(np.mean(accepted) - np.minimum(p0, q0).sum()) < 0.015
    # a row that kept its draft draws the next token from the target after it
    second = np.asarray(nxt)[np.asarray(accepted) == 1]
    assert np.abs(np.bincount(second, minlength=V) / len(second) - p1).max() < 0.02


def test_a_draft_equal_to_the_target_is_always_kept_and_an_impossible_one_never():
    p = np.array([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    target = np.stack([p, p, p])[None]
    same, _ = accept(xnp, target, np.stack([p, p])[None], np.array([[0, 1]]), [2], new_rng(xnp, 0))
    assert same == [2]
    onehot = np.zeros((1, 2, V))
    onehot[0, :, 4] = 1.0  # a greedy draft of a token the target never samples
    for seed in range(20):
        kept, nxt = accept(xnp, target, onehot, np.array([[4, 4]]), [2], new_rng(xnp, seed))
        assert kept == [0] and int(nxt[0]) in (0, 1)  # resampled from the residual, which is p itself


def test_rows_keep_their_own_prefix_and_counts_bound_them():
    p = np.full(V, 1 / V)
    target = np.broadcast_to(p, (2, 4, V))
    draft = np.broadcast_to(p, (2, 3, V))  # q == p: every proposed draft is kept
    kept, nxt = accept(xnp, target, draft, np.zeros((2, 3), dtype=np.int64), [3, 1], new_rng(xnp, 0))
    assert kept == [3, 1] and nxt.shape == (2,)
    with pytest.raises(ValueError, match="positions"):
        accept(xnp, target[:, :3], draft, np.zeros((2, 3), dtype=np.int64), [3, 1], new_rng(xnp, 0))


def test_torch_and_numpy_run_the_same_rule():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0, 0.0]] * 3, dtype=torch.float32)[None]
    q = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]] * 2, dtype=torch.float32)[None]
    kept, nxt = accept(xtorch, p, q, torch.tensor([[3, 3]]), [2], torch.Generator().manual_seed(0))
    assert 0 <= kept[0] <= 2 and nxt.dtype == torch.int64


def test_the_sampler_draws_from_its_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0, 0.0]])
    sampler = Sampler(do_sample=True, temperature=0.7, top_k=4, top_p=0.9)
    probs = sampler.probabilities(logits)
    assert abs(float(probs.sum()) - 1) < 1e-6 and int((probs > 0).sum()) <= 4
    want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(-1)
    assert torch.equal(sampler(logits, torch.Generator().manual_seed(3)), want)
    assert sampler.probabilities(logits[None]).shape == (1, 1, V)  # any leading axes
