import json

import pytest
import torch
from conftest import left_padded_batch, tiny_model
from hypothesis import given
from hypothesis import strategies as st

import effx
from effx.errors import ArtifactError, PassConfigError, PassError
from effx.passes import EarlyExit, VocabReduce, parse_pipeline
from effx.runtime.vocab import exit_logits, head_logits, select_vocab
from effx.vocab import VocabProfile, calibrate_vocab, load_vocab, subset_ids

V = 96


@pytest.fixture(scope="module")
def model4():
    return tiny_model("llama", layers=4, seed=3)


@pytest.fixture(scope="module")
def dense4(model4):
    return effx.transform(model4)


def _vocab_file(tmp_path, ids, name="vocab.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"ids": [int(i) for i in ids]}))
    return str(path)


def _generate(program, ids, mask, n=6, **kw):
    return program.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[], **kw)


# -- where="exits" --------------------------------------------------------------------------------------


def test_pruned_exit_graph_scores_only_the_given_rows(dense4):
    prog = VocabReduce(k=8).apply(EarlyExit(layers=(0, 1, 2)).apply(dense4).program).program
    first, pruned = prog.exits[0], prog.exits[1]
    assert (
        first.attrs.get("vocab") is None
        and pruned.attrs["vocab"] == "pruned"
        and pruned.attrs["vocab_k"] == 8
    )
    assert pruned.spec.inputs == ("hidden", "prev_hidden", "vocab_ids")
    targets = [n.target for n in pruned.graph.graph.nodes if n.meta.get("effx_pass") == "vocab-reduce"]
    assert torch.ops.aten.embedding.default in targets and torch.ops.aten.scatter.src in targets
    assert torch.ops.aten.linear.default not in [n.target for n in pruned.graph.graph.nodes]
    # the same numbers as the full head on the kept rows, -inf elsewhere
    hidden, prev = torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    ids = torch.stack([torch.randperm(V)[:8] for _ in range(2)])
    full, _ = EarlyExit(layers=(0, 1, 2)).apply(dense4).program.exits[1].graph(hidden, prev)
    logits, conf = pruned.graph(hidden, prev, ids)
    kept = torch.zeros(2, 1, V, dtype=torch.bool).scatter(2, ids[:, None], True)
    torch.testing.assert_close(logits[kept], full[kept])
    assert torch.isinf(logits[~kept]).all()
    torch.testing.assert_close(conf, logits.softmax(-1).amax(-1))


def test_k_equal_to_vocab_is_the_identity(model4, dense4, tmp_path):
    ee = EarlyExit(layers=(0, 2)).apply(dense4).program
    result = VocabReduce(k=V).apply(ee)
    assert not result.modified and result.program is ee
    assert "k = V" in result.report.format()
    vocab = _vocab_file(tmp_path, range(V))
    assert VocabReduce(k=V, where="head", vocab=vocab).apply(dense4).program is dense4
    ids, mask = left_padded_batch([5, 3], V)
    after = effx.transform(model4, [EarlyExit(layers=(0, 2)), VocabReduce(k=V)])
    assert torch.equal(after(ids, mask), ee(ids, mask))


@pytest.mark.parametrize("schedule", ["fixed", "decaying", "adaptive"])
def test_exits_that_never_fire_give_dense_tokens(model4, dense4, schedule):
    prog = effx.transform(
        model4, [EarlyExit(layers=(0, 1, 2), thresholds=(2.0,)), VocabReduce(k=6, schedule=schedule, min_k=2)]
    )
    ids, mask = left_padded_batch([6, 4, 5], V, seed=2)
    assert torch.equal(_generate(prog, ids, mask), _generate(dense4, ids, mask))


def test_runtime_uses_the_schedule(dense4):
    ee = EarlyExit(layers=(0, 1, 2)).apply(dense4).program
    decaying = VocabReduce(k=16, schedule="decaying", min_k=5).apply(ee).program
    assert [decaying.exits[e].attrs["vocab_k"] for e in (1, 2)] == [16, 8]
    logits = torch.randn(3, V)
    first = select_vocab(logits, decaying.exits[1], None)
    assert torch.equal(first, logits.topk(16).indices)
    masked = torch.full((3, V), float("-inf")).scatter(1, first, logits.gather(1, first))
    second = select_vocab(masked, decaying.exits[2], first)
    assert second.shape == (3, 8) and torch.isin(second, first).all()
    fixed = VocabReduce(k=16).apply(ee).program
    assert select_vocab(masked, fixed.exits[2], first) is first  # fixed: the first exit's subset again
    adaptive = VocabReduce(k=16, schedule="adaptive", min_k=3, mass=0.5).apply(ee).program
    peaked = torch.full((2, V), -10.0)
    peaked[:, 7] = 10.0  # one token holds almost all the mass: the subset shrinks to min_k
    assert select_vocab(peaked, adaptive.exits[1], None).shape == (2, 3)
    flat = torch.zeros(2, V)  # uniform: never reaches 0.5 within 16 ids, so all 16
    assert select_vocab(flat, adaptive.exits[1], None).shape == (2, 16)


@given(
    k=st.integers(1, V - 1),
    schedule=st.sampled_from(["fixed", "decaying", "adaptive"]),
    layers=st.integers(3, 5),
    tie=st.booleans(),
    seed=st.integers(0, 50),
)
def test_pruned_exits_match_the_full_head_on_their_rows(k, schedule, layers, tie, seed):
    model = tiny_model("llama", layers=layers, tie=tie, seed=seed)
    prog = effx.transform(model, [EarlyExit(every=1), VocabReduce(k=k, schedule=schedule, min_k=1)])
    full = effx.transform(model, [EarlyExit(every=1)])
    hidden, prev = torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    ids, logits = None, full.exits[0].graph(hidden, prev)[0][:, -1]
    for e in sorted(prog.exits)[1:]:
        ex = prog.exits[e]
        ids = select_vocab(logits, ex, ids)
        assert 1 <= ids.shape[-1] <= ex.attrs["vocab_k"] <= k
        logits, _ = exit_logits(prog, ex, hidden, prev, ids)
        logits = logits[:, -1]
        reference = full.exits[e].graph(hidden, prev)[0][:, -1]
        torch.testing.assert_close(logits.gather(1, ids), reference.gather(1, ids))
        assert int(torch.isfinite(logits).sum()) == ids.numel()


def test_calibration_and_lossy_decoding_with_pruned_exits(model4, dense4):
    prog = effx.transform(model4, [EarlyExit(layers=(0, 1, 2), measure="entropy"), VocabReduce(k=12)])
    ids, mask = left_padded_batch([7, 5], V, seed=4)
    stats = {}
    out = _generate(prog, ids, mask, n=8, stats=stats)
    assert out.shape == (2, 15) and len(stats["exit_layers"]) == 7
    texts = [" ".join(str(i) for i in range(j, j + 40)) for j in range(4)]

    class Tok:  # digits-only text through a stub tokenizer: ids are the numbers themselves, mod V
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=False):
            return type("E", (), {"input_ids": [int(t) % V for t in text.split()]})()

    calibrated, report = prog.calibrate(texts, Tok(), target=0.9, seq_len=16, max_tokens=160)
    assert report.tokens == 160 and 0.9 <= report.agreement <= 1.0
    assert calibrated.exits[1].attrs["vocab"] == "pruned"


def test_exits_need_two_lossy_exits(dense4):
    with pytest.raises(PassError, match="at least two exits"):
        VocabReduce(k=8).apply(EarlyExit(layers=(1,)).apply(dense4).program)
    spec = EarlyExit(layers=(0, 1), mode="self-speculative").apply(dense4).program
    with pytest.raises(PassError, match="where='draft'"):
        VocabReduce(k=8).apply(spec)


# -- where="draft" --------------------------------------------------------------------------------------


@given(
    k=st.integers(3, V),
    exit_layer=st.integers(0, 2),
    draft=st.integers(1, 4),
    lengths=st.sampled_from([[5], [6, 3], [4, 7, 2]]),
)
def test_reduced_draft_keeps_self_speculative_lossless(
    tmp_path_factory, model4, dense4, k, exit_layer, draft, lengths
):
    path = _vocab_file(
        tmp_path_factory.mktemp("v"), torch.randperm(V, generator=torch.Generator().manual_seed(k))
    )
    prog = effx.transform(
        model4,
        [
            VocabReduce(k=k, where="draft", vocab=path),
            EarlyExit(layers=(exit_layer,), mode="self-speculative", draft=draft, thresholds=(0.0,)),
        ],
    )
    ids, mask = left_padded_batch(lengths, V, seed=k)
    assert torch.equal(_generate(prog, ids, mask, n=7), _generate(dense4, ids, mask, n=7))


def test_draft_graph_has_sliced_weights(dense4, tmp_path):
    spec = EarlyExit(layers=(1,), mode="self-speculative").apply(dense4).program
    path = _vocab_file(tmp_path, list(range(10, V)))
    prog = VocabReduce(k=20, where="draft", vocab=path).apply(spec).program
    gm = prog.exits[1].graph
    assert gm.vocab_weight.shape == (20, 64)
    assert 2 in gm.vocab_ids.tolist()  # end-of-sequence is always kept, even when the file ranks it nowhere
    assert gm.vocab_ids.tolist() == sorted([2] + list(range(10, 29)))
    assert not any(t.shape[0] == V for t in gm.buffers() if t.ndim == 2)  # the full head is not held
    with pytest.raises(PassError, match="mode='self-speculative'"):
        VocabReduce(k=20, where="draft", vocab=path).apply(EarlyExit(layers=(1,)).apply(dense4).program)


# -- where="head" ---------------------------------------------------------------------------------------


def test_head_with_fallback_one_is_dense(model4, dense4, tmp_path):
    path = _vocab_file(tmp_path, range(V))
    prog = effx.transform(model4, [VocabReduce(k=30, where="head", vocab=path, fallback=1.0)])
    assert [s.name for s in prog][-2:] == ["head.full", "head"]
    ids, mask = left_padded_batch([6, 4], V, seed=5)
    stats = {}
    assert torch.equal(_generate(prog, ids, mask, stats=stats), _generate(dense4, ids, mask))
    assert stats["head_fallbacks"] == stats["head_positions"] > 0


def test_fallback_recovers_a_best_token_outside_the_subset(dense4, tmp_path):
    g = torch.Generator().manual_seed(0)
    best = 2
    while (
        best == 2
    ):  # end-of-sequence (2) is always in a subset: find a hidden state whose best is another id
        hidden = torch.randn(1, 1, 64, generator=g)
        full = dense4.head.graph(hidden)[0][0, 0]
        best = int(full.argmax())
    outside = [i for i in torch.argsort(full).tolist() if i not in (best, 2)]  # worst first, no best
    path = _vocab_file(tmp_path, outside)
    # a flat subset (the lowest logits): not confident, so the full head decides
    flat = VocabReduce(k=V - 2, where="head", vocab=path, fallback=0.9).apply(dense4).program
    stats = {}
    assert int(head_logits(flat, hidden, stats).argmax()) == best and stats["head_fallbacks"] == 1
    # fallback=0: the subset decides, and the best token is impossible
    result = VocabReduce(k=V - 2, where="head", vocab=path, fallback=0.0).apply(dense4)
    never = result.program
    assert never.full_head is None and "can never be generated" in result.report.format()
    assert int(head_logits(never, hidden).argmax()) != best


@given(seed=st.integers(0, 1000), k=st.integers(2, V - 1), threshold=st.floats(0.05, 0.99))
def test_fallback_rule_errs_only_when_the_mass_outside_is_large(dense4, tmp_path_factory, seed, k, threshold):
    g = torch.Generator().manual_seed(seed)
    path = _vocab_file(tmp_path_factory.mktemp("v"), torch.randperm(V, generator=g))
    prog = VocabReduce(k=k, where="head", vocab=path, fallback=threshold).apply(dense4).program
    hidden = torch.randn(4, 1, 64, generator=g) * 3
    got = head_logits(prog, hidden).argmax(-1)
    full = dense4.head.graph(hidden)[0]
    p = full.softmax(-1)
    ids = prog.head.graph.vocab_ids
    p_out = 1 - p[..., ids].sum(-1)
    wrong = got != full.argmax(-1)
    # documented rule: a token outside the subset beats the subset's pick only if p_out > t / (1 + t)
    assert (p_out[wrong] > threshold / (1 + threshold) - 1e-6).all()


# -- errors, files, order -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must be an integer >= 1"),
        (dict(k=8, where="nowhere"), "where must be one of"),
        (dict(k=8, schedule="linear"), "unknown vocab-reduce schedule"),
        (dict(k=8, where="head"), "needs vocab=<file>"),
        (dict(k=8, vocab="v.json"), "chooses its subset per token"),
        (dict(k=8, where="head", vocab="v.json", schedule="decaying"), "only applies to where='exits'"),
        (dict(k=8, fallback=1.5), "fallback must be in"),
    ],
)
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(PassConfigError, match=match):
        VocabReduce(**kwargs)


def test_k_above_vocabulary_is_an_error(dense4):
    ee = EarlyExit(layers=(0, 1)).apply(dense4).program
    with pytest.raises(PassError, match=f"k=97 exceeds the vocabulary size {V}"):
        VocabReduce(k=97).apply(ee)


def test_bad_vocabulary_files(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_vocab(tmp_path / "missing.json", V)
    with pytest.raises(ArtifactError, match="lists no token ids"):
        load_vocab(_vocab_file(tmp_path, [], "empty.json"), V)
    with pytest.raises(ArtifactError, match="outside the vocabulary"):
        load_vocab(_vocab_file(tmp_path, [1, 2, V + 3], "range.json"), V)
    with pytest.raises(ArtifactError, match="more than once"):
        load_vocab(_vocab_file(tmp_path, [1, 2, 1], "dup.json"), V)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_vocab(tmp_path / "bad.json", V)
    VocabProfile(torch.zeros(V, dtype=torch.int64), "text", 0).save(tmp_path / "zero.safetensors")
    with pytest.raises(ArtifactError, match="counted no tokens"):
        load_vocab(tmp_path / "zero.safetensors", V)
    VocabProfile(torch.ones(V + 1, dtype=torch.int64), "text", V + 1).save(tmp_path / "other.safetensors")
    with pytest.raises(ArtifactError, match=f"this model's vocabulary has {V}"):
        load_vocab(tmp_path / "other.safetensors", V)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="not a readable vocabulary file"):
        load_vocab(tmp_path / "junk.safetensors", V)


def test_short_vocabulary_file_is_a_pass_error(dense4, tmp_path):
    with pytest.raises(PassError, match="ranks 5 ids; k=9 asks for more"):
        VocabReduce(k=9, where="head", vocab=_vocab_file(tmp_path, [3, 4, 5, 6, 7])).apply(dense4)


def test_calibrate_vocab_counts_text_and_generations(dense4, tmp_path):
    class Tok:
        chat_template = None
        padding_side = "left"

        def __len__(self):
            return V

        def __call__(self, text, add_special_tokens=False, **kw):
            if isinstance(text, list):  # batch encode for prompts
                rows = [[int(t) for t in s.split()] for s in text]
                width = max(map(len, rows))
                ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
                return {
                    "input_ids": ids,
                    "attention_mask": (
                        torch.arange(width) >= width - torch.tensor([len(r) for r in rows])[:, None]
                    ).long(),
                }
            return type("E", (), {"input_ids": [int(t) for t in text.split()]})()

    profile = calibrate_vocab(Tok(), ["5 5 5 7 7 9", "7 5"], path=tmp_path / "v.safetensors")
    assert profile.tokens == 8 and profile.ranked()[:3].tolist() == [5, 7, 9]
    assert profile.coverage(2) == pytest.approx(7 / 8)
    assert load_vocab(tmp_path / "v.safetensors", V)[:3].tolist() == [5, 7, 9]
    assert subset_ids(load_vocab(tmp_path / "v.safetensors", V), 3, always=(2,)).tolist() == [2, 5, 7]
    gen = calibrate_vocab(Tok(), ["3 4 5", "6 7"], program=dense4, max_new_tokens=4)
    assert gen.source == "generations" and 2 <= gen.tokens <= 8
    both = gen + profile
    assert both.source == "generations+text" and both.tokens == gen.tokens + 8
    assert torch.equal(both.counts, gen.counts + profile.counts)
    with pytest.raises(ValueError, match="at least one text"):
        calibrate_vocab(Tok(), [])


def test_either_order_in_a_pipeline(model4, tmp_path):
    path = _vocab_file(tmp_path, range(V))
    a = effx.transform(model4, "vocab-reduce{k=10}, early-exit{layers=0,2}")
    b = effx.transform(model4, "early-exit{layers=0,2}, vocab-reduce{k=10}")
    assert [s.spec for s in a] == [s.spec for s in b]
    assert any("run after it" in n for n in next(r for r in a.reports if r.name == "vocab-reduce").notes)
    c = effx.transform(
        model4, parse_pipeline(f"vocab-reduce{{k=10 where=head vocab={path}}}, early-exit{{layers=0,2}}")
    )
    assert c.exits[0].attrs.get("vocab") is None  # the exits copied the full head
    assert c.head.attrs["vocab"] == "subset"


def test_plans_of_reduced_programs_round_trip(model4, tmp_path):
    path = _vocab_file(tmp_path, range(V))
    for passes in (
        "early-exit{layers=0,1,2}, vocab-reduce{k=9 schedule=adaptive}",
        f"vocab-reduce{{k=30 where=head vocab={path}}}",
    ):
        plan = effx.transform(model4, passes).plan
        assert effx.Plan.from_json(plan.to_json()) == plan
    bad = json.loads(plan.to_json())
    bad["stages"][-1]["attrs"]["fallback"] = 0  # a full_head stage with nothing to fall back from
    with pytest.raises(effx.PlanError, match="only there for a head with a fallback"):
        effx.Plan.from_dict(bad)


def test_early_exit_after_a_reduced_head_is_refused(model4, dense4, tmp_path):
    """Exits copy the head: on a reduced head they would score its subset without its fallback. In a
    pipeline the order constraint runs EarlyExit first; applied directly afterwards, it is refused."""
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"ids": list(range(3, 60))}))
    reduced = VocabReduce(k=30, where="head", vocab=str(path), fallback=0.9).apply(dense4).program
    with pytest.raises(PassError, match="run early-exit before vocab-reduce"):
        EarlyExit(layers=(1,)).apply(reduced)
    both = effx.transform(model4, [VocabReduce(k=30, where="head", vocab=str(path)), EarlyExit(layers=(1,))])
    assert [p["name"] for p in both.plan.passes] == ["early-exit", "vocab-reduce", "lower"]


@pytest.mark.parametrize(
    ("counts", "words"),
    [
        (torch.ones(V, dtype=torch.float32), "counts are float32; token counts are integers"),
        (torch.full((V,), -1, dtype=torch.int64), "some token counts are negative"),
        (torch.ones(2, V, dtype=torch.int64), r"counts have shape \[2, 96\]"),
        (torch.ones(V + 1, dtype=torch.int64), "counts 97 token ids; this model's vocabulary has 96"),
    ],
)
def test_a_bad_vocabulary_file_is_refused_before_capture(model4, tmp_path, monkeypatch, counts, words):
    import importlib

    from safetensors.torch import save_file

    path = tmp_path / "vocab.safetensors"
    save_file({"counts": counts}, str(path), metadata={"effx": json.dumps({"kind": "effx-vocab"})})
    monkeypatch.setattr(
        importlib.import_module("effx.capture"), "capture", lambda *a, **k: pytest.fail("captured")
    )
    pipeline = f"early-exit{{layers=1 mode=self-speculative}}, vocab-reduce{{k=8 where=draft vocab={path}}}"
    with pytest.raises(PassConfigError, match=words):
        effx.transform(model4, pipeline)
