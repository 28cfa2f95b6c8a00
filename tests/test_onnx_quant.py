"""ONNX artifacts of quantized Programs (effx.exporters.onnx_quant): ``effx.qlinear`` as ONNX Runtime's
``com.microsoft.MatMulNBits`` (plus the minimum term), ``effx.qembedding`` as a Gather of the quantized rows
and their de-quantization; logits equal to the quantized torch Program's up to float rounding, the same
greedy tokens, only quantized bytes in the artifact, and a tied embedding and LM head stored once."""

import importlib
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import left_padded_batch, tiny_model

import effx
from effx.exporters import onnx as exporter
from effx.exporters import onnx_quant
from effx.quant import pack4, quantize_rtn, unpack4
from effx.runtime import onnx as ort_runtime
from effx.runtime.forward import forward_logits
from effx.testing import TINY_VOCAB

V = TINY_VOCAB
KINDS = {
    "int4": "quantize{bits=4}",
    "int4-sym": "quantize{bits=4 symmetric=true}",
    "int8-sym": "quantize{bits=8 symmetric=true}",
    "int8": "quantize{bits=8}",
    "bf16": "quantize{dtype=bf16}",
}
# of the largest logit: MatMulNBits sums in another order than torch's F.linear (and the 4-bit asymmetric
# form adds the minimum term apart), which measured at most 4e-6 of it here; the quantization error itself
# is 1e-2 and more
TOLERANCE = 5e-5
# the weight store's bytes / the float32 model's weight bytes (its scales and minimums lie inside the
# graph files, as every tensor under 1 KB)
RATIO = {"int4": 0.3, "int4-sym": 0.3, "int8-sym": 0.4, "int8": 0.4, "bf16": 0.6}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=3, seed=5, tie=True)  # tied: the embedding and the LM head share bytes


def _float_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2)


def _stage_models(artifact):
    manifest = json.loads((artifact / "plan.json").read_text())
    entries = [*manifest["files"].values(), *manifest["segments"]]
    return {e["onnx"]: onnx.load(str(artifact / e["onnx"]), load_external_data=False) for e in entries}


def _placed(model):
    """``(offset, length)`` in the weight store of a stage's quantized LM head values (its largest
    initializer of ``V`` rows that is not float32: not the scales, minimums or zero points)."""
    init = max(
        (t for t in model.graph.initializer if t.dims[:1] == [V] and t.data_type != onnx.TensorProto.FLOAT),
        key=lambda t: int(np.prod(t.dims)),
    )
    data = {d.key: d.value for d in init.external_data}
    return int(data["offset"]), int(data["length"])


def _check_parity(program, artifact, batches=([7, 3], [5], [4, 9, 6, 2])):
    gen = ort_runtime.load(artifact)
    for lengths in batches:
        ids, mask = left_padded_batch(lengths, V, seed=sum(lengths))
        valid = mask.bool().numpy()
        ref = program(ids, mask).detach().numpy()[valid]
        got = forward_logits(gen, ids.numpy(), mask.numpy())[valid]
        assert np.abs(got - ref).max() <= TOLERANCE * np.abs(ref).max(), lengths
        torch_stats, onnx_stats = {}, {}
        want = program.generate(
            ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[], stats=torch_stats
        )
        out = gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=8, eos_token_id=[], stats=onnx_stats)
        assert np.array_equal(out, want.numpy()), lengths
        assert onnx_stats == torch_stats
    return gen


@pytest.mark.parametrize("kind", list(KINDS))
def test_quantized_artifacts_match_the_torch_program(model, kind, tmp_path, monkeypatch):
    stage_export = importlib.import_module("effx.exporters.onnx_stage")
    calls = []
    real = stage_export.export_onnx
    monkeypatch.setattr(
        stage_export, "export_onnx", lambda gm, *a, **kw: calls.append(gm) or real(gm, *a, **kw)
    )
    program = effx.transform(model, passes=KINDS[kind], kernels="reference")
    artifact = exporter.export(program, tmp_path / kind)
    assert len(calls) == 3  # embed, one layer (the others are it with their own quantized tensors), head
    _check_parity(program, artifact)

    models = _stage_models(artifact)
    for path, m in models.items():
        onnx.checker.check_model(str(artifact / path), full_check=True)
        assert all(n.domain != onnx_quant.DOMAIN for n in m.graph.node), path  # placeholders all lowered
        # no float copy of a weight: the float32 matrices are scales and minimums, k / 32 wide (k is 64, 96)
        floats = [
            t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
        ]
        assert all(t.dims[1] <= 3 for t in floats), path
    ops = [n.op_type for n in models["layer.1.onnx"].graph.node]
    # q, k and v as one product, gate and up as one (split after), o and down (8 bits at accuracy level 4
    # on int8-exact terms of the input); bfloat16 is folded to float32 at load
    nbits = [n for n in models["layer.1.onnx"].graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == (4 if kind.startswith("int") else 0)
    assert ops.count("Split") == len(nbits) // 2
    levels = {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"}
    assert levels == ({4} if kind.startswith("int8") else {1} if nbits else set())
    assert (artifact / "weights.bin").stat().st_size < RATIO[kind] * _float_bytes(model)

    # the tied embedding and LM head: the same bytes in the store, read by the lookup and by the product
    assert _placed(models["embed.onnx"]) == _placed(models["head.onnx"])


def test_quantized_exits_and_pruned_vocabularies(tmp_path):
    """Early exits over the quantized head, pruned by VocabReduce (the pruned exits gather the head's
    quantized rows and de-quantize them in the graph): same tokens and exit decisions as the torch
    Program, every head sharing the one stored copy of the LM head."""
    model = tiny_model("llama", layers=4, seed=3)
    passes = "early-exit{layers=0,1,2 thresholds=0.3}, vocab-reduce{k=20}, quantize{bits=4}"
    program = effx.transform(model, passes=passes, kernels="reference")
    exits = [s for s in program if s.kind == "exit"]
    assert [s.attrs.get("vocab") for s in exits] == [None, "pruned", "pruned"]
    artifact = exporter.export(program, tmp_path / "exits")
    gen = _check_parity(program, artifact)
    ids, mask = left_padded_batch([4, 12, 6, 2], V, seed=7)
    stats = {}
    gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=9, eos_token_id=[], stats=stats)
    assert len({d for step in stats["exit_layers"] for d in step}) >= 2  # exits fire at several depths
    models = _stage_models(artifact)
    for path in models:
        onnx.checker.check_model(str(artifact / path), full_check=True)
    for stage in exits:
        assert _placed(models[f"{stage.name}.onnx"]) == _placed(models["head.onnx"]), stage.name


# -- the operators, one graph of many forms --------------------------------------------------------------

# bits, symmetric, group, k, bias, scale dtype, rows gathered (a reduced head's index_select)
PRODUCTS = [
    (4, False, 32, 64, False, torch.float16, False),
    (4, True, 16, 40, False, torch.float16, False),  # effx pads k to 64: a block more than MatMulNBits'
    (4, False, 16, 40, False, torch.float16, False),
    (8, False, 64, 96, False, torch.float16, False),  # a partial last block
    (8, True, 32, 40, False, torch.float16, False),
    (4, False, 32, 96, True, torch.float32, False),  # float32 scales (GGUF Q4_K) and a bias
    (16, False, 32, 40, True, torch.float16, False),
    (4, False, 32, 64, False, torch.float16, True),
    (8, True, 16, 40, False, torch.float16, True),
]
LOOKUPS = [(4, False, 16, 40), (4, True, 32, 64), (8, False, 64, 96), (8, True, 32, 64), (16, False, 32, 40)]


class _Ops(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.products, self.lookups = [], []
        for i, (bits, sym, group, k, bias, scale, gathered) in enumerate(PRODUCTS):
            qw = quantize_rtn(torch.randn(24, k, generator=g), bits, group, symmetric=sym, scale_dtype=scale)
            if bias:
                self.register_buffer(f"p{i}_bias", torch.randn(24, generator=g))
            self.products.append((self._store(f"p{i}", qw), f"p{i}_bias" if bias else None, k, gathered))
        for i, (bits, sym, group, k) in enumerate(LOOKUPS):
            qw = quantize_rtn(torch.randn(30, k, generator=g), bits, group, symmetric=sym)
            self.lookups.append((self._store(f"e{i}", qw), k))

    def _store(self, base, qw):
        names = []
        for part, t in zip(("q", "scale", "min"), qw.tensors(), strict=True):
            names.append(None if t is None else f"{base}_{part}")
            if t is not None:
                self.register_buffer(names[-1], t)
        return names

    def _get(self, name):
        return None if name is None else getattr(self, name)

    def forward(self, x40, x64, x96, ids, rows):
        xs = {40: x40, 64: x64, 96: x96}
        outs = []
        for names, bias, k, gathered in self.products:
            q, scale, minimum = (self._get(n) for n in names)
            if gathered:
                q, scale, minimum = (
                    None if t is None else t.index_select(0, rows) for t in (q, scale, minimum)
                )
            outs.append(torch.ops.effx.qlinear(xs[k], q, scale, minimum, self._get(bias)))
        for names, k in self.lookups:
            outs.append(torch.ops.effx.qembedding(ids, *(self._get(n) for n in names), k))
        return tuple(outs)


def _lowered_ops(monkeypatch, nbits=onnx_quant.NBITS, terms=onnx_quant.TERMS):
    """The graph of every form, lowered, checked, run: ``(model, the torch outputs, ONNX Runtime's)``."""
    import onnxruntime as ort

    from effx.exporters.onnx_stage import export_onnx

    monkeypatch.setattr(onnx_quant, "NBITS", nbits)
    monkeypatch.setattr(onnx_quant, "TERMS", terms)
    mod = _Ops()
    ids, rows = torch.tensor([[0, 5, 29], [7, 7, 1]]), torch.tensor([3, 0, 11, 23])
    args = (
        *(torch.randn(2, 3, k, generator=torch.Generator().manual_seed(k)) for k in (40, 64, 96)),
        ids,
        rows,
    )
    seq = {0: "batch", 1: "seq"}
    with torch.no_grad():
        want = [t.numpy() for t in mod(*args)]
        model = export_onnx(
            mod, args, (seq, seq, seq, seq, {0: "rows"}), 18, translations=onnx_quant.translations()
        )
    model = onnx_quant.lower(model)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, [a.numpy() for a in args], strict=True)))
    return model, want, got


def _error(w, g) -> float:
    return float(np.abs(g - w).max() / np.abs(w).max())


@pytest.mark.parametrize("nbits", [(4, 8), (4,)], ids=["default", "int8-folded"])
def test_every_quantized_form_lowers_exactly(nbits, monkeypatch):
    """Products within float rounding of the reference ops (groups 16..64, padded and partial blocks, a
    bias, float32 scales, gathered rows), and lookups bitwise equal to them; 8-bit products as MatMulNBits
    over int8-exact terms of the input (the default) and de-quantized to float32 weights."""
    model, want, got = _lowered_ops(monkeypatch, nbits)
    nbits_nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    # one each: no two of them read one input with one layout (layers' q, k and v do: the test above)
    assert len(nbits_nodes) == sum(p[0] in nbits and not p[-1] for p in PRODUCTS)
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        if i < len(PRODUCTS):
            assert _error(w, g) <= 1e-5, PRODUCTS[i]  # measured: <= 1e-6
        else:
            assert np.array_equal(g, w), LOOKUPS[i - len(PRODUCTS)]


def test_int8_terms_are_what_makes_accuracy_level_4_exact(monkeypatch):
    """8-bit products at accuracy level 4 (int8 arithmetic) on the plain input are off by about 2^-8 of the
    largest output; on three int8-exact terms of it, within float rounding. One rounding per term but the
    last, made once per input and layout."""
    eight = [i for i, p in enumerate(PRODUCTS) if p[0] == 8 and not p[-1]]
    errors = {}
    for terms in (1, 3):
        model, want, got = _lowered_ops(monkeypatch, terms=terms)
        errors[terms] = max(_error(want[i], got[i]) for i in eight)
        levels = [
            a.i
            for n in model.graph.node
            if n.op_type == "MatMulNBits" and n.attribute
            for a in n.attribute
            if a.name == "accuracy_level"
        ]
        assert levels.count(4) == len(eight)  # (the two 8-bit products read different inputs)
        assert sum(n.op_type == "Round" for n in model.graph.node) == (terms - 1) * len(eight)
    assert errors[1] > 1e-3 and errors[3] <= 1e-5, errors


def test_repack4_is_matmulnbits_nibble_order():
    u = torch.randint(0, 16, (5, 128), dtype=torch.uint8)
    packed = onnx_quant.repack4(pack4(u).numpy())
    assert np.array_equal(packed & 15, u[:, 0::2].numpy()) and np.array_equal(packed >> 4, u[:, 1::2].numpy())
    assert torch.equal(unpack4(pack4(u)), u)
