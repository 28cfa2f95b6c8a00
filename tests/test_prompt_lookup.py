"""PromptLookup and the shared verifier (effx.runtime.speculative): drafts from the text, rounds that keep
each row's agreeing prefix, holes and compaction in batches, greedy output identical to dense."""

import pytest
import torch
from conftest import left_padded_batch, tiny_model
from hypothesis import given
from hypothesis import strategies as st

import effx
import effx.runtime.loop as loop
from effx import Plan
from effx.errors import PassConfigError, PassError, PlanError
from effx.passes import EarlyExit, PromptLookup, parse_pipeline
from effx.plan import PromptLookupPolicy
from effx.runtime.loop import decode
from effx.runtime.sampling import Sampler
from effx.runtime.speculative import Draft, DraftSource, LookupDraft
from effx.runtime.torch_backend import torch_backend


@pytest.fixture(scope="module")
def model4():
    return tiny_model("llama", layers=4, seed=1)


@pytest.fixture(scope="module")
def dense4(model4):
    return effx.transform(model4)


def test_the_pass_sets_a_policy_and_changes_no_graph(dense4):
    prog = PromptLookup(ngram=2, draft=5).apply(dense4).program
    assert [s.name for s in prog] == [s.name for s in dense4]
    assert all(a.graph is b.graph for a, b in zip(prog, dense4, strict=True))
    assert prog.plan.policy.prompt_lookup == PromptLookupPolicy(ngram=2, min_ngram=2, draft=5)
    assert prog.plan.speculative and not dense4.plan.speculative
    again = Plan.from_json(prog.plan.to_json())
    assert again.policy.prompt_lookup == prog.plan.policy.prompt_lookup
    assert parse_pipeline("prompt-lookup{ngram=2 draft=5}") == [PromptLookup(ngram=2, draft=5)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ngram=0), "ngram must be an integer >= 1"),
        (dict(draft=0), "draft must be an integer >= 1"),
        (dict(ngram=2, min_ngram=3), "min_ngram"),
        (dict(draft=True), "draft must be an integer"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PassConfigError, match=match):
        PromptLookup(**kwargs)


def test_refused_with_lossy_exits_and_twice(model4):
    with pytest.raises(PassError, match="lossy early exits"):
        effx.transform(model4, passes="early-exit{layers=1}, prompt-lookup")
    # listed first, run after early-exit: the check still sees the lossy mode
    with pytest.raises(PassError, match="lossy early exits"):
        effx.transform(model4, passes="prompt-lookup, early-exit{layers=1}")
    with pytest.raises(PassError, match="already drafts"):
        effx.transform(model4, passes="prompt-lookup, prompt-lookup")
    with pytest.raises(PlanError, match="min_ngram"):
        PromptLookupPolicy(ngram=1, min_ngram=2)


def test_samples_reproducibly(dense4):
    """Sampling is speculative too (the rejection rule: tests/test_speculative_sampling.py); a seed repeats."""
    prog = PromptLookup(min_ngram=1).apply(dense4).program
    ids = torch.tensor([[5, 6, 5, 6, 5]])
    runs = [prog.generate(ids, max_new_tokens=8, do_sample=True, seed=4, eos_token_id=[]) for _ in range(2)]
    assert runs[0].shape == (1, 13) and torch.equal(runs[0], runs[1])


class _Spec:  # what LookupDraft reads of a Speculation
    xp = effx.runtime.torch_backend.XP

    def __init__(self, rows):
        self.rows = rows
        self.batch = len(rows)
        self.active = [True] * len(rows)

    def row_tokens(self, b):
        return list(self.rows[b])


def test_lookup_drafts_the_continuation_of_the_latest_ngram():
    spec = _Spec([[1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3], [5, 6, 7], [4, 4, 4, 2, 4]])
    src = LookupDraft(ngram=3, min_ngram=1, draft=3)
    src.start(spec)
    draft = src.propose(spec, 3)
    # row 0: "1 2 3" last seen before the end at index 5, followed by 7 8 4
    # row 1: no n-gram repeats; row 2: "2 4" does not repeat, "4" last followed by 2 4 (at index 2)
    assert draft.counts == [3, 0, 2]
    assert draft.tokens[0].tolist() == [7, 8, 4] and draft.tokens[2, :2].tolist() == [2, 4]
    src.appended(spec, 1, [5, 6])  # row 1 now ends in "5 6" again: 7 5 6 followed it
    spec.active = [False, True, False]
    draft = src.propose(spec, 3)
    assert draft.counts == [0, 3, 0] and draft.tokens[1].tolist() == [7, 5, 6]


class Oracle(DraftSource):
    """Drafts the dense output's next tokens, a random number of them per row, some corrupted."""

    name = "oracle"

    def __init__(self, reference, draft, seed, vocab=96):
        self.reference, self.draft, self.vocab = reference, draft, vocab
        self.g = torch.Generator().manual_seed(seed)

    def propose(self, spec, n):
        rows, counts = [], []
        for b in range(spec.batch):
            c = int(torch.randint(0, n + 1, (1,), generator=self.g))
            row = self.reference[b, spec.n[b] : spec.n[b] + c].tolist()
            if row and torch.rand(1, generator=self.g) < 0.3:
                j = int(torch.randint(0, len(row), (1,), generator=self.g))
                row[j] = (row[j] + 1) % self.vocab
            counts.append(len(row))
            rows.append(row + [3] * (n - len(row)))
        return Draft(torch.tensor(rows, dtype=torch.long), counts)


@pytest.mark.parametrize("tight", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_verifier_keeps_each_rows_agreeing_prefix(dense4, monkeypatch, tight, seed):
    """Rows accept different prefixes (holes in the cache), and a tight cache compacts; tokens are dense."""
    if tight:  # the least room a batch could need without holes: holes must be compacted away
        monkeypatch.setattr(loop, "capacity", lambda batch, prompt, new, draft: prompt + new + draft + 1)
    ids, mask = left_padded_batch([9, 3, 14], 96, seed=seed)
    ref = dense4.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[])
    stats = {}
    out = decode(
        torch_backend(dense4), ids, mask, max_new=40, eos=[], pad=0, sampler=Sampler(do_sample=False),
        stats=stats, sources=[Oracle(ref, 6, seed)],
    )  # fmt: skip
    assert torch.equal(out, ref)
    assert 0 < stats["accepted"] < stats["drafted"] and stats["rounds"] < 40
    assert (stats["compactions"] > 0) == tight


def test_verifier_stops_rows_at_their_stop_token(dense4):
    ids, mask = left_padded_batch([6, 11], 96, seed=3)
    free = dense4.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    stop = int(free[0, ids.shape[1] + 5])  # row 0 stops at its 6th token; row 1 whenever it meets it
    ref = dense4.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=stop, pad_token_id=0)
    seen = []
    out = decode(
        torch_backend(dense4), ids, mask, max_new=20, eos=[stop], pad=0, sampler=Sampler(do_sample=False),
        sources=[Oracle(free, 5, 0)], on_token=lambda t: seen.append(t.tolist()),
    )  # fmt: skip
    assert torch.equal(out, ref)
    assert len(seen) == out.shape[1] - ids.shape[1]  # one column per call, as the dense loop emits them


@given(
    kind=st.sampled_from(["llama", "mistral", "qwen2", "gemma3"]),
    layers=st.integers(2, 4),
    ngram=st.integers(1, 3),
    draft=st.integers(1, 6),
    exit_draft=st.booleans(),
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    seed=st.integers(0, 1000),
)
def test_prompt_lookup_is_dense_greedy(kind, layers, ngram, draft, exit_draft, lengths, seed):
    model = tiny_model(kind, layers=layers, seed=seed)
    ids, mask = left_padded_batch(lengths, 96, seed)
    k = min(4, *lengths)  # some repetition to look up: every row's last k tokens, again
    ids, mask = torch.cat([ids, ids[:, -k:]], 1), torch.cat([mask, mask[:, -k:]], 1)
    dense = effx.transform(model).generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    passes = [PromptLookup(ngram=ngram, min_ngram=1, draft=draft)]
    if exit_draft:
        passes.insert(0, EarlyExit(layers=(0,), mode="self-speculative", draft=3, thresholds=(0.2,)))
    stats = {}
    out = effx.transform(model, passes=passes).generate(
        ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], stats=stats
    )
    assert torch.equal(out, dense)
    assert 0 <= stats["accepted"] <= stats["drafted"]
    assert sum(s["drafted"] for s in stats["sources"].values()) == stats["drafted"]


def test_lookup_then_exit_drafts(model4, dense4):
    """With both sources, rounds where lookup finds nothing draft with the exit."""
    ids = torch.tensor([[5, 17, 33, 8, 40, 41]])
    ref = dense4.generate(ids, max_new_tokens=20, eos_token_id=[])
    prog = effx.transform(
        model4,
        passes="early-exit{layers=1 mode=self-speculative draft=3 thresholds=0}, prompt-lookup{ngram=1 min_ngram=1}",
    )
    stats = {}
    assert torch.equal(prog.generate(ids, max_new_tokens=20, eos_token_id=[], stats=stats), ref)
    assert stats["sources"]["exit"]["rounds"] > 0
    assert stats["sources"]["lookup"]["rounds"] + stats["sources"]["exit"]["rounds"] <= stats["rounds"]


def test_a_huge_draft_setting_does_not_size_the_cache(dense4, monkeypatch):
    """draft=10**7 drafts at most the tokens left, and the cache is sized by them (issue 37: it asked for
    gigabytes before), with the dense tokens."""
    sizes = []
    real = effx.runtime.torch_backend.TorchBackend.new_cache

    def recording(self, batch, slots, **kw):
        sizes.append(slots)
        return real(self, batch, slots, **kw)

    monkeypatch.setattr(effx.runtime.torch_backend.TorchBackend, "new_cache", recording)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    out = PromptLookup(draft=10**7).apply(dense4).program.generate(ids, max_new_tokens=6)
    assert torch.equal(out, dense4.generate(ids, max_new_tokens=6))
    assert max(sizes) <= ids.shape[1] + 2 * 6 + 1
