"""DecodeStats: the dict a user passes to ``generate`` gets the keys it always got, a DecodeStats gets the
same values typed, summary() is the one line about them, and an unknown statistic fails where written."""

import json

import pytest
import torch

import effx
from effx.passes import EarlyExit, PromptLookup, VocabReduce
from effx.runtime.stats import DecodeStats, SourceCounts
from effx.testing import tiny_model

V = 96
SPECULATION = {
    "drafted", "accepted", "rounds", "steps", "verified_positions", "emitted", "draft_lengths", "sources",
    "compactions",
}  # fmt: skip


@pytest.fixture(scope="module")
def model4():
    return tiny_model("llama", layers=4, seed=3)


def _run(prog, stats, max_new=8, on_token=None):
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6], [9, 1, 2, 3, 9, 1, 2, 3]])
    return prog.generate(ids, max_new_tokens=max_new, eos_token_id=[], stats=stats, on_token=on_token)


def _both(prog, **kw):
    """The dict a user passes, and a DecodeStats passed instead: the same run, the same statistics."""
    as_dict, typed = {}, DecodeStats()
    out_dict, out_typed = _run(prog, as_dict, **kw), _run(prog, typed, **kw)
    assert torch.equal(out_dict, out_typed)
    assert typed.as_dict() == as_dict
    return as_dict, typed


def test_a_dense_decode_reports_nothing(model4):
    as_dict, typed = _both(effx.transform(model4))
    assert as_dict == {} and typed.summary() == ""


def test_a_lossy_early_exit_fills_exit_layers_live(model4):
    prog = effx.transform(model4, passes=[EarlyExit(layers=(1,), thresholds=(0.0,))])
    seen = []
    as_dict = {}
    _run(prog, as_dict, on_token=lambda t: seen.append(len(as_dict.get("exit_layers", []))))
    assert set(as_dict) == {"exit_layers"}
    assert len(as_dict["exit_layers"]) == 7 and all(len(step) == 2 for step in as_dict["exit_layers"])
    assert all(d == 2 for step in as_dict["exit_layers"] for d in step)  # threshold 0: every token leaves
    assert seen == list(range(8))  # on_token reads the dict as the loop fills it
    _, typed = _both(prog)
    assert typed.mean_exit_depth() == 2.0 and typed.summary() == "mean exit depth 2.0 layers"


def test_a_speculative_decode_reports_its_rounds(model4):
    prog = effx.transform(model4, passes=[PromptLookup(ngram=2, draft=4)])
    as_dict, typed = _both(prog)
    assert set(as_dict) == SPECULATION
    (name,) = as_dict["sources"]
    counts = as_dict["sources"][name]
    assert set(counts) == {"rounds", "drafted", "accepted", "proposed_at", "accepted_at"}
    assert isinstance(typed.sources[name], SourceCounts)
    assert counts["accepted"] == as_dict["accepted"] <= as_dict["drafted"]
    # per draft position: the counts add up to the totals
    assert (
        sum(counts["proposed_at"]) == counts["drafted"] and sum(counts["accepted_at"]) == counts["accepted"]
    )
    assert as_dict["rounds"] == len(as_dict["draft_lengths"]) <= as_dict["steps"]
    assert as_dict["emitted"] >= 2 * 7  # both rows, every token after the prefill's first
    if typed.drafted:
        assert f"drafts accepted {typed.accepted}/{typed.drafted}" in typed.summary()


def test_a_vocab_reduced_head_counts_its_fallbacks(model4, tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"ids": list(range(30))}))
    prog = effx.transform(model4, [VocabReduce(k=30, where="head", vocab=str(path), fallback=1.0)])
    as_dict, typed = _both(prog)
    assert set(as_dict) == {"head_positions", "head_fallbacks"}
    # fallback 1.0: every position falls back; the prefill's last position, then one per step, per row
    assert as_dict["head_positions"] == as_dict["head_fallbacks"] == 2 * 8
    assert typed.summary() == "reduced head fell back on 16/16 positions"


def test_summary_is_one_line_about_every_decision():
    stats = DecodeStats(
        exit_layers=[[2], [4]],
        drafted=4,
        accepted=3,
        head_positions=4,
        head_fallbacks=1,
        kept_tokens={1: [3]},
    )
    assert stats.summary() == (
        "mean exit depth 3.0 layers; drafts accepted 3/4 (75%); reduced head fell back on 1/4 positions; "
        "prompt tokens kept (layer 1: 3)"
    )
    assert DecodeStats.from_dict(stats.as_dict()) == stats


def test_an_unknown_statistic_is_an_error_at_the_writer():
    stats, sink = DecodeStats(), {}
    stats.bind(sink)
    with pytest.raises(AttributeError, match="no statistic 'head_fallback'"):
        stats.count(head_fallback=1)
    with pytest.raises(AttributeError, match="no statistic 'exit_layer'"):
        stats.set(exit_layer=[])
    with pytest.raises(AttributeError):
        stats.head_fallback = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="no statistic 'typo'"):
        DecodeStats.from_dict({"typo": 1})
    assert sink == {} and stats.as_dict() == {}
