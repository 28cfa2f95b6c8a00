import functools
import math

import pytest
import torch
from conftest import left_padded_batch, related_models, tiny_model
from hypothesis import given
from hypothesis import strategies as st

import effx
from effx.cascade import Cascade, EntropyGate, MaxProbGate
from effx.errors import CascadeConfigError, CascadeError, GenerationInputError
from effx.passes import EarlyExit, NeuronMask, TokenDrop
from effx.runtime.cascade import decode, next_draft_length
from effx.runtime.forward import KVCache, positions_from_mask, run_step


@functools.cache
def pair(kind: str = "llama", mix: float | None = 0.2) -> tuple[effx.Program, effx.Program]:
    """Programs of ``related_models(kind, mix)``; ``mix=None``: two independent random models that share only
    the vocabulary size (they almost never agree); on the reference kernels, whose numbers the calibration
    tests compare across batch shapes (effx's fast kernels hand products of more than MAX_ROWS rows to
    torch's, so a chunked calibration and one batched forward may differ in the last bits)."""
    if mix is None:
        return effx.transform(tiny_model(kind, seed=0, layers=1), kernels="reference"), effx.transform(
            tiny_model(kind, seed=1, layers=3), kernels="reference"
        )
    small, large = related_models(kind, mix)
    return effx.transform(small), effx.transform(large)


def prompts(lengths, seed):
    return left_padded_batch(lengths, 96, seed)


class CountingTokenizer:
    """A stand-in tokenizer: one id per character (tiny models have no tokenizer of their own)."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        class Enc:
            input_ids = [3 + (ord(c) % 90) for c in text]

        return Enc()


TEXTS = ["the quick brown fox jumps over the lazy dog " * 8, "lorem ipsum dolor sit amet, consectetur " * 8]


# -- verified mode: the large model's greedy tokens --------------------------------------------------------


@given(
    kind=st.sampled_from(["llama", "qwen2"]),
    mix=st.sampled_from([0.0, 0.2, None]),  # all, some, (almost) no drafts accepted
    draft=st.integers(1, 6),
    adaptive=st.booleans(),
    gate=st.sampled_from([None, EntropyGate(threshold=1.0), MaxProbGate(threshold=0.5)]),
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    max_new=st.integers(1, 12),
    seed=st.integers(0, 1000),
)
def test_verified_is_large_greedy(kind, mix, draft, adaptive, gate, lengths, max_new, seed):
    small, large = pair(kind, mix)
    ids, mask = prompts(lengths, seed)
    expected = large.generate(ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=[])
    stats = {}
    casc = effx.cascade(small, large, gate, mode="verified", draft=draft, adaptive=adaptive)
    out = casc.generate(ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=[], stats=stats)
    assert torch.equal(out, expected)
    assert 0 <= stats["accepted"] <= stats["drafted"]
    assert all(1 <= m <= draft for m in stats["draft_lengths"])
    assert len(stats["draft_lengths"]) == stats["rounds"]
    # every new token of every row was decided by one of the two models
    assert stats["small_tokens"] + stats["large_tokens"] == len(lengths) * max_new
    assert stats["small_share"] + stats["large_share"] == pytest.approx(1.0)


def test_verified_accepts_what_the_large_model_agrees_with():
    """Identical functions: every draft is accepted and the draft length stays at its maximum; unrelated
    models: almost nothing is accepted and adaptation brings the draft down to one token."""
    ids, mask = prompts([4, 2], seed=3)
    same, other = {}, {}
    effx.cascade(*pair("llama", 0.0), mode="verified", draft=4).generate(
        ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[], stats=same
    )
    # drafted and accepted count per row: 2 rows x 3 rounds x 4 drafts
    assert same["accepted"] == same["drafted"] == 2 * 12 and same["draft_lengths"] == [4, 4, 4]
    assert same["large_tokens"] == 2 * 4  # the first token, then one after each round
    effx.cascade(*pair("llama", None), mode="verified", draft=4).generate(
        ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[], stats=other
    )
    assert other["accepted"] <= 4 and other["draft_lengths"][:4] == [4, 3, 2, 1]
    assert set(other["draft_lengths"][4:]) <= {1, 2}
    fixed = {}
    effx.cascade(*pair("llama", None), mode="verified", draft=3, adaptive=False).generate(
        ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], stats=fixed
    )
    assert fixed["draft_lengths"][:5] == [3] * 5  # (the last rounds are cut by max_new_tokens)


def test_next_draft_length():
    assert next_draft_length(2, drafted=2, accepted=2, max_draft=4) == 3
    assert next_draft_length(4, drafted=4, accepted=4, max_draft=4) == 4
    assert next_draft_length(3, drafted=3, accepted=1, max_draft=4) == 2
    assert next_draft_length(1, drafted=1, accepted=0, max_draft=4) == 1


@pytest.mark.parametrize("mode", ["verified", "gated"])
def test_stop_tokens(mode):
    small, large = pair("llama", 0.2)
    ids, mask = prompts([5, 3], seed=7)
    free = large.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    stop = int(free[0, ids.shape[1] + 4])
    expected = large.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=stop, pad_token_id=0)
    gate = EntropyGate(threshold=0.0) if mode == "gated" else None  # gated: the large model decides all
    out = effx.cascade(small, large, gate, mode=mode, draft=3).generate(
        ids, attention_mask=mask, max_new_tokens=12, eos_token_id=stop, pad_token_id=0
    )
    assert torch.equal(out, expected)
    assert (out[0, ids.shape[1] + 5 :] == 0).all()  # row 0 stopped and is padded


@pytest.mark.parametrize(
    "side, passes",
    [
        ("large", [TokenDrop(at_layers=(1,), keep=(0.5,), protect_last=1)]),
        ("large", [NeuronMask(mode="core", keep=0.5)]),
        ("small", [NeuronMask(mode="core", keep=0.5)]),
    ],
    ids=["large-token-drop", "large-core-neurons", "small-core-neurons"],
)
def test_verified_with_transformed_programs(side, passes):
    """Programs with passes of their own: the cascade reproduces the large Program's own greedy output (its
    prefill and decoding as its passes set them up), whatever the small Program drafts with."""
    small, large = pair("llama", 0.2)
    models = related_models("llama", 0.2)
    if side == "large":
        large = effx.transform(models[1], passes)
    else:
        small = effx.transform(models[0], passes)
    ids, mask = prompts([7, 4], seed=11)
    expected = large.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    stats = {}
    out = effx.cascade(small, large, mode="verified", draft=3).generate(
        ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], stats=stats
    )
    assert torch.equal(out, expected)
    assert stats["accepted"] > 0
    assert "core_neurons" in stats[side] or "kept_tokens" in stats[side]  # the Program's own runtime ran


# -- gated mode -----------------------------------------------------------------------------------------------


@given(
    kind=st.sampled_from(["llama", "qwen2"]),
    related=st.booleans(),
    gate=st.sampled_from(["entropy", "max-prob"]),
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    max_new=st.integers(1, 10),
    seed=st.integers(0, 1000),
)
def test_gate_identity_settings(kind, related, gate, lengths, max_new, seed):
    """A gate that never fires gives the small model's tokens; one that always fires, the large model's."""
    small, large = pair(kind, 0.2 if related else None)
    ids, mask = prompts(lengths, seed)
    never, always = (
        (EntropyGate(threshold=math.inf), EntropyGate(threshold=0.0))
        if gate == "entropy"
        else (MaxProbGate(threshold=0.0), MaxProbGate(threshold=1.0))
    )
    kw = dict(attention_mask=mask, max_new_tokens=max_new, eos_token_id=[])
    stats = {}
    out = effx.cascade(small, large, never).generate(ids, stats=stats, **kw)
    assert torch.equal(out, small.generate(ids, **kw))
    assert stats["large_tokens"] == 0 and stats["large_passes"] == 0 and stats["small_share"] == 1.0
    out = effx.cascade(small, large, always).generate(ids, stats=stats, **kw)
    assert torch.equal(out, large.generate(ids, **kw))
    assert stats["small_tokens"] == 0 and stats["large_share"] == 1.0


def median_entropy(small, ids, mask) -> float:
    logits = small(ids, mask)
    return float(EntropyGate(threshold=0.0).measure(logits[mask.bool()]).median())


def test_per_row_gating_matches_each_prompt_alone():
    """Rows are gated independently: a row's tokens are the same in a batch as alone, though the large
    model runs for the whole batch whenever any row needs it."""
    small, large = pair("llama", None)
    ids, mask = prompts([6, 2, 4], seed=5)
    gate = EntropyGate(threshold=median_entropy(small, ids, mask))
    casc = effx.cascade(small, large, gate)
    stats = {}
    batch = casc.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], stats=stats)
    assert 0 < stats["large_tokens"] < 3 * 10  # the gate fired for some tokens, not all
    alone_large = 0
    for row in range(3):
        real = mask[row].bool()
        one = {}
        alone = casc.generate(ids[row : row + 1, real], max_new_tokens=10, eos_token_id=[], stats=one)
        assert torch.equal(batch[row, -10:], alone[0, -10:])
        alone_large += one["large_tokens"]
    assert alone_large == stats["large_tokens"]


def fresh_cache(program, tokens, key_valid):
    cache = KVCache.for_program(program, tokens.shape[0], tokens.shape[1])
    with torch.inference_mode():
        run_step(program, cache, tokens, positions_from_mask(key_valid), key_valid)
    return cache


class ScheduledGate:
    """Fires for row ``r`` at decode step ``t`` where ``schedule[t][r]``: catch-up lengths chosen by the test."""

    def __init__(self, schedule):
        self.schedule = torch.tensor(schedule, dtype=torch.bool)
        self.step = 0

    def __call__(self, logits):
        fired = self.schedule[self.step]
        self.step += 1
        return fired


def check_cache_is_dense(state, program, tokens, key_valid):
    """The first ``state.seen`` slots of ``state.cache`` equal a fresh prefill over those tokens (valid slots)."""
    n = state.seen
    assert all(length == n for length in state.cache.lengths)
    ref = fresh_cache(program, tokens[:, :n], key_valid[:, :n])
    valid = key_valid[:, None, :n, None]
    for layer in range(program.info.num_layers):
        for got, want in ((state.cache.k, ref.k), (state.cache.v, ref.v)):
            diff = (got[layer][:, :, :n] - want[layer]).abs() * valid
            assert float(diff.max()) < 1e-4


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_catch_up_kv_equals_dense_recompute(kind):
    """After a gated run, both caches hold what a fresh prefill over the emitted tokens computes: the large
    model's multi-token catch-up steps are exact, and the small model read the large model's tokens where
    it overrode its own."""
    small, large = pair(kind, None)
    ids, mask = prompts([5, 3], seed=2)
    # steps 0..11; catch-ups of 3, 1, 4 and 2 tokens, rows firing alone and together, and a last stretch
    # that the large model never catches up on
    schedule = [[False, False]] * 12
    for step, rows in {2: [True, False], 3: [False, True], 7: [True, True], 9: [False, True]}.items():
        schedule[step] = rows
    stats = {}
    tokens, s, lg = decode(
        small,
        large,
        ids,
        mask,
        mode="gated",
        max_new=12,
        eos=torch.tensor([], dtype=torch.long),
        pad=0,
        fires=ScheduledGate(schedule),
        stats=stats,
    )
    assert stats["large_tokens"] == 5 and stats["large_steps"] == 4
    assert stats["overridden"] > 0  # the large model changed tokens that the small model then read
    # one forward per catch-up, over all the tokens it had not seen
    assert (
        stats["large_passes"] == 4 and stats["catch_up_tokens"] == stats["large_positions"] == 2 + 1 + 4 + 2
    )
    assert lg.seen == ids.shape[1] + 9 and s.seen == tokens.shape[1] - 1
    key_valid = torch.cat([mask.bool(), torch.ones(2, 12, dtype=torch.bool)], 1)
    check_cache_is_dense(lg, large, tokens, key_valid)
    check_cache_is_dense(s, small, tokens, key_valid)


def test_verified_rollback_leaves_dense_caches():
    """After speculative rounds with rejected drafts, neither cache keeps anything of a rejected draft: each
    row's valid slots hold, in order, what a fresh prefill over that row's own tokens computes."""
    small, large = pair("llama", 0.2)
    ids, mask = prompts([6, 2], seed=4)
    stats = {}
    tokens, draft, large_backend = decode(
        small,
        large,
        ids,
        mask,
        mode="verified",
        max_new=14,
        eos=torch.tensor([], dtype=torch.long),
        pad=0,
        fires=None,
        draft=4,
        stats=stats,
    )
    assert 0 < stats["accepted"] < stats["drafted"]  # some drafts were rejected and rolled back
    assert torch.equal(tokens, large.generate(ids, attention_mask=mask, max_new_tokens=14, eos_token_id=[]))
    spec = draft.spec
    for model, cache, n in (
        (small, draft.cache, min(draft.seen, spec.length)),
        (large, spec.cache, spec.length),
    ):
        for row in range(2):
            valid = spec.key_valid[row, :n].nonzero()[:, 0]
            own = tokens[row, ids.shape[1] - int(mask[row].sum()) :][: len(valid)]  # prompt, then new tokens
            assert torch.equal(spec.slot_tokens[row, valid], own)
            ref = fresh_cache(model, own[None], torch.ones(1, len(valid), dtype=torch.bool))
            for layer in range(model.info.num_layers):
                for got, want in ((cache.k, ref.k), (cache.v, ref.v)):
                    assert float((got[layer][row][:, valid] - want[layer][0]).abs().max()) < 1e-4


def test_report_and_shares():
    small, large = pair("llama", None)
    ids, mask = prompts([4, 4], seed=9)
    casc = effx.cascade(small, large, EntropyGate(threshold=median_entropy(small, ids, mask)))
    runs = [{}, {}]
    for stats in runs:
        casc.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[], stats=stats)
    small_total = sum(r["small_tokens"] for r in runs)
    large_total = sum(r["large_tokens"] for r in runs)
    assert small_total + large_total == 2 * 2 * 8
    assert casc.shares() == pytest.approx({"small": small_total / 32, "large": large_total / 32})
    assert sum(casc.shares().values()) == pytest.approx(1.0)
    text = casc.report(file=None)
    assert f"small {small_total / 32:.1%} ({small_total})" in text
    assert f"large {large_total / 32:.1%} ({large_total})" in text
    assert "2 generate call(s), 32 tokens" in text


# -- calibration ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate_type", [EntropyGate, MaxProbGate])
@pytest.mark.parametrize("share", [0.0, 0.15, 0.4, 1.0])
def test_calibration_hits_the_share(gate_type, share):
    small, large = pair("llama", None)
    casc = effx.cascade(small, large, gate_type(threshold=0.5))
    calibrated, report = casc.calibrate(TEXTS, CountingTokenizer(), share, seq_len=32, progress=False)
    assert isinstance(calibrated, Cascade) and calibrated.gate.threshold == report.threshold
    assert casc.gate.threshold == 0.5  # functional: the original cascade is unchanged
    # the share on the calibration text, measured here independently of calibrate()
    ids = [t for text in TEXTS for t in CountingTokenizer()(text).input_ids + [2]]
    chunks = torch.tensor(ids[: len(ids) // 32 * 32]).reshape(-1, 32)
    probs = small(chunks).float().softmax(-1)
    if gate_type is EntropyGate:
        fired = torch.special.entr(probs).sum(-1) >= report.threshold
    else:
        fired = probs.amax(-1) <= report.threshold
    assert report.tokens == chunks.numel()
    assert abs(float(fired.double().mean()) - share) <= 2 / chunks.numel()
    assert report.observed_share == pytest.approx(float(fired.double().mean()), abs=1 / chunks.numel())


def test_calibration_from_the_gate_percentile(capsys):
    small, large = pair("llama", None)
    casc = effx.cascade(small, large, EntropyGate(percentile=70))
    with pytest.raises(CascadeError, match="no threshold"):
        casc.generate(torch.tensor([[5, 6]]), max_new_tokens=2)
    calibrated, report = casc.calibrate(TEXTS, CountingTokenizer(), seq_len=32)
    assert "calibrate gate" in capsys.readouterr().err  # the progress bar
    assert report.share == pytest.approx(0.3) and report.observed_share == pytest.approx(0.3, abs=0.02)
    assert "observed share" in report.format()
    out = calibrated.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, eos_token_id=[])
    assert out.shape == (1, 7)
    _, low = effx.cascade(small, large, MaxProbGate(percentile=20)).calibrate(
        TEXTS, CountingTokenizer(), seq_len=32, progress=False
    )
    assert low.share == pytest.approx(0.2)


# -- errors -----------------------------------------------------------------------------------------------------


def test_mismatched_vocabularies():
    small = effx.transform(tiny_model("llama", seed=0, layers=1, vocab=128))
    _, large = pair("llama", None)
    with pytest.raises(CascadeError, match="vocabulary has 128 tokens and the large model's 96"):
        effx.cascade(small, large, EntropyGate(threshold=1.0))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: EntropyGate(percentile=101), r"percentile must be in \[0, 100\]"),
        (lambda: EntropyGate(percentile=-1), r"percentile must be in \[0, 100\]"),
        (lambda: EntropyGate(threshold=-0.1), r"threshold must be in \[0, inf\]"),
        (lambda: EntropyGate(threshold=float("nan")), "threshold must be a number"),
        (lambda: MaxProbGate(threshold=1.5), r"threshold must be in \[0, 1\]"),
        (lambda: MaxProbGate(threshold="0.5"), "threshold must be a number"),
        (lambda: EntropyGate(), "needs a threshold or a percentile"),
    ],
)
def test_bad_gate_arguments(make, match):
    with pytest.raises(CascadeConfigError, match=match):
        make()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="fast"), "unknown cascade mode 'fast'"),
        (dict(mode="verified", draft=0), "draft must be an integer >= 1"),
        (dict(mode="verified", draft=2.5), "draft must be an integer >= 1"),
        (dict(mode="verified", draft=-1), "draft must be an integer >= 1"),
        (dict(mode="verified", draft="abc"), "draft must be an integer >= 1"),
        (dict(mode="verified", draft=10**7), r"draft=10000000 exceeds the models' max_positions - 1"),
        (dict(mode="verified", adaptive="yes"), "adaptive must be True or False"),
        (dict(gate="entropy"), "gate must be an EntropyGate or a MaxProbGate"),
        (dict(), "gated mode needs a gate"),
    ],
)
def test_bad_cascade_arguments(kwargs, match):
    small, large = pair("llama", None)
    with pytest.raises(CascadeConfigError, match=match):
        effx.cascade(small, large, **kwargs)


def test_bad_inputs_and_programs():
    small, large = pair("llama", None)
    with pytest.raises(CascadeConfigError, match="must be an effx Program"):
        effx.cascade(small, tiny_model("llama"), mode="verified")
    exits = EarlyExit(layers=(0,), thresholds=(0.5,)).apply(large).program
    with pytest.raises(CascadeError, match="large Program has exit stages"):
        effx.cascade(small, exits, mode="verified")
    casc = effx.cascade(small, large, mode="verified")
    with pytest.raises(GenerationInputError, match="do_sample=False"):
        casc.generate(torch.tensor([[5, 6]]), max_new_tokens=2, do_sample=True)
    with pytest.raises(GenerationInputError, match="left-padded"):
        casc.generate(torch.tensor([[5, 6]]), attention_mask=torch.tensor([[1, 0]]), max_new_tokens=2)
    with pytest.raises(GenerationInputError, match="max_new_tokens must be >= 1"):
        casc.generate(torch.tensor([[5, 6]]), max_new_tokens=0)
    with pytest.raises(GenerationInputError, match="exceeds the 256 positions"):
        casc.generate(torch.tensor([[5, 6]]), max_new_tokens=255)
    gated = effx.cascade(small, large, EntropyGate(threshold=1.0))
    with pytest.raises(CascadeConfigError, match=r"share must be in \[0, 1\]"):
        gated.calibrate(TEXTS, CountingTokenizer(), 1.5)
    with pytest.raises(CascadeConfigError, match="at least seq_len=128 tokens"):
        gated.calibrate(["short"], CountingTokenizer(), 0.2)
    with pytest.raises(CascadeConfigError, match="needs share="):
        gated.calibrate(TEXTS, CountingTokenizer())
