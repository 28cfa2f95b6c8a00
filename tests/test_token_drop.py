import pytest
import torch
from conftest import left_padded_batch, tiny_model
from hypothesis import given
from hypothesis import strategies as st

import effx
from effx.errors import PassConfigError, PassError
from effx.passes import NeuronMask, TokenDrop
from effx.plan import TokenDropPolicy
from effx.runtime.forward import KVCache, attention_masks, positions_from_mask
from effx.runtime.token_drop import drop_prefill, select_tokens

V = 96


@pytest.fixture(scope="module")
def model4():
    return tiny_model("llama", layers=4, seed=7)


@pytest.fixture(scope="module")
def dense4(model4):
    return effx.transform(model4)


def _generate(program, ids, mask, n=5):
    return program.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[])


def test_graph_after_the_pass(dense4):
    prog = TokenDrop(at_layers=(1, 3), keep=(0.6, 0.3)).apply(dense4).program
    names = [s.name for s in prog]
    assert names == [
        "embed",
        "layer.0",
        "score.1",
        "drop.1",
        "layer.1",
        "layer.2",
        "score.3",
        "drop.3",
        "layer.3",
        "head",
    ]
    assert prog.drops[1][0].attrs == {"keep": 0.6, "score": "attention"}
    roles = prog.drops[1][0].role_counts()
    assert roles.get("attn.q") == 1 and roles.get("attn.k") == 1  # cut from layer 1: its q and k only
    assert not any(r.startswith("mlp") or r in ("attn.v", "attn.o") for r in roles)
    gather = [n.target for n in prog.drops[1][1].graph.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.gather.default in gather
    assert prog.plan.policy.token_drop == TokenDropPolicy(protect_last=4, special=(2,))
    full, dropped = effx.flops.prefill_flops(dense4, 64), effx.flops.prefill_flops(prog, 64)
    assert dropped < full
    assert effx.flops.decode_flops(prog) == effx.flops.decode_flops(dense4)


def test_keep_one_is_the_identity(model4, dense4):
    result = TokenDrop(at_layers=(2,), keep=(1.0,)).apply(dense4)
    assert result.program is dense4 and not result.modified


def test_protecting_every_token_gives_dense_tokens(model4, dense4):
    prog = effx.transform(model4, [TokenDrop(at_layers=(1, 2), keep=(0.5, 0.2), protect_last=64)])
    ids, mask = left_padded_batch([9, 5, 7], V, seed=1)
    stats = {}
    out = prog.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], stats=stats)
    assert stats["kept_tokens"] == {1: [9, 5, 7], 2: [9, 5, 7]}
    assert torch.equal(out, _generate(dense4, ids, mask, n=6))


def test_kv_cache_equals_a_dense_run_over_the_kept_tokens(model4, dense4):
    prog = effx.transform(model4, [TokenDrop(at_layers=(2,), keep=(0.5,), protect_last=2)])
    ids, mask = left_padded_batch([12, 8], V, seed=2)
    n = ids.shape[1]
    valid = mask.bool()
    pos = positions_from_mask(mask)
    cache = KVCache.for_program(prog, 2, n + 4)
    with torch.inference_mode():
        drop_prefill(prog, cache, ids, pos, valid)
        dropped = cache.dropped[2]
        assert cache.dropped.keys() == {2, 3} and not bool(cache.dropped[3][~valid].any())
        for row in range(2):
            real = int(valid[row].sum())
            assert int((~dropped[row] & valid[row]).sum()) == (real + 1) // 2  # keep half, rounded up
            # reference: the dense layers 0..1 on the whole prompt, then layers 2..3 on the kept tokens only
            r_ids, r_pos = ids[row : row + 1, -real:], pos[row : row + 1, -real:]
            hidden, cos, sin = dense4.embed.graph(r_ids, r_pos)
            causal = attention_masks(torch.ones(1, real, dtype=torch.bool), 0, real, {None}, hidden.dtype)[
                None
            ]
            empty = torch.zeros(1, dense4.info.num_kv_heads, 0, dense4.info.head_dim)
            for stage in dense4.layers[:2]:
                hidden, _, _ = stage.graph(hidden, cos, sin, causal, empty, empty)
            slots = torch.nonzero(~dropped[row, -real:]).flatten()
            hidden, cos, sin = hidden[:, slots], cos[:, slots], sin[:, slots]
            mask_kept = attention_masks(
                torch.ones(1, len(slots), dtype=torch.bool), 0, len(slots), {None}, hidden.dtype
            )[None]
            for stage in dense4.layers[2:]:
                hidden, k, v = stage.graph(hidden, cos, sin, mask_kept, empty, empty)
                got_k = cache.k[stage.layer][row, :, n - real : n][:, slots]
                torch.testing.assert_close(got_k, k[0], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(
                    cache.v[stage.layer][row, :, n - real : n][:, slots], v[0], rtol=1e-4, atol=1e-5
                )
                gone = cache.k[stage.layer][row, :, n - real : n][:, ~torch.isin(torch.arange(real), slots)]
                assert bool((gone == 0).all())


def test_special_and_last_tokens_are_always_kept(model4):
    prog = effx.transform(model4, [TokenDrop(at_layers=(1,), keep=(0.2,), protect_last=3, special=(5,))])
    ids = torch.tensor([[7, 2, 9, 11, 5, 13, 17, 19, 23, 29, 31, 37]])
    cache = KVCache.for_program(prog, 1, 16)
    with torch.inference_mode():
        drop_prefill(prog, cache, ids, torch.arange(12)[None], torch.ones(1, 12, dtype=torch.bool))
    kept = torch.nonzero(~cache.dropped[1][0]).flatten().tolist()
    assert {1, 4, 9, 10, 11} <= set(kept)  # eos (2) at 1, special 5 at 4, the last three
    assert len(kept) == 5  # ceil(0.2 * 12) = 3 < the 5 protected: protection wins


def test_select_tokens_quota_and_passengers():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.2], [0.0, 0.0, 0.8, 0.1, 0.4]])
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    protected = torch.zeros(2, 5, dtype=torch.bool)
    protected[:, -1] = True
    idx, ok = select_tokens(scores, valid, protected, torch.tensor([3, 1]))
    assert idx[0].tolist() == [1, 2, 4] and ok[0].all()
    assert ok[1].sum() == 1 and idx[1][ok[1]].tolist() == [4]  # quota 1: just the protected last token


@given(
    at=st.lists(st.integers(1, 3), min_size=1, max_size=2, unique=True).map(sorted),
    keep=st.floats(0.2, 0.9),
    lengths=st.lists(st.integers(3, 16), min_size=1, max_size=3),
    score=st.sampled_from(["attention", "norm"]),
    seed=st.integers(0, 30),
)
def test_batches_decode_like_their_rows_alone(at, keep, lengths, score, seed):
    model = tiny_model("llama", layers=4, seed=seed)
    keeps = tuple(round(keep / (i + 1), 3) for i in range(len(at)))
    prog = effx.transform(model, [TokenDrop(at_layers=tuple(at), keep=keeps, score=score, protect_last=1)])
    ids, mask = left_padded_batch(lengths, V, seed=seed)
    batch = _generate(prog, ids, mask, n=4)
    for row, n in enumerate(lengths):
        alone = _generate(prog, ids[row : row + 1, -n:], mask[row : row + 1, -n:], n=4)
        assert torch.equal(alone[0, -4:], batch[row, -4:])


def test_bad_settings(dense4):
    for kwargs, match in [
        (dict(), "needs at_layers"),
        (dict(at_layers=(0,)), "integers >= 1"),
        (dict(at_layers=(2, 1)), "must increase"),
        (dict(at_layers=(1,), keep=(0.0,)), "would leave no tokens"),
        (dict(at_layers=(1, 2), keep=(0.3, 0.6)), "cannot grow"),
        (dict(at_layers=(1, 2), keep=(0.3, 0.2, 0.1)), "give one, or one each"),
        (dict(at_layers=(1,), score="random"), "unknown token-drop score"),
        (dict(at_layers=(1,), protect_last=0), "protect_last must be >= 1"),
    ]:
        with pytest.raises(PassConfigError, match=match):
            TokenDrop(**kwargs)
    with pytest.raises(PassError, match="out of range"):
        TokenDrop(at_layers=(4,)).apply(dense4)
    core = NeuronMask(mode="core", keep=0.5).apply(dense4).program
    with pytest.raises(PassError, match="both own the prefill"):
        TokenDrop(at_layers=(1,)).apply(core)


def test_perplexity_sees_the_drop(model4, dense4):
    from effx.quality import perplexity

    class Tok:
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=False):
            return type("E", (), {"input_ids": [int(t) % V for t in text.split()]})()

    texts = [" ".join(str((i * 5 + j * 11) % V) for j in range(70)) for i in range(2)]
    dense = perplexity(dense4, texts, Tok(), seq_len=32, max_tokens=64)
    kept_all = effx.transform(model4, [TokenDrop(at_layers=(1,), keep=(0.3,), protect_last=32)])
    assert perplexity(kept_all, texts, Tok(), seq_len=32, max_tokens=64) == pytest.approx(dense, rel=1e-5)
    dropped = effx.transform(model4, [TokenDrop(at_layers=(1,), keep=(0.3,), protect_last=1)])
    assert perplexity(dropped, texts, Tok(), seq_len=32, max_tokens=64) != pytest.approx(dense, rel=1e-3)


@pytest.mark.parametrize(
    "pipeline, failing, earlier",
    [
        ("token-drop{at_layers=1 keep=0.5}, neuron-mask{mode=core keep=0.5 score=random}", "neuron-mask", "token-drop"),
        ("neuron-mask{mode=core keep=0.5 score=random}, token-drop{at_layers=1 keep=0.5}", "token-drop", "neuron-mask"),
    ],
)
def test_token_drop_and_core_neurons_are_refused_in_either_order(model4, pipeline, failing, earlier):
    """Both choose what the prefill computes. Token drop then core neurons used to be accepted, and generate
    silently ignored the core neurons while effx.quality used them. Refused before anything runs, naming the
    pass that cannot apply and the one before it."""
    from effx.errors import PassPreconditionError

    with pytest.raises(PassPreconditionError, match=rf"'{failing}' \(#2; after: {earlier}\) cannot apply:.*both own the prefill"):
        effx.transform(model4, pipeline)


def test_a_plan_with_token_drop_and_core_neurons_is_malformed(dense4):
    import dataclasses

    from effx.errors import PlanError
    from effx.plan import NeuronMaskPolicy

    drop = TokenDrop(at_layers=(1,), keep=(0.5,)).apply(dense4).program
    policy = dataclasses.replace(drop.plan.policy, neuron_mask=NeuronMaskPolicy(mode="core"))
    with pytest.raises(PlanError, match="both choose what the prefill computes"):
        dataclasses.replace(drop.plan, policy=policy).validate()
