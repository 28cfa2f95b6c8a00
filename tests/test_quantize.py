"""Quantize: the storage format, round-to-nearest bounds, the kernels on quantized bytes (bitwise equal to the
float kernels on the de-quantized weights), the graph after the pass, exact GGUF import, compositions with
the other passes, and refusals."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import on_every_isa
from hypothesis import given, settings
from hypothesis import strategies as st

import effx
from effx import kernels
from effx.errors import PassConfigError, PassPreconditionError
from effx.flops import decode_weight_bytes, weight_bytes
from effx.quant import dequantize, pack4, quantize_rtn, unpack4
from effx.testing import left_padded_batch, tiny_model

QLINEAR = torch.ops.effx.qlinear.default
KINDS = [
    dict(bits=4),
    dict(bits=4, symmetric=True),
    dict(bits=8),
    dict(bits=8, symmetric=True),
    dict(bits=16),
]


def _rtn(w, bits, group=32, symmetric=False, scale_dtype=torch.float16):
    return quantize_rtn(w, bits, group, symmetric=symmetric, scale_dtype=scale_dtype)


# -- the format -------------------------------------------------------------------------------------------


def test_pack4_round_trip_and_gguf_nibble_order():
    u = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    q = pack4(u)
    assert q.shape == (3, 32) and torch.equal(unpack4(q), u)
    # GGUF's Q4_1 order: byte j of a block holds value j (low nibble) and value j + 16 (high nibble)
    assert torch.equal(q[:, :16] & 15, u[:, :16]) and torch.equal(q[:, :16] >> 4, u[:, 16:32])


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(KINDS[:4]),
    group=st.sampled_from([16, 32, 64]),
    k=st.integers(1, 130),
    seed=st.integers(0, 2**16),
)
def test_rtn_error_is_at_most_half_a_step(kind, group, k, seed):
    w = torch.randn(5, k, generator=torch.Generator().manual_seed(seed))
    qw = _rtn(w, kind["bits"], group, kind.get("symmetric", False))
    got = qw.dequantize()
    assert got.shape == w.shape
    step = qw.scale.float().abs().repeat_interleave(qw.group, dim=1)[:, :k]
    # half a step, plus the clamp at the grid's end for symmetric grids and float16 rounding of the scales
    slack = 0.5 if not kind.get("symmetric") else 1.0
    assert ((got - w).abs() <= slack * step + 1e-3 * w.abs().amax()).all()


def test_bf16_storage_is_bfloat16_rounding():
    w = torch.randn(4, 40)
    qw = _rtn(w, 16)
    assert qw.q.dtype == torch.bfloat16 and qw.scale is None
    assert torch.equal(qw.dequantize(), w.to(torch.bfloat16).float())


def test_qlinear_op_is_linear_over_the_dequantized_weight():
    w, x, b = torch.randn(7, 64), torch.randn(2, 3, 64), torch.randn(7)
    qw = _rtn(w, 4)
    got = torch.ops.effx.qlinear(x, *qw.tensors(), b)
    assert torch.equal(got, F.linear(x, qw.dequantize(), b))
    ids = torch.tensor([[1, 0], [6, 6]])
    rows = torch.ops.effx.qembedding(ids, *qw.tensors(), 64)
    assert torch.equal(rows, qw.dequantize()[ids])


def test_bad_quantize_configs_are_refused():
    for text in (
        "quantize{bits=3}",
        "quantize{group=24}",
        "quantize{group=8}",
        "quantize{source=awq}",
        "quantize{file=x.gguf}",
        "quantize{scale=int8}",
        "quantize{dtype=fp8}",
    ):
        with pytest.raises(PassConfigError):
            effx.passes.parse_pipeline(text)


# -- kernels on quantized bytes ---------------------------------------------------------------------------


@on_every_isa
@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    group=st.sampled_from([16, 32, 128]),
    blocks=st.integers(1, 6),
    n=st.integers(1, 60),
    rows=st.integers(1, kernels.MAX_ROWS),
    scale32=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernels_on_quantized_bytes_equal_float_kernels_on_dequantized(
    isa, kind, group, blocks, n, rows, scale32, seed
):
    """Bitwise: the kernels de-quantize exactly as effx.quant does and accumulate in the float kernels'
    order, so quantization changes nothing but the weights (K a multiple of 32)."""
    with kernels.use(isa):
        g = torch.Generator().manual_seed(seed)
        k = 32 * blocks
        w, x, b = (
            torch.randn(n, k, generator=g),
            torch.randn(rows, k, generator=g),
            torch.randn(n, generator=g),
        )
        qw = _rtn(
            w, kind["bits"], group, kind.get("symmetric", False), torch.float32 if scale32 else torch.float16
        )
        tensors, wd = qw.tensors(), qw.dequantize()
        assert torch.equal(kernels.linear(x, tensors, b), kernels.linear(x, wd, b))
        assert torch.equal(kernels.gated(x, tensors, tensors), kernels.gated(x, wd, wd))
        ids = torch.randint(0, n, (min(n, 9),), generator=g)
        assert torch.equal(kernels.linear_rows(x, tensors, ids), kernels.linear_rows(x, wd, ids))
        many = kernels.linear_many(x, (tensors, wd), (None, b))
        assert torch.equal(many[0], kernels.linear(x, wd)) and torch.equal(many[1], kernels.linear(x, wd, b))


@on_every_isa
@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(KINDS), k=st.integers(1, 100), rows=st.integers(1, 80), seed=st.integers(0, 2**16)
)
def test_kernels_on_any_shape_are_within_the_float_bound(isa, kind, k, rows, seed):
    """Any K (a padded last block) and any number of rows (more than MAX_ROWS run in chunks)."""
    with kernels.use(isa):
        g = torch.Generator().manual_seed(seed)
        w, x = torch.randn(11, k, generator=g), torch.randn(rows, k, generator=g)
        qw = _rtn(w, kind["bits"], 32, kind.get("symmetric", False))
        wd = qw.dequantize()
        got, ref = kernels.linear(x, qw.tensors()), F.linear(x, wd)
        assert ((got - ref).abs() <= 1e-5 * (x.abs() @ wd.abs().T) + 1e-6).all()


def test_kernels_refuse_malformed_quantized_operands():
    """Operands that do not fit go to the reference op, which raises its own error (nothing is read out of
    bounds)."""
    qw = _rtn(torch.randn(8, 64), 4)
    q, scale, minimum = qw.tensors()
    with pytest.raises(RuntimeError):
        kernels.linear(torch.randn(1, 64), (q, scale[:4], minimum))
    with pytest.raises((RuntimeError, TypeError)):
        kernels.linear(torch.randn(1, 64), (q.to(torch.int32), scale, minimum))


# -- the pass ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _qlinears(program):
    return sum(n.target == QLINEAR for s in program for n in s.graph.graph.nodes)


def _float_products(program):
    return [
        (s.name, n.meta.get("effx_role"))
        for s in program
        for n in s.graph.graph.nodes
        if n.op == "call_function"
        and n.target in (torch.ops.aten.linear.default, torch.ops.aten.embedding.default)
    ]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_graph_after_quantize_holds_no_float_weights(model, kind):
    dense = effx.transform(model, passes=[])
    args = " ".join(f"{a}={str(v).lower()}" for a, v in kind.items())
    q = effx.transform(model, passes=f"quantize{{{args}}}")
    layers = q.info.num_layers
    assert _float_products(q) == []
    assert _qlinears(q) == 7 * layers + 1
    assert any(n.target == torch.ops.effx.qembedding.default for n in q.embed.graph.graph.nodes)
    names = [k for s in q for k in s.graph.state_dict()]
    assert not any(k.endswith("proj.weight") or k.endswith("lm_head.weight") for k in names)
    ratio = weight_bytes(q) / weight_bytes(dense)
    assert ratio < {4: 0.3, 8: 0.4, 16: 0.6}[kind["bits"]]
    assert "quantize" in [p["name"] for p in q.plan.passes]
    assert decode_weight_bytes(q) < ratio * 1.01 * decode_weight_bytes(dense) + 1e3
    assert "MB read per decode token" in q.report(file=None)


@pytest.mark.parametrize("kernels_", ["fast", "reference"])
def test_int8_quantized_program_decodes_like_dense(model, kernels_):
    dense = effx.transform(model, passes=[], kernels="reference")
    q = effx.transform(model, passes="quantize{bits=8 symmetric=true}", kernels=kernels_)
    ids, mask = left_padded_batch([5, 3], model.config.vocab_size, seed=1)
    logits, ref = q(ids, mask), dense(ids, mask)
    valid = mask.bool()
    assert (logits - ref)[valid].abs().max() < 0.05 * ref[valid].abs().max()
    # the first generated token is the quantized Program's own greedy choice after the prompt
    out = q.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out[:, ids.shape[1]], logits[:, -1].argmax(-1))


def test_layers_head_and_embed_are_selectable(model):
    q = effx.transform(model, passes="quantize{layers=1 head=false embed=false}")
    assert {s for s, _ in _float_products(q)} == {"embed", "layer.0", "head"}
    assert _qlinears(q) == 7
    with pytest.raises(PassConfigError, match="out of range"):  # from the config, before capture
        effx.transform(model, passes="quantize{layers=5}")


def test_shared_weights_stay_shared():
    m = tiny_model("llama", tie=True)
    q = effx.transform(m, passes="quantize{bits=4}")
    embed_q = [t for k, t in q.embed.graph.state_dict().items() if k.endswith("_q")][0]
    head_q = [t for k, t in q.head.graph.state_dict().items() if k.endswith("_q")][0]
    assert embed_q.data_ptr() == head_q.data_ptr()


def test_quantize_composes_with_every_pass():
    model = tiny_model("llama", layers=3)
    ids, mask = left_padded_batch([6, 4], model.config.vocab_size, seed=2)
    for pipeline in (
        "early-exit{layers=0 thresholds=0.5}, quantize{bits=8}",
        "quantize{bits=8}, neuron-mask{keep=0.5 score=random}",  # reordered: quantize runs after
        "early-exit{layers=0,1 thresholds=0.5}, vocab-reduce{k=16}, quantize{bits=4}",
        "token-drop{at_layers=1}, quantize{bits=8}",
    ):
        q = effx.transform(model, passes=pipeline)
        assert _float_products(q) == [], pipeline
        assert q.plan.passes[-2]["name"] == "quantize", pipeline
        out = q.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert out.shape == (2, 9)


def test_exits_share_the_quantized_head(model):
    q = effx.transform(model, passes="early-exit{layers=0 thresholds=0.5}, quantize{bits=4}")
    head_q = {t.data_ptr() for k, t in q.head.graph.state_dict().items() if k.endswith("_q")}
    exit_q = {t.data_ptr() for k, t in q.exits[0].graph.state_dict().items() if k.endswith("_q")}
    assert head_q == exit_q


@on_every_isa
def test_self_speculative_on_quantized_program_is_lossless(isa, model):
    """Drafts verified by the quantized Program: the output is that Program's own dense greedy output."""
    with kernels.use(isa):
        ids, mask = left_padded_batch([7, 4], model.config.vocab_size, seed=3)
        base = effx.transform(model, passes="quantize{bits=4}")
        spec = effx.transform(
            model,
            passes="early-exit{layers=0 thresholds=0.0 mode=self-speculative draft=3}, quantize{bits=4}",
        )
        a = base.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        b = spec.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        assert torch.equal(a, b)


def test_core_neurons_are_refused(model):
    with pytest.raises(PassPreconditionError, match="core"):
        effx.transform(model, passes="neuron-mask{mode=core keep=0.5}, quantize{bits=4}")


def test_gguf_source_needs_a_file(model):
    with pytest.raises(PassConfigError, match="GGUF"):
        effx.transform(model, passes="quantize{source=gguf}")


# -- exact GGUF import ------------------------------------------------------------------------------------

_TYPES = {"q4_1": gguf.GGMLQuantizationType.Q4_1, "q4_0": gguf.GGMLQuantizationType.Q4_0,
          "q8_0": gguf.GGMLQuantizationType.Q8_0}  # fmt: skip


def _gguf_model(tmp_path, kind_of):
    """A tiny model whose weights are exactly a GGUF file's de-quantized values (as transformers loads a GGUF),
    and that file: rows of q_proj are stored permuted (as llama's GGUF q/k are); one weight is left out."""
    model = tiny_model("llama", seed=4)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    left_out = "model.layers.1.mlp.down_proj.weight"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2:
                continue
            kind = _TYPES[kind_of(name)]
            blocks = gguf.quants.quantize(p.numpy(), kind)
            p.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, kind).reshape(p.shape)))
            if name.endswith("q_proj.weight"):
                blocks = blocks[::-1].copy()
            if name != left_out:
                writer.add_tensor(name, blocks, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, path


def test_gguf_import_is_exact(tmp_path):
    model, path = _gguf_model(
        tmp_path, lambda n: "q8_0" if "embed" in n else "q4_0" if "mlp" in n else "q4_1"
    )
    dense = effx.transform(model, passes=[], kernels="reference")
    q = effx.transform(model, passes=f"quantize{{source=gguf file={path}}}", kernels="reference")
    report = q.reports[0]
    assert any("gguf Q4_1" in what for _, what in report.changed)
    assert any("gguf Q4_0" in what for _, what in report.changed)
    assert any("gguf Q8_0" in what for _, what in report.changed)
    # the weight missing from the file is re-quantized, and the report says so
    assert [site for site, why in report.skipped] == ["layer.1 mlp.down"]
    assert "not in the GGUF file" in report.skipped[0][1]
    # every imported weight de-quantizes bitwise to the float weight: logits equal bitwise where every weight
    # was imported (layer 0, the embedding and the head)
    q0 = effx.transform(model, passes=f"quantize{{source=gguf file={path} layers=0}}", kernels="reference")
    ids, mask = left_padded_batch([6, 5], model.config.vocab_size, seed=5)
    valid = mask.bool()
    assert torch.equal(q0(ids, mask)[valid], dense(ids, mask)[valid])
    assert torch.equal(
        q0.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False),
        dense.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False),
    )


@on_every_isa
def test_gguf_import_with_fast_kernels_equals_fast_dense(isa, tmp_path):
    with kernels.use(isa):
        model, path = _gguf_model(tmp_path, lambda n: "q8_0" if "embed" in n else "q4_1")
        dense = effx.transform(model, passes=[])
        q = effx.transform(model, passes=f"quantize{{source=gguf file={path} layers=0}}")
        ids, mask = left_padded_batch([6, 5], model.config.vocab_size, seed=6)
        a = q.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        assert torch.equal(a, dense.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False))


def test_gguf_dequantization_matches_gguf_py(tmp_path):
    """effx's reading of each exact GGUF type de-quantizes bitwise as gguf-py does."""
    from effx.quant import gguf_weights

    w = np.random.default_rng(0).standard_normal((6, 256)).astype(np.float32)
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, kind in _TYPES.items():
        writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for t in gguf_weights(path):
        assert np.array_equal(t.weight().dequantize().numpy(), t.dequantized()), t.kind
        assert np.array_equal(
            dequantize(*t.weight().tensors(), 256).numpy(),
            gguf.quants.dequantize(gguf.quants.quantize(w, _TYPES[t.name]), _TYPES[t.name]),
        )


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q5_0", "Q5_1"])
def test_k_quant_blocks_dequantize_as_gguf_py(kind):
    """Q4_K and Q6_K (gguf-py cannot write them), and the 5-bit types: random blocks with finite float16
    (super-)block scales, read by effx and by gguf-py, de-quantize bitwise alike."""
    from effx.quant import GGUFTensor

    qtype = gguf.GGMLQuantizationType[kind]
    per_block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(1)
    rows, k = 3, 512
    blocks = rng.integers(0, 256, (rows * k // per_block, size), dtype=np.uint8)
    halves = rng.uniform(-0.05, 0.05, (blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
    if kind in ("Q4_K", "Q5_1"):
        blocks[:, :4] = halves  # d, dmin (d, m)
    elif kind == "Q5_0":
        blocks[:, :2] = halves[:, :2]  # d
    else:
        blocks[:, -2:] = halves[:, :2]  # d
    t = GGUFTensor("w", kind, rows, k, blocks.reshape(rows, -1))
    got = t.weight()
    assert got.bits == (4 if kind == "Q4_K" else 8) and got.group == (16 if kind == "Q6_K" else 32)
    assert (got.minimum is not None) == (kind in ("Q4_K", "Q5_1"))
    assert np.array_equal(got.dequantize().numpy(), t.dequantized())


# -- int8 activations -------------------------------------------------------------------------------------


def test_round_int8_rounds_each_block_to_its_int8_grid():
    from effx.quant import round_int8_reference

    x = torch.tensor([[0.5, -1.27, 0.0, 2.54, 0.0, 0.0, 1e-3]])
    y = round_int8_reference(x, 4)  # blocks [0.5, -1.27, 0, 2.54] (scale 0.02) and [0, 0, 1e-3] (padded)
    scale = 2.54 / 127
    assert torch.allclose(y[0, :4], torch.round(x[0, :4] / scale) * scale)
    assert torch.equal(y[0, 4:6], torch.zeros(2)) and torch.allclose(y[0, 6], torch.tensor(1e-3))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 100, generator=g)
    z[1, 2, :32] = 0  # a block of zeros stays zero
    rz = round_int8_reference(z, 32)
    blocks = torch.nn.functional.pad(z, (0, 28)).view(3, 5, 4, 32)
    step = (blocks.abs().amax(-1, keepdim=True) / 127).expand(-1, -1, -1, 32).reshape(3, 5, 128)[..., :100]
    assert ((rz - z).abs() <= step / 2 + 1e-7).all() and torch.equal(rz[1, 2, :32], torch.zeros(32))
    for isa in kernels.isas():  # the C kernel is the reference, bitwise, on every target
        with kernels.use(isa):
            assert torch.equal(kernels.round_int8(z, 32), rz)


@pytest.mark.parametrize("hidden", [64, 48])  # 48: inputs padded to whole blocks
def test_int8_activations_round_every_quantized_input_once(hidden):
    model = tiny_model("llama", layers=2, hidden=hidden)
    prog = effx.transform(model, "quantize{activations=int8}")
    assert prog.plan.activations == "int8"
    assert effx.Plan.from_json(prog.plan.to_json()).activations == "int8"
    graph = prog.layers[0].graph.graph
    rounds = [n for n in graph.nodes if n.target == torch.ops.effx.round_int8.default]
    products = [n for n in graph.nodes if n.target == QLINEAR]
    assert len(rounds) == 4 and len(products) == 7  # q/k/v share one input, gate/up one; o and down
    assert all(p.args[0] in rounds for p in products)
    assert all(n.meta["effx_pass"] == "quantize" and n.args[1] == 32 for n in rounds)
    assert "int8 activations" in prog.reports[-2].format()
    head = [n for n in prog.head.graph.graph.nodes if n.target == QLINEAR]
    assert head and all(p.args[0].target == torch.ops.effx.round_int8.default for p in head)  # LM head too
    # numbers: within the rounding of the float-activation Program, not equal to it
    exact = effx.transform(model, "quantize")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.inference_mode():
        a, b = prog(ids), exact(ids)
        ref = effx.transform(model, "quantize{activations=int8}", kernels="reference")(ids)
    assert not torch.equal(a, b)
    assert (a - b).abs().max() <= 0.1 * b.abs().max()
    torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-4)  # fast and reference kernels alike


@on_every_isa
@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(KINDS[:4]),
    group=st.sampled_from([16, 32, 64]),
    k=st.integers(1, 200),
    rows=st.integers(1, kernels.MAX_ROWS),
    seed=st.integers(0, 2**16),
)
def test_int8_activation_kernels_multiply_integers_within_float_rounding(isa, kind, group, k, rows, seed):
    """``int8=group``: the kernels round x themselves (round_int8's integers and scales) and sum the integer
    products exactly; the result is the float product over round_int8(x) up to float rounding (groups below
    32 take that float path itself, bitwise). Batch invariant: each row alone gives its bits."""
    with kernels.use(isa):
        g = torch.Generator().manual_seed(seed)
        n = 40
        w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g) * 3
        qw = _rtn(w, kind["bits"], group, kind.get("symmetric", False), torch.float16)
        tensors, wd = qw.tensors(), qw.dequantize()[:, :k]
        rx = kernels.round_int8(x, group)
        emulated = (rx.double() @ wd.double().T).float()
        bound = 2e-6 * (rx.abs().double() @ wd.abs().double().T).float() + 1e-30
        ids = torch.randint(0, n, (9,), generator=g)
        for got, want, rows_ in (
            (kernels.linear(x, tensors, None, group), emulated, slice(None)),
            (kernels.linear_rows(x, tensors, ids, group), emulated[:, ids], ids),
            (kernels.linear_many(x, (tensors, tensors), None, group)[1], emulated, slice(None)),
        ):
            assert ((got - want).abs() <= bound[:, rows_]).all()
            if group < 32:  # the float kernels over the rounded input
                assert torch.equal(got, kernels.linear(rx, wd)[:, rows_])
        assert torch.equal(
            kernels.linear(x[-1:], tensors, None, group), kernels.linear(x, tensors, None, group)[-1:]
        )
        silu = torch.nn.functional.silu
        gated = kernels.gated(x, tensors, tensors, group)
        assert ((gated - silu(emulated) * emulated).abs() <= 4 * bound * (1 + emulated.abs())).all()


def test_int8_activations_run_as_integer_products_in_fused_layers():
    """Lowering hands each rounded input's product to the kernels with ``int8=group`` (no rounding node
    left); the layer runs as one fused call with integer products; tokens match the reference emulation."""
    from effx.kernels.layer import FusedLayer
    from effx.kernels.lower import lowered
    from effx.runtime.torch_backend import torch_backend

    model = tiny_model("llama", layers=2, hidden=64)
    prog = effx.transform(model, "quantize{activations=int8}")
    graph = lowered(prog.layers[0].graph).graph
    takers = [n for n in graph.nodes if n.kwargs.get("int8") == 32]
    assert [n.target.__name__ for n in takers] == ["qkv_rope", "linear", "gated", "linear"]
    assert not [n for n in graph.nodes if n.target is kernels.round_int8]
    layers = [g for g in torch_backend(prog)._graphs.values() if isinstance(g, FusedLayer)]
    assert len(layers) == 2 and all(layer.params.wq.act8 and layer.params.wd.act8 for layer in layers)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.inference_mode():
        ref = effx.transform(model, "quantize{activations=int8}", kernels="reference")
        torch.testing.assert_close(prog(ids), ref(ids), rtol=1e-4, atol=1e-4)
        assert torch.equal(prog.generate(ids, max_new_tokens=8), ref.generate(ids, max_new_tokens=8))


def test_int8_activations_run_alike_in_onnx(tmp_path):
    """The artifact multiplies int8 activations in MatMulNBits (accuracy level 4): without a minimum its
    logits are torch's within float rounding; with one (Q4_1), whose minimum term reads the float input in
    ONNX and the rounded one in torch, both stay within twice torch's distance from float activations."""
    import onnx

    from effx.exporters import onnx as exporter
    from effx.runtime.forward import forward_logits
    from effx.runtime.onnx import load

    model = tiny_model("llama", layers=1, hidden=48, heads=3, kv_heads=1)  # inputs padded to whole blocks
    for pipeline in ("quantize{activations=int8}", "quantize{bits=8 symmetric=true activations=int8}"):
        prog = effx.transform(model, pipeline)
        out = exporter.export(prog, tmp_path / pipeline.replace(" ", "_"))
        gen = load(out)
        levels = {
            a.i
            for f in out.glob("layer.*.onnx")
            for n in onnx.load(str(f), load_external_data=False).graph.node
            if n.op_type == "MatMulNBits"
            for a in n.attribute
            if a.name == "accuracy_level"
        }
        assert levels == {4}
        ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
        with torch.inference_mode():
            want = prog(ids)
        got = torch.from_numpy(forward_logits(gen, ids.numpy()))
        if "symmetric" in pipeline:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:
            with torch.inference_mode():
                floats = effx.transform(model, "quantize")(ids)
            # the two int8 forms differ in the minimum terms only: far less than float activations would
            assert (got - want).abs().max() < 2 * (want - floats).abs().max()
            assert (got - floats).abs().max() < 2 * (want - floats).abs().max()


def test_bad_activation_settings_are_refused():
    with pytest.raises(PassConfigError, match="activations must be one of"):
        effx.passes.parse_pipeline("quantize{activations=int4}")
    with pytest.raises(PassConfigError, match="not bf16"):
        effx.passes.parse_pipeline("quantize{dtype=bf16 activations=int8}")
    data = effx.transform(tiny_model("llama")).plan.to_dict()
    assert data["activations"] == "float"
    del data["activations"]  # plans written before int8 activations read as float
    assert effx.Plan.from_dict(data).activations == "float"
    data["activations"] = "fp4"
    with pytest.raises(effx.PlanError, match="activations"):
        effx.Plan.from_dict(data)
