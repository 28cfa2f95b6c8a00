import copy

import pytest
import torch
from conftest import left_padded_batch, tiny_model
from hypothesis import given
from hypothesis import strategies as st

import effx
from effx.errors import ArtifactError, PassConfigError, PassError
from effx.neurons import load_neuron_profile
from effx.passes import NeuronMask
from effx.runtime.neurons import choose_core

V, F = 96, 96


class Tok:
    """Digits-only text: the ids are the numbers themselves, mod V."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return type("E", (), {"input_ids": [int(t) % V for t in text.split()]})()


def _texts(step: int, n: int = 4):
    return [" ".join(str((i * 13 + j * step) % V) for j in range(80)) for i in range(n)]


@pytest.fixture(scope="module")
def model3():
    return tiny_model("llama", layers=3, seed=5)


@pytest.fixture(scope="module")
def dense3(model3):
    return effx.transform(model3)


@pytest.fixture(scope="module")
def profile_path(dense3, tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "chat.safetensors"
    effx.profile_neurons(dense3, _texts(7), Tok(), path=path, data="digits", seq_len=32, max_tokens=256)
    return str(path)


def _generate(program, ids, mask, n=6):
    return program.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[])


def _zeroed(model, program):
    """A copy of ``model`` whose dropped neurons are zero (their down columns): what slicing must equal."""
    ref = copy.deepcopy(model)
    for stage in program.layers:
        gm = stage.graph
        if not hasattr(gm, "mlp_gate_kept"):
            continue
        mlp = ref.model.layers[stage.layer].mlp
        kept = torch.zeros(mlp.down_proj.weight.shape[1], dtype=torch.bool)
        full = mlp.gate_proj.weight
        for row in gm.mlp_gate_kept:  # find each kept row in the full gate weight
            kept |= (full == row).all(1)
        with torch.no_grad():
            mlp.down_proj.weight[:, ~kept] = 0
    return ref


def test_profile_file_round_trip(dense3, profile_path):
    p = load_neuron_profile(profile_path, dense3.info)
    assert p.meta["data"] == "digits" and p.meta["tokens"] == 256 and p.meta["intermediate_size"] == F
    assert sorted(p.mean_abs) == [0, 1, 2] and p.mean_abs[0].shape == (F,)
    assert ((p.freq[1] >= 0) & (p.freq[1] <= 1)).all()
    assert abs(float(p.freq[1].sum()) - round(0.2 * F)) < 1e-3  # each token counts top_share * F neurons
    assert 0 < p.gate_threshold(1, 0.3) < p.gate_threshold(1, 0.8)


def test_static_graph_after_the_pass(model3, dense3, profile_path):
    prog = effx.transform(model3, [NeuronMask(keep=0.25, profile=profile_path, layers=(1, 2))])
    for stage in prog.layers:
        gm = stage.graph
        if stage.layer == 0:
            assert not hasattr(gm, "mlp_gate_kept") and "neurons" not in stage.attrs
            continue
        assert stage.attrs["neurons"] == 24
        assert gm.mlp_gate_kept.shape == (24, 64) and gm.mlp_up_kept.shape == (24, 64)
        assert gm.mlp_down_kept.shape == (64, 24)
        held = {n for n, _ in list(gm.named_parameters()) + list(gm.named_buffers())}
        assert not any("mlp.gate_proj" in n or "mlp.down_proj" in n for n in held)  # full weights dropped
    report = next(r for r in prog.reports if r.name == "neuron-mask")
    assert report.flops_after < report.flops_before
    assert "MB ->" in report.format()
    ids, mask = left_padded_batch([6, 4], V, seed=1)
    reference = effx.transform(_zeroed(model3, prog))
    torch.testing.assert_close(prog(ids, mask), reference(ids, mask), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "mask",
    [
        NeuronMask(keep=1.0, score="random"),
        NeuronMask(mode="core", keep=1.0),
        NeuronMask(mode="threshold", sparsity=0.0, profile="x"),
    ],
)
def test_identity_settings_change_nothing(dense3, mask):
    result = mask.apply(dense3)
    assert result.program is dense3 and not result.modified


def test_keep_one_gives_identical_outputs(model3, dense3, profile_path):
    prog = effx.transform(model3, [NeuronMask(keep=1.0, profile=profile_path)])
    ids, mask = left_padded_batch([5, 7], V, seed=2)
    assert torch.equal(_generate(prog, ids, mask), _generate(dense3, ids, mask))


def test_a_profile_from_other_text_gives_another_mask(model3, dense3, profile_path, tmp_path):
    other = tmp_path / "other.safetensors"
    effx.profile_neurons(dense3, _texts(29), Tok(), path=other, seq_len=32, max_tokens=256)
    a = effx.transform(model3, [NeuronMask(keep=0.3, profile=profile_path, score="mean")])
    b = effx.transform(model3, [NeuronMask(keep=0.3, profile=str(other), score="mean")])
    assert any(
        not torch.equal(x.graph.mlp_up_kept, y.graph.mlp_up_kept)
        for x, y in zip(a.layers, b.layers, strict=True)
    )
    rand = effx.transform(model3, [NeuronMask(keep=0.3, score="random", seed=1)])
    assert rand.layers[0].graph.mlp_up_kept.shape == (29, 64)


def test_base_and_task_profiles_combine(model3, dense3, profile_path, tmp_path):
    other = tmp_path / "base.safetensors"
    effx.profile_neurons(dense3, _texts(29), Tok(), path=other, seq_len=32, max_tokens=256)
    both = effx.transform(
        model3, [NeuronMask(keep=0.5, profile=profile_path, base=str(other), base_share=0.5, score="mean")]
    )
    task = load_neuron_profile(profile_path, dense3.info)
    base = load_neuron_profile(str(other), dense3.info)
    gm, w = both.layers[1].graph, model3.model.layers[1].mlp.up_proj.weight
    kept = {i for i in range(F) if (gm.mlp_up_kept == w[i]).all(1).any()}
    assert len(kept) == 48
    assert set(torch.argsort(base.mean_abs[1], descending=True, stable=True)[:24].tolist()) <= kept
    assert len(kept & set(torch.argsort(task.mean_abs[1], descending=True, stable=True)[:48].tolist())) >= 24


@given(
    keep=st.floats(0.05, 0.95),
    start=st.integers(0, 3),
    span=st.integers(0, 3),
    kind=st.sampled_from(["llama", "qwen2", "mistral", "gemma3"]),
    seed=st.integers(0, 20),
)
def test_static_mask_equals_zeroed_neurons(keep, start, span, kind, seed):
    model = tiny_model(kind, layers=4, seed=seed)
    end = min(3, start + span)
    prog = effx.transform(model, [NeuronMask(keep=keep, score="random", seed=seed, layers=(start, end))])
    k = max(1, round(keep * F))
    assert [s.layer for s in prog.layers if s.attrs.get("neurons") == k] == list(range(start, end + 1))
    ids, mask = left_padded_batch([5, 3], V, seed=seed)
    reference = effx.transform(_zeroed(model, prog))
    torch.testing.assert_close(prog(ids, mask), reference(ids, mask), rtol=1e-4, atol=1e-4)


def test_core_neurons_are_per_prompt_and_batch_consistent(model3):
    prog = effx.transform(model3, [NeuronMask(mode="core", keep=0.4, layers=(0, 2))])
    assert all(s.attrs["core_neurons"] == 38 for s in prog.layers)
    ids, mask = left_padded_batch([7, 4, 6], V, seed=3)
    stats = {}
    batch = prog.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[], stats=stats)
    chosen = stats["core_neurons"]["layer.1"]
    assert len(chosen) == 3 and chosen[0] != chosen[1]  # each prompt its own neurons
    for row in range(3):
        n = int(mask[row].sum())
        alone = prog.generate(ids[row : row + 1, -n:], max_new_tokens=5, eos_token_id=[])
        assert torch.equal(alone[0, -5:], batch[row, -5:])


def test_choose_core_counts_only_real_tokens():
    inter = torch.zeros(1, 4, 10)
    inter[0, :2, 7] = 5.0  # padding positions favour neuron 7
    inter[0, 2:, 3] = 1.0  # the real tokens favour neuron 3
    valid = torch.tensor([[False, False, True, True]])
    assert choose_core(inter, valid, 1, 0.1).tolist() == [[3]]


def test_threshold_mode_zeroes_about_the_target_share(model3, dense3, profile_path):
    prog = effx.transform(model3, [NeuronMask(mode="threshold", sparsity=0.6, profile=profile_path)])
    assert all(s.attrs["neurons"] == "threshold" for s in prog.layers)
    assert "saves no time" in next(r for r in prog.reports if r.name == "neuron-mask").format()
    from effx.neurons import mlp_probe
    from effx.runtime.forward import KVCache, MaskCache

    ids = torch.tensor([[int(t) % V for t in _texts(7)[0].split()][:64]])
    cache = KVCache.for_program(prog, 1, 64)
    hidden, cos, sin = prog.embed.graph(ids, torch.arange(64)[None])
    mask = MaskCache(prog, torch.ones_like(ids, dtype=torch.bool), hidden.dtype).get(0, 64, None)
    _, _, _, inter, _ = mlp_probe(prog.layers[0].graph)(hidden, cos, sin, mask, *cache.past(0))
    assert 0.45 < float((inter == 0).float().mean()) < 0.75


def test_bad_settings_and_files(dense3, profile_path, tmp_path):
    for kwargs, match in [
        (dict(keep=0.0, score="random"), "keep must be a fraction"),
        (dict(keep=1.5, score="random"), "keep must be a fraction"),
        (dict(keep=0.5), "needs profile=<file>"),
        (dict(mode="magic"), "unknown neuron-mask mode"),
        (dict(keep=0.5, score="random", layers=(3,)), "layers is \\(start, end\\)"),
        (dict(keep=0.5, score="random", layers=(5, 2)), "is not 0 <= start <= end"),
        (dict(mode="threshold", sparsity=1.0, profile="x"), "sparsity must be in"),
    ]:
        with pytest.raises(PassConfigError, match=match):
            NeuronMask(**kwargs)
    with pytest.raises(PassError, match="out of range"):
        NeuronMask(keep=0.5, score="random", layers=(1, 3)).apply(dense3)
    with pytest.raises(ArtifactError, match="does not exist"):
        NeuronMask(keep=0.5, profile=str(tmp_path / "none.safetensors")).apply(dense3)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ArtifactError, match="not a readable neuron profile"):
        NeuronMask(keep=0.5, profile=str(tmp_path / "junk.safetensors")).apply(dense3)
    wider = effx.transform(tiny_model("llama", layers=3, intermediate=128))
    with pytest.raises(ArtifactError, match="intermediate_size=96; this one has 128"):
        NeuronMask(keep=0.5, profile=profile_path).apply(wider)


def test_perplexity_is_dense_for_identity_and_worse_for_heavy_masks(model3, dense3):
    from effx.quality import perplexity

    texts = _texts(11)
    dense = perplexity(dense3, texts, Tok(), seq_len=32, max_tokens=128)
    same = perplexity(
        effx.transform(model3, [NeuronMask(mode="core", keep=1.0)]), texts, Tok(), seq_len=32, max_tokens=128
    )
    assert same == pytest.approx(dense, rel=1e-6) and dense > 1
    core = perplexity(
        effx.transform(model3, [NeuronMask(mode="core", keep=0.1)]), texts, Tok(), seq_len=32, max_tokens=128
    )
    assert core != pytest.approx(dense, rel=1e-3)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda t: t.update({"layer.1.freq": t["layer.1.freq"] + 2}), "frequency outside"),
        (
            lambda t: t.update({"layer.0.gate_quantiles": t["layer.0.gate_quantiles"].flip(0) + 1}),
            "increasing order",
        ),
        (lambda t: t.update({"layer.2.mean_abs": t["layer.2.mean_abs"].long()}), "must be floating point"),
        (lambda t: t.update({"layer.2.mean_abs": t["layer.2.mean_abs"] * float("nan")}), "non-finite"),
    ],
)
def test_a_bad_profile_is_refused_before_capture(model3, profile_path, tmp_path, monkeypatch, edit, words):
    import importlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(profile_path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    monkeypatch.setattr(
        importlib.import_module("effx.capture"), "capture", lambda *a, **k: pytest.fail("captured")
    )
    with pytest.raises(PassConfigError, match=words):
        effx.transform(model3, [NeuronMask(keep=0.5, profile=str(path))])
