import copy

import pytest
import torch
from conftest import left_padded_batch, tiny_model
from hypothesis import given
from hypothesis import strategies as st

import effx
from effx.errors import PassConfigError, PassError
from effx.passes import EarlyExit, parse_pipeline
from effx.runtime.early_exit import ExitDecoder
from effx.runtime.forward import KVCache, MaskCache, positions_from_mask, run_step
from effx.runtime.torch_backend import torch_backend


@pytest.fixture(scope="module")
def model4():
    return tiny_model("llama", layers=4, seed=1)


@pytest.fixture(scope="module")
def dense4(model4):
    return effx.transform(model4)


def test_graph_after_the_pass(dense4):
    prog = EarlyExit(layers=(2, 0), thresholds=(0.5, 0.7)).apply(dense4).program
    assert [s.name for s in prog] == [
        "embed",
        "layer.0",
        "exit.0",
        "layer.1",
        "layer.2",
        "exit.2",
        "layer.3",
        "head",
    ]
    assert prog.exits[0].attrs == {
        "threshold": 0.7,
        "measure": "softmax-max",
    }  # thresholds follow their layers
    assert prog.exits[2].attrs["threshold"] == 0.5
    gm = prog.exits[2].graph
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["hidden", "prev_hidden"]
    roles = prog.exits[2].role_counts()
    assert roles["lm_head"] == 1 and roles["exit.confidence"] >= 1
    assert all(
        n.meta.get("effx_pass") == "early-exit"
        for n in gm.graph.nodes
        if n.meta.get("effx_role") == "exit.confidence"
    )
    # the exit shares the head's weights; nothing is copied
    assert gm.lm_head.weight.data_ptr() == dense4.head.graph.lm_head.weight.data_ptr()
    # the dense program is untouched
    assert not dense4.exits and len(dense4.stages) == 6


@pytest.mark.parametrize("measure", ["softmax-max", "top2-gap", "entropy", "saturation"])
def test_confidence_numbers(dense4, measure):
    prog = EarlyExit(layers=(1,), measure=measure).apply(dense4).program
    hidden, prev = torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    logits, conf = prog.exits[1].graph(hidden, prev)
    assert torch.equal(logits, dense4.head.graph(hidden)[0])
    p = logits.softmax(-1)
    expected = {
        "softmax-max": p.max(-1).values,
        "top2-gap": p.topk(2).values[..., 0] - p.topk(2).values[..., 1],
        "entropy": 1 + (p * p.log()).sum(-1) / torch.log(torch.tensor(96.0)),
        "saturation": torch.nn.functional.cosine_similarity(hidden, prev, dim=-1),
    }[measure]
    torch.testing.assert_close(conf, expected)


@given(
    kind=st.sampled_from(["llama", "qwen2"]),
    layers=st.integers(2, 4),
    exit_layer=st.integers(0, 2),
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    seed=st.integers(0, 1000),
)
def test_thresholds_that_never_fire_give_dense_tokens(kind, layers, exit_layer, lengths, seed):
    model = tiny_model(kind, layers=layers, seed=seed)
    exit_layer = min(exit_layer, layers - 2)
    ids, mask = left_padded_batch(lengths, 96, seed)
    dense = effx.transform(model).generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    prog = effx.transform(
        model, passes=[EarlyExit(layers=(exit_layer,), thresholds=(1.01,), measure="softmax-max")]
    )
    assert torch.equal(prog.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]), dense)


@given(
    kind=st.sampled_from(["llama", "mistral", "qwen2", "gemma3"]),
    layers=st.integers(2, 4),
    exit_layer=st.integers(0, 2),
    draft=st.integers(1, 5),
    threshold=st.sampled_from([0.0, 0.3]),
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    seed=st.integers(0, 1000),
)
def test_self_speculative_is_dense_greedy(kind, layers, exit_layer, draft, threshold, lengths, seed):
    model = tiny_model(kind, layers=layers, seed=seed)
    exit_layer = min(exit_layer, layers - 2)
    ids, mask = left_padded_batch(lengths, 96, seed)
    dense = effx.transform(model).generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    ee = EarlyExit(layers=(exit_layer,), mode="self-speculative", draft=draft, thresholds=(threshold,))
    stats = {}
    out = effx.transform(model, passes=[ee]).generate(
        ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], stats=stats
    )
    assert torch.equal(out, dense)
    assert stats["rounds"] >= 1 and 0 <= stats["accepted"] <= stats["drafted"]


def test_self_speculative_with_stop_tokens(model4, dense4):
    ids = torch.tensor([[5, 17, 33, 8]])
    free = dense4.generate(ids, max_new_tokens=10, eos_token_id=[])
    stop = int(free[0, 7])
    ref = dense4.generate(ids, max_new_tokens=10, eos_token_id=stop)
    prog = effx.transform(model4, passes="early-exit{layers=1 mode=self-speculative draft=4 thresholds=0}")
    assert torch.equal(prog.generate(ids, max_new_tokens=10, eos_token_id=stop), ref)


def test_deferred_kv_equals_dense_kv(dense4):
    """Tokens that exit early get their deeper keys/values later; every filled entry is the dense one."""
    always0, always2, never = (
        EarlyExit(layers=(0, 2), thresholds=t).apply(dense4).program
        for t in ((0.0, 2.0), (2.0, 0.0), (2.0, 2.0))
    )
    schedule = [
        always0,
        always0,
        always2,
        always0,
        never,
        always2,
        always0,
        never,
    ]  # exit after 1, 3 or 4 layers
    ids, mask = left_padded_batch([4, 6], 96, seed=5)
    tokens = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(0))  # teacher-forced
    batch, prompt = ids.shape
    key_valid = torch.cat([mask.bool(), torch.ones(2, 8, dtype=torch.bool)], 1)
    cache = KVCache.for_program(dense4, batch, prompt + 8)
    positions = positions_from_mask(mask)
    filled = []
    with torch.inference_mode():
        run_step(dense4, cache, ids, positions, key_valid[:, :prompt])
        decoder = ExitDecoder(always0, cache)
        for j, prog in enumerate(schedule):
            decoder.backend = torch_backend(prog)
            masks = MaskCache(prog, key_valid[:, : prompt + j + 1], torch.float32)
            decoder.step(tokens[:, j : j + 1], positions[:, -1:] + 1 + j, masks)
            filled.append(list(cache.lengths))
    assert filled[3] == [prompt + 4, prompt + 3, prompt + 3, prompt]  # the deeper layers lag behind
    assert filled[4] == [prompt + 5] * 4  # a token that goes all the way carries the others along
    full = torch.cat([ids, tokens], 1)
    full_mask = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], 1)
    ref = KVCache.for_program(dense4, batch, prompt + 8)
    with torch.inference_mode():
        run_step(dense4, ref, full, positions_from_mask(full_mask), full_mask.bool())
    # padding slots are never attended to (their contents depend on how many keys a step had): skip them;
    # real entries agree up to float reassociation between multi-token and single-token steps
    for i in range(4):
        n = cache.lengths[i]
        real = key_valid[:, :n]
        for kv, kv_ref in ((cache.k[i], ref.k[i]), (cache.v[i], ref.v[i])):
            got, want = kv[:, :, :n].transpose(1, 2)[real], kv_ref[:, :, :n].transpose(1, 2)[real]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_always_exiting_equals_the_truncated_model(model4, dense4):
    """With exact KV, exiting every token after layer 1 is greedy decoding with a 2-layer model. (The first
    new token comes from the prefill, which runs every layer anyway, so it is the full model's.)"""
    truncated = copy.deepcopy(model4)
    truncated.model.layers = truncated.model.layers[:2]
    truncated.config.num_hidden_layers = 2
    ids, mask = left_padded_batch([3, 6], 96, seed=2)
    first = dense4.generate(ids, attention_mask=mask, max_new_tokens=1)
    mask1 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        ref = truncated.generate(first, attention_mask=mask1, max_new_tokens=7, do_sample=False)
    prog = effx.transform(model4, passes=[EarlyExit(layers=(1,), thresholds=(0.0,))])
    stats = {}
    out = prog.generate(ids, attention_mask=mask, max_new_tokens=8, stats=stats)
    assert torch.equal(out, ref)
    assert all(d == [2, 2] for d in stats["exit_layers"])


def test_every_places_exits(dense4):
    prog = EarlyExit(every=2).apply(dense4).program
    assert sorted(prog.exits) == [1]
    assert parse_pipeline("early-exit{layers=0,2 measure=entropy thresholds=0.5,0.6}")[0] == EarlyExit(
        layers=(0, 2), measure="entropy", thresholds=(0.5, 0.6)
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one of layers"),
        (dict(layers=(1,), every=2), "exactly one of layers"),
        (dict(layers=(1, 1)), "repeat"),
        (dict(layers=(-1,)), ">= 0"),
        (dict(layers=(1,), measure="vibes"), "unknown early-exit measure 'vibes'"),
        (dict(layers=(1, 2), thresholds=(0.1, 0.2, 0.3)), "2 exits but 3 thresholds"),
        (dict(layers=(1,), mode="fast"), "unknown early-exit mode"),
        (dict(layers=(1,), draft=0), "draft must be"),
        (dict(every=0), "every must be"),
        (dict(every=2, thresholds=(0.1, 0.2)), "one threshold for all"),
        (dict(layers=(1,), head="trained"), "needs heads=<file>"),
        (dict(layers=(1,), head="tiny"), "must be .shared. or .trained."),
        (dict(layers=(1,), heads="x.safetensors"), "only used with head=.trained."),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(PassConfigError, match=match):
        EarlyExit(**kwargs)


@pytest.mark.parametrize("layer", [3, 7])
def test_layers_out_of_range_including_the_last(model4, layer):
    with pytest.raises(PassError, match=r"out of range: exits go after layers 0\.\.2"):
        effx.transform(model4, passes=[EarlyExit(layers=(layer,))])


def test_exits_twice_is_an_error(model4):
    with pytest.raises(PassError, match="already placed exits"):
        effx.transform(model4, passes="early-exit{layers=1}, early-exit{layers=2}")


def test_self_speculative_samples_reproducibly(model4):
    prog = effx.transform(model4, passes="early-exit{layers=1 mode=self-speculative}")
    runs = [
        prog.generate(torch.tensor([[5, 6]]), max_new_tokens=6, do_sample=True, seed=2, eos_token_id=[])
        for _ in range(2)
    ]
    assert runs[0].shape == (1, 8) and torch.equal(runs[0], runs[1])


def test_plan_with_exits_round_trips_and_validates(dense4):
    import json

    from effx import Plan, PlanError
    from effx.plan import EarlyExitPolicy

    prog = EarlyExit(layers=(1,), thresholds=(0.8,), mode="self-speculative", draft=3).apply(dense4).program
    plan = Plan.from_json(prog.plan.to_json())
    assert plan == prog.plan
    assert plan.policy.early_exit == EarlyExitPolicy("self-speculative", draft=3, measure="softmax-max")
    assert json.loads(prog.plan.to_json())["policy"] == {
        "early_exit": {"mode": "self-speculative", "draft": 3, "measure": "softmax-max", "kv": "deferred"}
    }
    data = json.loads(prog.plan.to_json())
    data["stages"].insert(1, data["stages"].pop(3))  # move exit.1 before layer.0
    with pytest.raises(PlanError, match="must directly follow layer 1"):
        Plan.from_dict(data)
    data = json.loads(prog.plan.to_json())
    del data["stages"][3]["attrs"]["threshold"]
    with pytest.raises(PlanError, match="no numeric threshold"):
        Plan.from_dict(data)


def test_kv_projection_keeps_only_what_keys_and_values_need(dense4):
    from effx.runtime.torch_backend import kv_projection

    layer = dense4.layers[2].graph
    kv = kv_projection(layer)
    roles = {n.meta.get("effx_role") for n in kv.graph.nodes if n.op == "call_function"}
    assert {"attn.k", "attn.v", "norm"} <= roles
    assert not roles & {"attn.q", "attn.sdpa", "attn.o", "mlp.gate", "mlp.up", "mlp.down"}
    hidden, rope = torch.randn(2, 3, 64), torch.randn(2, 3, 16)
    past = torch.zeros(2, 2, 0, 16)
    _, k, v = layer(hidden, rope, rope, torch.zeros(2, 1, 3, 3), past, past)
    k2, v2 = kv(hidden, rope, rope, None, None, None)
    assert torch.equal(k, k2) and torch.equal(v, v2)


def test_state_copying_fills_every_layer_at_once(model4, dense4):
    ids, mask = left_padded_batch([4, 6], 96, seed=5)
    never = effx.transform(model4, passes=[EarlyExit(layers=(1,), thresholds=(2.0,), kv="copy")])
    dense = dense4.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(never.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[]), dense)
    prog = EarlyExit(layers=(1,), thresholds=(0.0,), kv="copy").apply(dense4).program
    batch, prompt = ids.shape
    key_valid = torch.cat([mask.bool(), torch.ones(2, 4, dtype=torch.bool)], 1)
    cache = KVCache.for_program(prog, batch, prompt + 4)
    positions = positions_from_mask(mask)
    with torch.inference_mode():
        run_step(prog, cache, ids, positions, key_valid[:, :prompt])
        decoder = ExitDecoder(prog, cache, copy=True)
        for j in range(4):
            masks = MaskCache(prog, key_valid[:, : prompt + j + 1], torch.float32)
            _, depth = decoder.step(torch.full((2, 1), 7 + j), positions[:, -1:] + 1 + j, masks)
            assert depth.tolist() == [2, 2] and len(set(cache.lengths)) == 1 and not decoder.pending


def test_kv_copy_is_lossy_only():
    with pytest.raises(PassConfigError, match="only applies to mode='lossy'"):
        EarlyExit(layers=(1,), kv="copy", mode="self-speculative")
    with pytest.raises(PassConfigError, match="kv must be"):
        EarlyExit(layers=(1,), kv="maybe")


@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
def test_self_speculative_batch_with_holes_keeps_sliding_windows_by_position(kind):
    # rows accept different drafts and leave holes in the shared cache: a window counts positions, not slots
    model = tiny_model(kind, layers=3, seed=773, sliding_window=3)
    ids, mask = left_padded_batch([2, 3, 2], 96, 773)
    dense = effx.transform(model).generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    ee = EarlyExit(layers=(1,), mode="self-speculative", draft=3, thresholds=(0.0,))
    stats = {}
    out = effx.transform(model, passes=[ee]).generate(
        ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], stats=stats
    )
    assert torch.equal(out, dense)
    assert 0 < stats["accepted"] < stats["drafted"]  # some rows rejected what others accepted
