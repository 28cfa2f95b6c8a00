import pytest
import torch
from conftest import left_padded_batch, tiny_model
from hypothesis import given
from hypothesis import strategies as st

import effx
from effx import GenerationInputError


def hf_generate(model, ids, mask=None, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, **kw)


@given(
    kind=st.sampled_from(["llama", "mistral", "qwen2", "gemma3"]),
    layers=st.integers(1, 3),
    heads_kv=st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 2)]),
    head_dim=st.sampled_from([8, 16]),
    tie=st.booleans(),
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_greedy_matches_hf_generate(kind, layers, heads_kv, head_dim, tie, lengths, seed):
    heads, kv = heads_kv
    model = tiny_model(
        kind, layers=layers, heads=heads, kv_heads=kv, hidden=heads * head_dim, tie=tie, seed=seed
    )
    prog = effx.transform(model)
    ids, mask = left_padded_batch(lengths, 96, seed)
    ref = hf_generate(model, ids, mask, max_new_tokens=12)
    out = prog.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(out, ref)


def test_sliding_window_generation_matches_hf():
    model = tiny_model("mistral", sliding_window=5, layers=2)
    prog = effx.transform(model)
    ids = torch.randint(3, 96, (1, 8))
    assert torch.equal(prog.generate(ids, max_new_tokens=10), hf_generate(model, ids, max_new_tokens=10))


def test_eos_stops_and_pads_finished_rows(llama, llama_program):
    ids, mask = left_padded_batch([4, 6], 96, seed=3)
    free = llama_program.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    stop_at = int(free[0, ids.shape[1] + 1])  # row 0's second new token becomes its end token
    out = llama_program.generate(
        ids, attention_mask=mask, max_new_tokens=6, eos_token_id=stop_at, pad_token_id=0
    )
    ref = hf_generate(llama, ids, mask, max_new_tokens=6, eos_token_id=stop_at, pad_token_id=0)
    assert torch.equal(out, ref)
    assert (out[0, ids.shape[1] + 2 :] == 0).all()


def test_sampling_is_seeded_and_respects_top_k(llama_program):
    ids = torch.tensor([[5, 9, 11]])
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, eos_token_id=[])
    a = llama_program.generate(ids, seed=7, **kw)
    b = llama_program.generate(ids, seed=7, **kw)
    c = llama_program.generate(ids, seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = llama_program.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(llama_program.generate(ids, seed=1, **{**kw, "top_k": 1}), greedy)


def test_top_p_keeps_the_nucleus():
    from effx.runtime import Sampler

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    s = Sampler(do_sample=True, top_p=0.7)
    g = torch.Generator().manual_seed(0)
    drawn = {int(s(logits, g)) for _ in range(200)}
    assert drawn == {0, 1}


def test_streamer_and_callback_see_every_token(llama_program):
    ids = torch.tensor([[5, 9, 11]])
    seen, calls = [], []

    class Streamer:
        def put(self, value):
            seen.append(value.clone())

        def end(self):
            calls.append("end")

    out = llama_program.generate(
        ids,
        max_new_tokens=5,
        eos_token_id=[],
        streamer=Streamer(),
        on_token=lambda t: calls.append(int(t[0])),
        progress=True,
    )
    assert torch.equal(seen[0], ids)
    assert [int(t[0]) for t in seen[1:]] == out[0, 3:].tolist() == calls[:-1]
    assert calls[-1] == "end"


def test_generation_config_and_max_length_defaults(llama, llama_program):
    ids = torch.tensor([[5, 9, 11]])
    out = llama_program.generate(ids, max_length=7, eos_token_id=[])
    assert out.shape == (1, 7)
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=3, eos_token_id=[])
    assert llama_program.generate(ids, generation_config=cfg).shape == (1, 6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty prompt"),
        (dict(input_ids=torch.zeros(0, 3, dtype=torch.long)), "empty prompt"),
        (dict(input_ids=torch.tensor([5, 6])), "2-D"),
        (dict(input_ids=torch.tensor([[5, 6]]), max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(input_ids=torch.tensor([[5, 6]]), attention_mask=torch.ones(2, 2)), "does not match"),
        (dict(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[1, 1, 0]])), "left-padded"),
        (dict(input_ids=torch.tensor([[5, 6]]), attention_mask=torch.tensor([[0, 0]])), "left-padded"),
        (dict(input_ids=torch.tensor([[5, 6]]), max_new_tokens=1000), "exceeds"),
        (dict(input_ids=torch.tensor([[5, 6]]), frobnicate=True), "unknown generation argument"),
        (dict(input_ids=torch.tensor([[5, 6]]), do_sample=True, temperature=0.0), "temperature"),
        (dict(input_ids=torch.tensor([[5, 6]]), do_sample=True, top_p=1.5), "top_p"),
    ],
)
def test_bad_generate_input(llama_program, kwargs, match):
    with pytest.raises(GenerationInputError, match=match):
        llama_program.generate(**kwargs)


@pytest.mark.parametrize("lib", ["torch", "numpy"])
def test_sampler_draws_the_distribution_on_each_namespace(lib):
    """The one Sampler on both backends' arrays: frequencies follow softmax(logits / T) within the top-k and
    top-p sets, and nothing outside them is ever drawn."""
    import numpy as np

    from effx.arrays import namespace, new_rng
    from effx.runtime import Sampler

    p = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = np.log(np.tile(p, (4000, 1))).astype(np.float32)
    logits = torch.from_numpy(logits) if lib == "torch" else logits
    rng = new_rng(namespace(logits), 3)

    def freq(**kw):
        drawn = np.asarray(Sampler(do_sample=True, **kw)(logits, rng))
        return np.bincount(drawn, minlength=5) / len(drawn)

    np.testing.assert_allclose(freq(), p, atol=0.03)
    top2 = freq(top_k=2)
    assert top2[2:].sum() == 0
    np.testing.assert_allclose(top2[:2], p[:2] / p[:2].sum(), atol=0.03)
    nucleus = freq(top_p=0.6)  # 0.4 + 0.3 reach 0.6: the first two only
    assert nucleus[2:].sum() == 0
    hot = freq(temperature=2.0)
    q = p**0.5 / (p**0.5).sum()
    np.testing.assert_allclose(hot, q, atol=0.03)
    assert freq(top_k=50).shape == (5,)  # top_k beyond the vocabulary keeps everything
    greedy = np.asarray(Sampler()(logits))
    assert (greedy == 0).all()


def test_a_backend_without_a_capability_is_refused_with_a_typed_error(llama):
    """The loop asks its backend for what only some backends can do; a backend that lacks it says so."""
    from effx.errors import BackendCapabilityError
    from effx.passes import NeuronMask
    from effx.runtime.loop import decode
    from effx.runtime.sampling import Sampler
    from effx.runtime.torch_backend import TorchBackend

    class Plain(TorchBackend):
        name = "plain"
        capabilities = frozenset()

    core = effx.transform(llama, [NeuronMask(mode="core", keep=0.5, score="random")])
    ids = torch.tensor([[5, 9, 11]])
    assert core.generate(ids, max_new_tokens=2).shape == (1, 5)  # the torch backend has it
    with pytest.raises(BackendCapabilityError, match="the plain backend cannot run neuron-mask mode='core'"):
        decode(Plain(core), ids, torch.ones_like(ids), max_new=2, eos=[], pad=0, sampler=Sampler())


def test_the_plan_the_loop_and_the_gates_import_no_torch():
    """What an ONNX-only deployment loads: plan, artifact format, gates, the loop and the ONNX backend."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import effx.plan, effx.artifact, effx.gates, effx.runtime.loop, effx.runtime.onnx\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    "passes", ["", "prompt-lookup{ngram=2 min_ngram=1 draft=3}", "early-exit{layers=1 thresholds=0.5}"]
)
def test_a_stop_rule_ends_its_rows_where_it_says(passes):
    """generate(stop=...) ends a row after the token that triggered the rule, as a stop token would, in
    every decode mode (dense, speculative rounds, lossy exits); the other rows go on unchanged."""
    prog = effx.transform(tiny_model("llama", layers=4, seed=2), passes)
    ids, mask = left_padded_batch([6, 4], prog.info.vocab_size, seed=3)
    ref = prog.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], pad_token_id=0)
    seen = []

    def stop(tokens):
        seen.append(tokens.shape[1])
        return [tokens.shape[1] >= ids.shape[1] + 4, False]

    out = prog.generate(
        ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], pad_token_id=0, stop=stop
    )
    new = ids.shape[1]
    assert torch.equal(out[1], ref[1])
    assert torch.equal(out[0, : new + 4], ref[0, : new + 4])
    assert bool((out[0, new + 4 :] == 0).all())
    assert seen == list(range(new + 1, new + 11))  # called after every emitted column


def test_generation_arguments_effx_does_not_implement_are_refused_by_name():
    """num_beams, repetition_penalty, stop_strings... are refused, not silently ignored (greedy tokens)."""
    import effx
    from effx.errors import GenerationInputError

    program = effx.transform(tiny_model("llama", layers=1))
    ids = torch.tensor([[3, 4, 5]])
    for bad in (
        dict(num_beams=4),
        dict(repetition_penalty=2.0),
        dict(stop_strings=["x"]),
        dict(output_scores=True),
    ):
        with pytest.raises(GenerationInputError, match=next(iter(bad))):
            program.generate(ids, max_new_tokens=2, **bad)
    # the same arguments at their defaults change nothing, and are accepted
    out = program.generate(ids, max_new_tokens=2, num_beams=1, repetition_penalty=1.0, use_cache=True)
    assert torch.equal(out, program.generate(ids, max_new_tokens=2))
