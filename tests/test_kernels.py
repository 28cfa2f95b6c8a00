"""effx's CPU kernels and the lowering onto them: numbers within a stated bound of the reference ATen ops,
batch invariance, the graph after lowering, the Program-level fast/reference choice, and fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import layer_inputs, on_every_isa
from hypothesis import given, settings
from hypothesis import strategies as st

import effx
from effx import kernels
from effx.kernels.layer import PREFILL_ROWS, FusedLayer, FusedStack
from effx.kernels.lower import lower_graph, lowered_ops
from effx.passes import EarlyExit, Lower, NeuronMask
from effx.runtime.torch_backend import torch_backend
from effx.testing import left_padded_batch, tiny_model

# The stated bound of the fast kernels against torch's float32 ops: each output is a float32 dot product in
# another order, so they differ by a few ulps of the sum of |x_k w_k| (here: 1e-5 of it).
REL = 1e-5


def _bound(x, w):
    return REL * (x.abs() @ w.abs().T) + 1e-6


@on_every_isa
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, kernels.MAX_ROWS),
    n=st.integers(1, 70),
    k=st.integers(1, 90),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_matches_reference_within_bound(isa, rows, n, k, bias, seed):
    with kernels.use(isa):
        g = torch.Generator().manual_seed(seed)
        x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
        b = torch.randn(n, generator=g) if bias else None
        with torch.inference_mode():
            got, ref = kernels.linear(x, w, b), F.linear(x, w, b)
        assert got.shape == ref.shape
        assert ((got - ref).abs() <= _bound(x, w)).all()


@on_every_isa
@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(2, kernels.MAX_ROWS),
    n=st.integers(1, 60),
    k=st.integers(1, 80),
    seed=st.integers(0, 999),
)
def test_kernels_are_batch_invariant(isa, rows, n, k, seed):
    """A row computed with others is bitwise the row computed alone (what lossless verification rests on)."""
    with kernels.use(isa):
        g = torch.Generator().manual_seed(seed)
        x, w, w2 = (
            torch.randn(rows, k, generator=g),
            torch.randn(n, k, generator=g),
            torch.randn(n, k, generator=g),
        )
        with torch.inference_mode():
            together = kernels.linear(x, w)
            gated = kernels.gated(x, w, w2)
            for r in (0, rows - 1):
                assert torch.equal(kernels.linear(x[r : r + 1], w), together[r : r + 1])
                assert torch.equal(kernels.gated(x[r : r + 1], w, w2), gated[r : r + 1])


@on_every_isa
def test_thread_count_does_not_change_results(isa):
    with kernels.use(isa):
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(4, 200, generator=g), torch.randn(300, 200, generator=g)
        threads = torch.get_num_threads()
        with torch.inference_mode():
            try:
                torch.set_num_threads(1)
                one = kernels.linear(x, w)
            finally:
                torch.set_num_threads(threads)
            assert torch.equal(one, kernels.linear(x, w))


@on_every_isa
def test_fused_kernels_match_reference(isa):
    with kernels.use(isa):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 3, 48, generator=g)
        wg, wu = torch.randn(80, 48, generator=g) * 0.2, torch.randn(80, 48, generator=g) * 0.2
        norm_w = torch.randn(48, generator=g)
        ids = torch.tensor([7, 0, 79, 7, 31])
        with torch.inference_mode():
            torch.testing.assert_close(kernels.gated(x, wg, wu), F.silu(F.linear(x, wg)) * F.linear(x, wu))
            ref = norm_w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
            torch.testing.assert_close(kernels.rms_norm(x, norm_w, 1e-5), ref)
            torch.testing.assert_close(kernels.linear_rows(x, wg, ids), F.linear(x, wg[ids]))
            many = kernels.linear_many(x, (wg, wu[:5]), (None, torch.ones(5)))
            torch.testing.assert_close(many[1], F.linear(x, wu[:5], torch.ones(5)))
            # q, k, v as heads, rope on q and k
            wq, wk, wv = (torch.randn(n, 48, generator=g) * 0.2 for n in (64, 32, 32))
            cos, sin = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
            q, k, v = kernels.qkv_rope(x, wq, wk, wv, None, None, None, cos, sin, 16)
            heads = [F.linear(x, w).view(2, 3, -1, 16).transpose(1, 2) for w in (wq, wk, wv)]
            torch.testing.assert_close(q, kernels._rotate(heads[0], cos, sin))
            torch.testing.assert_close(k, kernels._rotate(heads[1], cos, sin))
            torch.testing.assert_close(v, heads[2])


def test_append_kv_writes_into_the_cache_buffer_or_concatenates():
    buf = torch.zeros(2, 3, 10, 4)
    buf[:, :, :5] = torch.randn(2, 3, 5, 4)
    new = torch.randn(2, 3, 2, 4)
    out = kernels.append_kv(buf[:, :, :5], new)
    assert torch.equal(out, torch.cat([buf[:, :, :5], new], 2))
    assert out.data_ptr() == buf.data_ptr() and torch.equal(buf[:, :, 5:7], new)  # no copy of the past
    # no room after the past, or a past that is not the front of a buffer: a plain cat, the buffer untouched
    full = torch.randn(2, 3, 5, 4)
    assert torch.equal(kernels.append_kv(full, new), torch.cat([full, new], 2))
    assert torch.equal(kernels.append_kv(buf[:, :, :9], new), torch.cat([buf[:, :, :9], new], 2))
    assert torch.equal(buf[:, :, 9], torch.zeros(2, 3, 4))
    odd = torch.randn(2, 5, 3, 4).transpose(1, 2)  # heads not outermost
    assert torch.equal(kernels.append_kv(odd, new), torch.cat([odd, new], 2))


def test_inputs_the_kernels_do_not_take_fall_back_to_reference():
    """Prefill-sized products, other dtypes and autograd go to torch's ops, bitwise."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 24, generator=g)
    big = torch.randn(kernels.MAX_ROWS + 1, 24, generator=g)
    with torch.inference_mode():
        assert torch.equal(kernels.linear(big, w), F.linear(big, w))
        half = big[:2].double()
        assert torch.equal(kernels.linear(half, w.double()), F.linear(half, w.double()))
    leaf = torch.randn(2, 24, requires_grad=True)
    out = kernels.linear(leaf, w)
    out.sum().backward()
    assert leaf.grad is not None


def test_operands_that_do_not_fit_raise_the_reference_error():
    """Shapes the kernels cannot take are never read out of bounds: the reference op runs and raises."""
    x, w = torch.randn(2, 8), torch.randn(5, 9)
    with torch.inference_mode():
        with pytest.raises(RuntimeError):
            kernels.linear(x, w)
        with pytest.raises(RuntimeError):
            kernels.linear(x, torch.randn(5, 8), torch.randn(4))
        with pytest.raises(RuntimeError):
            kernels.gated(x, torch.randn(5, 8), torch.randn(6, 8))
        with pytest.raises(IndexError):
            kernels.linear_rows(x, torch.randn(5, 8), torch.tensor([0, 5]))
        assert kernels.linear(torch.randn(0, 8), torch.randn(5, 8)).shape == (0, 5)


def test_lowered_layer_graph_has_fused_kernels():
    program = effx.transform(tiny_model("llama"), kernels="reference")
    layer = program.layers[0].graph
    lowered = lower_graph(layer)
    assert lowered_ops(lowered) == {"rms_norm": 2, "qkv_rope": 1, "gated": 1, "linear": 2, "append_kv": 2}
    calls = [n for n in lowered.graph.nodes if n.op == "call_function"]
    assert len(calls) < len([n for n in layer.graph.nodes if n.op == "call_function"]) / 2
    assert not any(n.target == torch.ops.aten.linear.default for n in calls)
    # the Program's own graph is untouched
    assert any(n.target == torch.ops.aten.linear.default for n in layer.graph.nodes)
    assert lowered_ops(lower_graph(program.head.graph)) == {"rms_norm": 1, "linear": 1}


def test_lowering_matches_qwen2_biases_and_skips_what_it_does_not_know():
    program = effx.transform(tiny_model("qwen2"), kernels="reference")
    assert lowered_ops(lower_graph(program.layers[0].graph))["qkv_rope"] == 1  # q, k, v with biases
    # a layer whose MLP is not silu(gate) * up keeps separate products (negative case)
    gm = program.layers[0].graph
    graph = lower_graph(gm).graph
    assert sum(n.target is kernels.gated for n in graph.nodes) == 1
    import copy

    g2 = copy.deepcopy(gm.graph)
    for n in g2.nodes:
        if n.target == torch.ops.aten.silu.default:
            n.target = torch.ops.aten.gelu.default
    other = lower_graph(torch.fx.GraphModule(gm, g2))
    ops = lowered_ops(other)
    assert "gated" not in ops and ops["linear"] == 4


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma3"])
def test_fast_program_logits_within_bound_of_reference(kind):
    model = tiny_model(kind, layers=3)
    fast, ref = effx.transform(model), effx.transform(model, kernels="reference")
    assert fast.plan.kernels == "fast" and ref.plan.kernels == "reference"
    ids, mask = left_padded_batch([6, 9], model.config.vocab_size, seed=3)
    with torch.inference_mode():
        for n in (1, 4):  # forward of a few tokens: the kernels' path
            a, b = fast(ids[:, -n:]), ref(ids[:, -n:])
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            assert torch.equal(ref(ids[:, -n:]), model(ids[:, -n:]).logits)
    out_fast = fast.generate(ids, attention_mask=mask, max_new_tokens=12)
    out_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=12)
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(out_ref, hf)  # the exact opt-out: token-identical to model.generate
    assert torch.equal(out_fast, out_ref)  # tiny random models have peaked logits: no greedy near-ties


@settings(max_examples=6, deadline=None)
@given(
    layers=st.integers(2, 4),
    hidden=st.sampled_from([32, 48, 64]),
    heads=st.sampled_from([2, 4]),
    seed=st.integers(0, 100),
)
def test_fast_self_speculative_equals_fast_dense(layers, hidden, heads, seed):
    """Lossless on the fast kernels: drafts verified in one multi-token step give the dense greedy tokens
    (on this CPU's default target: every target computes the same bits, tests/test_kernels_harness.py)."""
    model = tiny_model("llama", seed=seed, layers=layers, hidden=hidden, heads=heads, kv_heads=heads // 2)
    dense = effx.transform(model)
    spec = effx.transform(
        model, [EarlyExit(layers=(0,), thresholds=(0.2,), mode="self-speculative", draft=3)]
    )
    assert spec.plan.kernels == "fast"
    ids, mask = left_padded_batch([5, 8], model.config.vocab_size, seed=seed)
    a = dense.generate(ids, attention_mask=mask, max_new_tokens=16)
    b = spec.generate(ids, attention_mask=mask, max_new_tokens=16)
    assert torch.equal(a, b)


def test_lower_step_is_recorded_and_round_trips():
    model = tiny_model("llama")
    program = effx.transform(model, [NeuronMask(keep=0.5, score="random")])
    assert [p["name"] for p in program.plan.passes] == ["neuron-mask", "lower"]
    assert effx.Plan.from_json(program.plan.to_json()).kernels == "fast"
    report = program.reports[-1].format()
    assert "layer.0 .. layer.1 (2 stages)" in report and "linear x" in report
    # a pipeline's own lower step decides; one that contradicts transform's kernels is refused
    ref = effx.transform(model, "lower{kernels=reference}")
    assert ref.plan.kernels == "reference" and torch_backend(ref).kernels == "reference"
    with pytest.raises(effx.PassConfigError, match="kernels"):
        effx.transform(model, [Lower("reference")], kernels="fast")
    with pytest.raises(effx.PassConfigError, match="kernels must be one of"):
        Lower("turbo")
    # lower runs after every graph rewrite, wherever it is listed
    moved = effx.transform(model, [Lower("fast"), NeuronMask(keep=0.5, score="random")])
    assert [p["name"] for p in moved.plan.passes] == ["neuron-mask", "lower"]


def test_plans_written_before_kernels_read_as_reference_and_bad_values_are_refused():
    plan = effx.transform(tiny_model("llama")).plan
    data = plan.to_dict()
    assert data["kernels"] == "fast"
    del data["kernels"]
    assert effx.Plan.from_dict(data).kernels == "reference"
    data["kernels"] = "turbo"
    with pytest.raises(effx.PlanError, match="kernels"):
        effx.Plan.from_dict(data)


def test_backend_runs_reference_ops_where_kernels_are_missing(monkeypatch):
    monkeypatch.setattr(kernels.build, "library", lambda: (None, "no compiler here"))
    model = tiny_model("llama")
    program = effx.transform(model)
    assert program.plan.kernels == "fast"  # what was asked for is recorded ...
    assert "no compiler here" in program.reports[-1].format()
    backend = torch_backend(program)
    assert backend.kernels == "reference"  # ... and the backend says what it runs
    ids = torch.tensor([[3, 4, 5]])
    with torch.inference_mode():
        assert torch.equal(program(ids), model(ids).logits)


# -- a whole layer in one call (effx.kernels.layer) -------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("quantized", [False, True])
def test_a_layer_runs_as_one_call_within_bound_of_the_lowered_graph(kind, quantized):
    model = tiny_model(kind, layers=1, hidden=64, heads=4, kv_heads=2)
    program = effx.transform(model, "quantize" if quantized else "")
    layer = torch_backend(program)._graphs["layer.0"]
    assert isinstance(layer, FusedLayer)
    with torch.inference_mode():
        for batch, seq, past in ((1, 1, 7), (2, 4, 5), (3, 1, 0)):
            inputs = layer_inputs(program, batch, seq, past)
            got = layer(*inputs)
            want = layer.graph_module(*inputs)
            assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])  # the same kernels for k, v
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)  # attention: float rounding
            # the new keys and values are in the cache buffer after the filled slots
            pk = inputs[4]
            filled = pk.as_strided((*pk.shape[:2], past + seq, pk.shape[3]), pk.stride(), pk.storage_offset())
            assert torch.equal(filled[:, :, past:], got[1])


class _Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, *args):
        self.calls.append(1)
        return self.inner(*args)


def test_the_fused_layer_is_batch_invariant_and_falls_back_where_it_must():
    model = tiny_model("llama", layers=1, hidden=64, heads=4, kv_heads=2)
    program = effx.transform(model)
    layer = torch_backend(program)._graphs["layer.0"]
    real = layer.graph_module
    layer.graph_module = counting = _Counting(real)
    calls = counting.calls
    try:
        with torch.inference_mode():
            hidden, cos, sin, mask, pk, pv = layer_inputs(program, 3, 2, 6)
            together = layer(hidden, cos, sin, mask, pk, pv)[0]
            for b in range(3):
                alone = layer(
                    hidden[b : b + 1],
                    cos[b : b + 1],
                    sin[b : b + 1],
                    mask[b : b + 1],
                    pk[b : b + 1],
                    pv[b : b + 1],
                )
                assert torch.equal(alone[0], together[b : b + 1])
            assert not calls
            big = layer_inputs(program, 1, kernels.MAX_ROWS + 1, 0)  # a prefill: the lowered graph
            layer(*big)
            full = [
                t.contiguous() if t.dim() == 4 and t.shape[2] == 6 else t
                for t in (hidden, cos, sin, mask, pk, pv)
            ]
            layer(*full)  # a cache that is no buffer with room: the lowered graph
        assert len(calls) == 2
    finally:
        layer.graph_module = real


def test_a_quantized_layer_takes_a_prefill_in_one_call():
    """Quantized weights would run as kernel calls of MAX_ROWS rows in the lowered graph anyway: a fused
    layer of them takes a prefill of up to PREFILL_ROWS tokens itself (float32 ones leave it to F.linear)."""
    program = effx.transform(tiny_model("llama", layers=1, hidden=64, heads=4, kv_heads=2), "quantize")
    layer = torch_backend(program)._graphs["layer.0"]
    assert isinstance(layer, FusedLayer) and layer.max_rows == PREFILL_ROWS > kernels.MAX_ROWS
    real = layer.graph_module
    layer.graph_module = counting = _Counting(real)
    try:
        with torch.inference_mode():
            inputs = layer_inputs(program, 2, kernels.MAX_ROWS, 3)
            got, want = layer(*inputs), real(*inputs)
            assert not counting.calls
            # over MAX_ROWS rows the lowered graph rotates q and k with torch's ops (float rounding there
            # too, carried through attention and the MLP)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            layer(*layer_inputs(program, 1, PREFILL_ROWS + 1, 0))  # longer: the lowered graph
            assert len(counting.calls) == 1
    finally:
        layer.graph_module = real


@pytest.mark.parametrize(
    "passes",
    [
        "",
        "quantize{activations=int8}",
        # MLPs of different widths in one stack; float32 and quantized layers in one stack
        "neuron-mask{keep=0.5 score=random layers=1,1}, quantize",
        "quantize{layers=0,1}",
    ],
)
def test_consecutive_fused_layers_run_as_one_call_with_the_same_bits(passes, monkeypatch):
    """A step runs every fused layer in one kernel call: the same logits and cache, bit for bit, as one call
    per layer; layers filled to different lengths (an early exit's skipped tokens) run one at a time."""
    from effx.runtime import torch_backend as tb
    from effx.runtime.forward import KVCache, MaskCache, positions_from_mask, run_step

    program = effx.transform(tiny_model("llama", layers=3, hidden=64, heads=4, kv_heads=2), passes)
    backend = torch_backend(program)
    layers = program.plan.layers
    stack = backend._stack(layers)
    assert isinstance(stack, FusedStack)
    widths = [f.F for f in stack.layers]
    assert (widths[1] < widths[0]) == ("neuron-mask" in passes)
    assert stack.max_rows == (kernels.MAX_ROWS if passes in ("", "quantize{layers=0,1}") else PREFILL_ROWS)
    ids, mask = left_padded_batch([3, 5], program.info.vocab_size, seed=1)

    def decode(per_layer: bool):
        if per_layer:
            monkeypatch.setattr(tb.TorchBackend, "_stack", lambda self, layers: None)
        cache = KVCache.for_program(program, 2, 12)
        valid = mask.bool()
        pos = positions_from_mask(mask)
        with torch.inference_mode():
            outs = [run_step(backend, cache, ids, pos, valid)]
            for step in range(3):
                valid = torch.cat([valid, torch.ones(2, 1, dtype=torch.bool)], dim=1)
                new = outs[-1].argmax(-1, keepdim=True)
                outs.append(run_step(backend, cache, new, pos[:, -1:] + step + 1, valid))
        monkeypatch.undo()
        return outs, cache

    fused, fused_cache = decode(False)
    alone, alone_cache = decode(True)
    assert all(torch.equal(a, b) for a, b in zip(fused, alone, strict=True))
    assert fused_cache.lengths == alone_cache.lengths == [8, 8, 8]
    assert all(
        torch.equal(a, b)
        for a, b in zip(fused_cache.k + fused_cache.v, alone_cache.k + alone_cache.v, strict=True)
    )

    # layers filled to different lengths: each run of one length as a stack, a run of one layer alone
    from effx.runtime import forward

    calls = []
    stack = backend._stack(layers)
    monkeypatch.setattr(type(stack), "__call__", lambda self, *a: calls.append("stack"))
    monkeypatch.setattr(forward, "run_layer_stages", lambda *a: calls.append("one at a time") or a[3])
    cache = KVCache.for_program(program, 1, 8)
    cache.lengths = [2, 1, 1]
    hidden, cos, sin = backend.run(program.plan.embed, ids[:1, :1], torch.tensor([[2]]))
    masks = MaskCache(backend, torch.ones(1, 3, dtype=torch.bool), torch.float32)
    backend.run_layers(cache, layers, hidden, cos, sin, masks)
    assert calls == ["one at a time", "stack", "one at a time"]  # the stub stack declines: one at a time


def test_token_drop_decodes_its_runs_of_layers_as_stacks(monkeypatch):
    """Token drop leaves later layers with dropped prompt slots (their own masks): each run of layers with
    one mask is one kernel call, and the tokens are those of one call per layer."""
    from effx.runtime import torch_backend as tb

    program = effx.transform(
        tiny_model("llama", layers=4, hidden=64, heads=4, kv_heads=2), "token-drop{at_layers=2 keep=0.5}"
    )
    ids, mask = left_padded_batch([9, 12], program.info.vocab_size, seed=2)
    with torch.inference_mode():
        stacked = program.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
        backend = torch_backend(program)
        assert {len(k) for k, v in backend._stacks.items() if v is not None} == {2}  # layers 0-1 and 2-3
        monkeypatch.setattr(tb.TorchBackend, "_stack", lambda self, layers: None)
        alone = program.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(stacked, alone)


def test_layers_of_another_form_are_not_fused():
    program = effx.transform(tiny_model("gemma3", layers=2))  # extra norms around attention and MLP
    assert not any(isinstance(g, FusedLayer) for g in torch_backend(program)._graphs.values())
    ref = effx.transform(tiny_model("llama", layers=1), kernels="reference")
    assert not any(isinstance(g, FusedLayer) for g in torch_backend(ref)._graphs.values())
    # int8 activations on 16-value groups: the kernels' integer path needs groups of 32 or more
    int8 = effx.transform(tiny_model("llama", layers=1), "quantize{group=16 activations=int8}")
    assert not any(isinstance(g, FusedLayer) for g in torch_backend(int8)._graphs.values())
