"""Mamba capture, dense decode, lossy exits with deferred state, self-speculative with state rollback."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import effx
from effx.errors import GenerationInputError, PassError, UnsupportedModelError
from effx.passes import EarlyExit, TokenDrop
from effx.runtime.recurrent import CHUNK, run_layer

V = 96


def tiny_mamba(d=32, layers=5, state=8, kernel=4, seed=0):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    cfg = MambaConfig(
        vocab_size=V,
        hidden_size=d,
        num_hidden_layers=layers,
        state_size=state,
        expand=2,
        conv_kernel=kernel,
        # untied and wide: a random tied model repeats one token
        tie_word_embeddings=False,
        initializer_range=0.5,
    )
    return MambaForCausalLM(cfg).eval()


def prompts(lengths, seed=0):
    """Left-padded prompts (padding id 0)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, V, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def mamba():
    return tiny_mamba()


@pytest.fixture(scope="module")
def dense(mamba):
    return effx.capture_mamba(mamba)


def test_logits_across_chunks(mamba, dense):
    ids = torch.randint(1, V, (2, 2 * CHUNK + 5))
    with torch.no_grad():
        ref = mamba(input_ids=ids).logits
    # the closed-form scan rounds differently from the model's step-by-step one: within 1e-4 of the logit scale
    assert (dense.logits(ids) - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert len(dense.layers) == 5 and "RecurrentProgram(MambaForCausalLM, 5 layers)" == repr(dense)


@settings(max_examples=6, deadline=None)
@given(
    shape=st.sampled_from([(32, 2, 8, 4), (16, 3, 4, 2), (48, 1, 16, 3)]),
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=3),
    new=st.integers(1, 10),
    seed=st.integers(0, 3),
)
def test_dense_decode_equals_model_generate(shape, lengths, new, seed):
    d, layers, state, kernel = shape
    model = tiny_mamba(d, layers, state, kernel, seed=seed)
    program = effx.capture_mamba(model)
    ids, mask = prompts(lengths, seed)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert torch.equal(program.generate(ids, mask, max_new_tokens=new), ref)


def _states_close(got, ref) -> bool:
    """Every layer's conv and SSM state within 1e-4 of the dense run's scale: the runs differ only in how the
    tokens were grouped into layer calls, which rounds differently."""
    pairs = [*zip(got.conv, ref.conv, strict=True), *zip(got.ssm, ref.ssm, strict=True)]
    return all(float((g - r).abs().max()) <= 1e-4 * (1 + float(r.abs().max())) for g, r in pairs)


def _exit_oracle(program, sequence, start: int):
    """The token each position from ``start`` emits under the exit rule, from a dense run's hidden states."""
    with torch.no_grad():
        return _exit_tokens(program, sequence, start)


def _exit_tokens(program, sequence, start: int):
    states = program.new_states(1)
    hidden = program.embed(sequence)[0]
    per_layer = []
    for i in range(program.info.num_layers):
        hidden = run_layer(program.run, states, i, hidden, torch.ones(1, sequence.shape[1]))[0]
        per_layer.append(hidden)
    out, layers = [], []
    for t in range(start, sequence.shape[1]):
        token, depth = None, program.info.num_layers - 1
        for e, threshold in sorted(program.exits.thresholds.items()):
            logits, confidence = program.exits.stage(per_layer[e][:, t : t + 1])
            if float(confidence[0, 0]) >= threshold:
                token, depth = int(logits[0, 0].argmax()), e
                break
        if token is None:
            token = int(program.head(per_layer[-1][:, t : t + 1])[0][0, 0].argmax())
        out.append(token)
        layers.append(depth)
    return out, layers


@pytest.mark.parametrize("thresholds", [(0.4, 0.3), (0.6, 0.4), (0.0, 0.0)])
def test_lossy_exits_keep_exact_state(mamba, thresholds):
    program = effx.transform_mamba(mamba, [EarlyExit(layers=(0, 2), thresholds=thresholds)])
    ids, mask = prompts([7, 12])
    stats = {}
    out = program.generate(ids, mask, max_new_tokens=14, eos_token_id=[], stats=stats)
    for r in range(2):
        prompt = ids[r : r + 1, mask[r].bool()]
        held = torch.tensor([stats["run_tokens"][r]])
        sequence = torch.cat([prompt, held], dim=1)
        # every layer's state is that of a dense run over the same tokens: the skipped layers caught up
        assert _states_close(stats["states"][r], program.prefill_states(sequence))
        assert not _states_close(stats["states"][r], program.prefill_states(sequence[:, :-1]))
        # each token is the one its exit gives on the dense hidden states
        expected, _ = _exit_oracle(program, sequence, prompt.shape[1])
        assert out[r, ids.shape[1] + 1 :].tolist() == expected
    if thresholds != (0.0, 0.0):
        assert (
            len(stats["exits"]) == 3
        )  # tokens left at both exits and the end: waiting ones were taken along


def test_never_exiting_is_dense(mamba, dense):
    program = effx.transform_mamba(mamba, "early-exit{layers=1,3 thresholds=2.0}")
    ids, mask = prompts([9, 4])
    ref = dense.generate(ids, mask, max_new_tokens=10)
    assert torch.equal(program.generate(ids, mask, max_new_tokens=10), ref)


@pytest.mark.parametrize(
    ("layer", "threshold", "draft"), [(0, 0.0, 4), (2, 0.2, 3), (3, 0.0, 1), (1, 0.3, 6)]
)
def test_self_speculative_is_dense_with_rolled_back_state(mamba, dense, layer, threshold, draft):
    program = effx.transform_mamba(
        mamba, [EarlyExit(layers=(layer,), thresholds=(threshold,), mode="self-speculative", draft=draft)]
    )
    ids, mask = prompts([6, 11, 3], seed=1)
    stats = {}
    out = program.generate(ids, mask, max_new_tokens=15, stats=stats)
    assert torch.equal(out, dense.generate(ids, mask, max_new_tokens=15))
    assert stats["rounds"] > 0 and 0 <= stats["accepted"] < stats["drafted"]  # some drafts were rejected
    for r in range(3):
        prompt = ids[r : r + 1, mask[r].bool()]
        sequence = torch.cat([prompt, torch.tensor([stats["run_tokens"][r]], dtype=torch.long)], dim=1)
        assert _states_close(stats["states"][r], program.prefill_states(sequence))


def test_stop_token_ends_a_speculative_row(mamba, dense):
    program = effx.transform_mamba(mamba, "early-exit{layers=2 thresholds=0 mode=self-speculative draft=5}")
    ids, mask = prompts([8])
    free = dense.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    stop = int(free[0, ids.shape[1] + 4])
    ref = dense.generate(ids, mask, max_new_tokens=12, eos_token_id=[stop])
    assert torch.equal(program.generate(ids, mask, max_new_tokens=12, eos_token_id=[stop]), ref)


def test_refusals_name_the_pass_and_architecture(mamba):
    with pytest.raises(PassError, match="token-drop.*MambaForCausalLM.*recurrent"):
        effx.transform_mamba(mamba, [TokenDrop(at_layers=(1,))])
    with pytest.raises(PassError, match="saturation.*MambaForCausalLM"):
        effx.transform_mamba(mamba, [EarlyExit(layers=(1,), measure="saturation")])
    with pytest.raises(PassError, match="out of range.*MambaForCausalLM"):
        effx.transform_mamba(mamba, [EarlyExit(layers=(4,))])
    with pytest.raises(UnsupportedModelError, match="recurrent.*use effx.transform_mamba"):
        effx.capture(mamba)
    with pytest.raises(UnsupportedModelError, match="not one of mamba"):
        effx.capture_mamba(effx.testing.tiny_model("llama"))


def test_generate_input_errors(dense):
    ids = torch.tensor([[5, 6, 0]])
    with pytest.raises(GenerationInputError, match="left-padded"):
        dense.generate(ids, torch.tensor([[1, 1, 0]]))
    with pytest.raises(GenerationInputError, match="no tokens"):
        dense.generate(ids, torch.tensor([[0, 0, 0]]))
    with pytest.raises(GenerationInputError, match="max_new_tokens"):
        dense.generate(ids, max_new_tokens=0)
    with pytest.raises(GenerationInputError, match="2-D"):
        dense.generate(ids[0])


@settings(max_examples=8, deadline=None)
@given(
    layer=st.integers(0, 3),
    threshold=st.sampled_from([0.0, 0.1, 0.3, 0.6]),
    draft=st.integers(1, 6),
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=2),
    new=st.integers(1, 16),
    seed=st.integers(0, 3),
)
def test_self_speculative_property(mamba, dense, layer, threshold, draft, lengths, new, seed):
    """Any exit, threshold and draft length: the dense tokens, and states equal to a dense run's."""
    program = effx.transform_mamba(
        mamba, [EarlyExit(layers=(layer,), thresholds=(threshold,), mode="self-speculative", draft=draft)]
    )
    ids, mask = prompts(lengths, seed)
    stats = {}
    out = program.generate(ids, mask, max_new_tokens=new, eos_token_id=[], stats=stats)
    assert torch.equal(out, dense.generate(ids, mask, max_new_tokens=new, eos_token_id=[]))
    for r in range(len(lengths)):
        prompt = ids[r : r + 1, mask[r].bool()]
        sequence = torch.cat([prompt, torch.tensor([stats["run_tokens"][r]], dtype=torch.long)], dim=1)
        assert _states_close(stats["states"][r], program.prefill_states(sequence))


def test_early_exit_report_on_mamba(mamba):
    program = effx.transform_mamba(mamba, "early-exit{layers=2,0 thresholds=0.5,0.7}")
    (report,) = program.reports
    assert report.name == "early-exit" and report.modified
    assert sorted(site for site, _ in report.changed) == ["layer.0", "layer.2"]
    assert program.exits.thresholds == {2: 0.5, 0: 0.7}
    assert any("FLOPs/token not counted" in n for n in report.notes)
    assert [p["name"] for p in program.passes] == ["early-exit"]
