"""Speculative sampling (effx.runtime.speculative with a sampling Sampler): the rejection rule keeps the
output distributed as the Program's own sampling, whatever the drafts (looked up, greedy exits without a
bonus position, a branch that samples its drafts, toy sources always right, always wrong or in between).

Each check samples a batch of identical rows with speculation and without (different seeds) and compares the
first new tokens' empirical distributions with a chi-square test of homogeneity: its p-value accounts for
the sample size, and the seeds are fixed, so the outcome does not change from run to run."""

import numpy as np
import pytest
import torch
from conftest import tiny_model
from scipy.stats import chi2_contingency

import effx
from effx.arrays import multinomial
from effx.draft_branch import BranchResult, init_branch, save_draft_branch
from effx.runtime.loop import decode
from effx.runtime.sampling import Sampler
from effx.runtime.speculative import Draft, DraftSource
from effx.runtime.torch_backend import torch_backend

ROWS, NEW = 800, 4
PROMPT = [9, 30, 12, 82, 82, 26, 41, 7, 81, 9, 30, 12]  # repeats: prompt lookup drafts
WARM = Sampler(do_sample=True, temperature=0.7)
NUCLEUS = Sampler(do_sample=True, temperature=0.7, top_k=8, top_p=0.9)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2, seed=1)


@pytest.fixture(scope="module")
def dense(model):
    return effx.transform(model)


def _sample(prog, sampler, seed, sources=None, stats=None):
    """``ROWS`` identical rows' first ``NEW`` tokens, ``[ROWS, NEW]``."""
    ids = torch.tensor([PROMPT]).repeat(ROWS, 1)
    out = decode(
        torch_backend(prog), ids, torch.ones_like(ids), max_new=NEW, eos=[], pad=0, sampler=sampler,
        generator=torch.Generator().manual_seed(seed), sources=sources, stats=stats,
    )  # fmt: skip
    return out[:, len(PROMPT) :].numpy()


@pytest.fixture(scope="module")
def reference(dense):
    """Non-speculative samples, per sampler."""
    return {s: _sample(dense, s, seed=100) for s in (WARM, NUCLEUS)}


def _assert_same_distribution(got, want):
    """Every position's tokens: one chi-square test of homogeneity (bins with fewer than 10 draws in both
    samples together are pooled); a p-value under 1e-3 fails."""
    for j in range(got.shape[1]):
        a, b = np.bincount(got[:, j], minlength=96), np.bincount(want[:, j], minlength=96)
        big = (a + b) >= 10
        table = np.stack([np.append(a[big], a[~big].sum()), np.append(b[big], b[~big].sum())])
        table = table[:, table.sum(axis=0) > 0]
        if table.shape[1] > 1:
            p = chi2_contingency(table)[1]
            assert p > 1e-3, (j, p, table)


@pytest.mark.parametrize("sampler", [WARM, NUCLEUS], ids=["temperature", "top-k-top-p"])
@pytest.mark.parametrize(
    "passes",
    ["prompt-lookup{min_ngram=1}", "early-exit{layers=0 mode=self-speculative draft=3 thresholds=0}"],
    ids=["lookup", "exit"],
)
def test_speculative_samples_are_distributed_as_dense(model, reference, passes, sampler):
    """Lookup drafts (one-hot q, a bonus token) and greedy exit drafts (one-hot q, no position after the
    last draft: a row that keeps them all ends its round there)."""
    prog = effx.transform(model, passes=passes)
    stats = {}
    got = _sample(prog, sampler, seed=1, stats=stats)
    assert stats["drafted"] > 0 and 0 < stats["accepted"] < stats["drafted"]
    _assert_same_distribution(got, reference[sampler])


class Teacher(DraftSource):
    """Drafts from the model itself, run on each row's tokens: ``right`` samples the run's own distribution
    (q = p: every draft is kept), ``wrong`` drafts the least likely token (outside the run's top-k: p = 0,
    never kept), ``hotter`` samples at temperature 1.5 and gives that distribution (some kept)."""

    name = "teacher"
    draft = 3

    def __init__(self, model, mode, sampler, bonus=True):
        self.model, self.mode, self.sampler, self.bonus = model, mode, sampler, bonus

    def propose(self, spec, n):
        rows = [spec.row_tokens(b) for b in range(spec.batch)]
        drafts, probs = [], []
        for _ in range(n):
            lengths = torch.tensor([len(r) for r in rows])
            ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)  # right-padded: causal
            for b, r in enumerate(rows):
                ids[b, : len(r)] = torch.tensor(r)
            with torch.no_grad():
                logits = self.model(ids).logits[torch.arange(len(rows)), lengths - 1]
            if self.mode == "wrong":
                token, q = logits.argmin(-1), None
            else:
                sampler = self.sampler if self.mode == "right" else Sampler(do_sample=True, temperature=1.5)
                q = sampler.probabilities(logits)
                token = multinomial(spec.xp, q, spec.rng)
            drafts.append(token)
            probs.append(q)
            rows = [r + [int(t)] for r, t in zip(rows, token, strict=True)]
        counts = [n if a else 0 for a in spec.active]
        q = None if probs[0] is None else torch.stack(probs, 1)
        return Draft(torch.stack(drafts, 1), counts, bonus=self.bonus, probs=q)


@pytest.mark.parametrize(
    "mode, bonus, sampler",
    [("right", True, WARM), ("right", False, WARM), ("wrong", True, NUCLEUS), ("hotter", False, NUCLEUS)],
)
def test_toy_sources_keep_the_distribution(model, dense, reference, mode, bonus, sampler):
    stats = {}
    got = _sample(dense, sampler, seed=2, sources=[Teacher(model, mode, sampler, bonus)], stats=stats)
    drafted, accepted = stats["drafted"], stats["accepted"]
    if mode == "right":  # q = p up to rounding: every draft is kept
        assert accepted >= 0.99 * drafted > 0
    elif mode == "wrong":
        assert drafted > 0 and accepted == 0
    else:
        assert 0 < accepted < drafted
    _assert_same_distribution(got, reference[sampler])


def test_a_sampling_branch_keeps_the_distribution(model, dense, reference, tmp_path):
    """The draft branch samples its drafts from the sampler's distribution of its own logits and gives it
    (an untrained branch: its drafts are partly kept)."""
    layer = init_branch(dense)
    result = BranchResult(layer, None, [], [], tokens=0, heldout=0, steps=3, seconds=0.0)
    path = save_draft_branch(dense, result, tmp_path / "branch.safetensors")
    # every round drafts 3 (no pacing: on the tiny model a branch step costs half a step, and pacing would
    # leave little to judge)
    prog = effx.transform(model, passes=f"draft-branch{{weights={path} draft=3 adaptive=false}}")
    stats = {}
    got = _sample(prog, WARM, seed=3, stats=stats)
    assert 0 < stats["accepted"] < stats["drafted"]
    _assert_same_distribution(got, reference[WARM])


def test_a_seed_repeats_the_output(model):
    prog = effx.transform(model, passes="prompt-lookup{min_ngram=1}")
    ids = torch.tensor([PROMPT, PROMPT[::-1]])

    def run(seed):
        return prog.generate(
            ids, max_new_tokens=12, do_sample=True, temperature=0.7, seed=seed, eos_token_id=[]
        )

    assert torch.equal(run(7), run(7)) and not torch.equal(run(7), run(8))
