"""Adaptive draft lengths (effx.runtime.pacing): a row drafts as far as a round pays, stops when drafts are
rejected, probes, resumes; a paced source's output is still dense greedy."""

import pytest
import torch
from conftest import left_padded_batch, tiny_model

import effx
from effx.runtime.loop import decode
from effx.runtime.pacing import Pacer
from effx.runtime.sampling import Sampler
from effx.runtime.speculative import Draft, DraftSource
from effx.runtime.torch_backend import torch_backend


def test_rows_draft_as_far_as_pays_and_stop_when_rejected():
    p = Pacer(2, 4, draft_cost=0.1, probe=4)
    # the prior (one half per position): 1.75 tokens for 1.3 steps at two drafts is the best rate
    assert p.lengths(4, [True, True]) == [2, 2]
    for _ in range(6):
        p.update([4, 4], [4, 0], [True, True])  # row 0 keeps every draft, row 1 none
    assert p.lengths(4, [True, True]) == [4, 0]
    assert p.lengths(2, [True, False]) == [2, 0]  # never past n, nothing for an inactive row
    # row 1 idles, then probes one draft after `probe` rounds; each probe that is rejected doubles the wait
    seen = []
    for _ in range(28):
        k = p.lengths(4, [True, True])[1]
        seen.append(k)
        p.update([4, k], [4, 0], [True, True])
    assert [i for i, k in enumerate(seen) if k] == [3, 11, 27] and sum(seen) == 3
    # drafts accepted again: the row resumes, and once it stops it waits `probe` rounds again
    for _ in range(6):
        p.update([4, 1], [4, 1], [True, True])
    assert p.lengths(4, [True, True])[1] >= 1
    assert p.wait[1] == 4


def test_probes_back_off_to_the_cap_and_a_probe_that_pays_resets_the_wait():
    p = Pacer(1, 2, draft_cost=0.1, probe=2, max_probe=8)
    p.hits, p.tries = [[0.0, 0.0]], [[20.0, 20.0]]  # nothing accepted: no length pays
    probes = []
    for r in range(40):
        k = p.lengths(2, [True])[0]
        if k:
            probes.append(r)
        p.update([k], [0], [True])
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert gaps[:3] == [4, 8, 8] and set(gaps[2:]) == {8}  # 2, 4, 8, then the cap
    p.hits, p.tries = [[19.0, 19.0]], [[20.0, 20.0]]  # the text changed: drafts would pay now
    while not p.lengths(2, [True])[0]:
        p.update([0], [0], [True])
    p.update([1], [1], [True])
    assert p.wait == [2]


def test_costly_drafts_are_kept_shorter():
    cheap, costly = Pacer(1, 8, draft_cost=0.0), Pacer(1, 8, draft_cost=0.4)
    for p in (cheap, costly):  # three in four drafts accepted at every position
        p.hits, p.tries = [[8.0] * 8], [[10.0] * 8]
    assert cheap.best(0, 8) >= 6 and costly.best(0, 8) == 2


class Wrong(DraftSource):
    """Drafts ``token``, which the Program never chooses in the run."""

    name = "wrong"
    cost = 0.1

    def __init__(self, draft, token):
        self.draft, self.token = draft, token
        self.asked = []

    def propose(self, spec, n):
        self.asked.append(n)
        tokens = spec.xp.full((spec.batch, n), self.token, dtype=spec.xp.int64)
        return Draft(tokens, [n if a else 0 for a in spec.active])


@pytest.mark.parametrize("lengths", [[10], [10, 6]])
def test_a_paced_source_that_is_always_rejected_stops_drafting_and_output_is_dense(lengths):
    model = tiny_model("llama", layers=2, seed=4)
    dense = effx.transform(model)
    ids, mask = left_padded_batch(lengths, 96, seed=2)
    want = dense.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=[])
    never = min(set(range(96)) - set(want[:, ids.shape[1] :].flatten().tolist()))
    source = Wrong(4, never)
    stats = {}
    got = decode(
        torch_backend(dense),
        ids,
        mask,
        max_new=40,
        eos=[],
        pad=0,
        sampler=Sampler(),
        sources=[source],
        stats=stats,
    )
    assert torch.equal(got, want)
    assert stats["accepted"] == 0
    # after the first rounds it drafts only to probe: far fewer than 4 per round
    assert stats["drafted"] < 0.3 * 4 * len(lengths) * stats["steps"]
    assert source.asked[0] == 2 and source.asked[-1] == 1  # two at the prior, then one to probe


def test_width_cost_follows_the_plan_weights_and_lookup_is_paced_by_it():
    from effx.runtime.pacing import WIDTH_COST, WIDTH_COST_4BIT, width_cost
    from effx.runtime.speculative import sources_of

    model = tiny_model("llama", layers=2)
    dense = effx.transform(model, passes="prompt-lookup")
    four = effx.transform(model, passes="quantize,prompt-lookup")
    eight = effx.transform(model, passes="quantize{bits=8},prompt-lookup")
    assert width_cost(dense.plan) == WIDTH_COST
    assert width_cost(four.plan) == WIDTH_COST_4BIT > width_cost(eight.plan) > WIDTH_COST
    # lookup drafts cost nothing themselves, so it is paced: on 4-bit weights, where each verified
    # position costs 0.2 of a step, a row whose drafts are accepted half the time drafts less
    (lookup,) = sources_of(four.plan)
    assert lookup.cost == 0.0
    cheap, costly = Pacer(1, 4, 0.0, width_cost=WIDTH_COST), Pacer(1, 4, 0.0, width_cost=WIDTH_COST_4BIT)
    assert cheap.lengths(4, [True]) == [3] and costly.lengths(4, [True]) == [1]  # the prior: one half
    for p in (cheap, costly):  # a quarter of the drafts accepted: a 4-bit row stops drafting, a float one not
        p.hits, p.tries = [[2.0] * 4], [[10.0] * 4]
    assert cheap.lengths(4, [True]) == [2] and costly.lengths(4, [True]) == [0]
