import pytest
import torch
from conftest import tiny_model

import effx
from effx import UnsupportedModelError
from effx.capture import capture

ROLES_EVERY_LAYER = {
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.o",
    "attn.sdpa",
    "mlp.gate",
    "mlp.up",
    "mlp.act",
    "mlp.down",
    "norm",
}


def test_stages_signatures_and_roles(llama_program):
    prog = llama_program
    assert [s.kind for s in prog] == ["embed", "layer", "layer", "head"]
    assert [s.layer for s in prog.layers] == [0, 1]
    for stage in prog.layers:
        roles = stage.role_counts()
        assert ROLES_EVERY_LAYER <= set(roles), roles
        # one projection node per linear of the layer
        for r in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"):
            assert roles[r] == 1
        layers = {n.meta["effx_layer"] for n in stage.graph.graph.nodes}
        assert layers == {stage.layer}
    assert prog.embed.role_counts().get("embed") == 1
    assert prog.head.role_counts().get("lm_head") == 1


def test_kv_cache_is_explicit(llama_program):
    layer = llama_program.layers[0].graph
    placeholders = [n.name for n in layer.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["hidden", "cos", "sin", "mask", "past_k", "past_v"]
    hidden = torch.randn(2, 3, 64)
    cos = torch.randn(2, 3, 16)
    past = torch.randn(2, 2, 5, 16)
    mask = torch.zeros(2, 1, 3, 8)
    out, k, v = layer(hidden, cos, cos, mask, past, past)
    assert out.shape == (2, 3, 64) and k.shape == (2, 2, 3, 16) and v.shape == (2, 2, 3, 16)
    # the same graph runs with an empty cache (prefill) and one new token (decode)
    empty = torch.zeros(1, 2, 0, 16)
    assert layer(hidden[:1], cos[:1], cos[:1], torch.zeros(1, 1, 3, 3), empty, empty)[0].shape == (1, 3, 64)
    assert (
        layer(hidden[:1, :1], cos[:1, :1], cos[:1, :1], torch.zeros(1, 1, 1, 6), past[:1], past[:1])[1].shape[
            2
        ]
        == 1
    )


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gemma3"])
def test_logits_match_the_model(kind):
    model = tiny_model(kind, layers=3)
    prog = capture(model)
    ids = torch.randint(3, 96, (2, 11))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert torch.equal(prog(ids), ref)


def test_reused_layer_graphs_equal_per_layer_export(llama):
    ids = torch.randint(3, 96, (1, 9))
    a = capture(llama, reuse_layer_graphs=True)(ids)
    b = capture(llama, reuse_layer_graphs=False)(ids)
    assert torch.equal(a, b)


def test_capture_shares_weights_and_leaves_the_model_untouched():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    prog = effx.transform(model)
    prog.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)
    assert model.config._attn_implementation == impl
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    q = prog.layers[0].graph.layer.self_attn.q_proj.weight
    assert q.data_ptr() == model.model.layers[0].self_attn.q_proj.weight.data_ptr()


def test_unsupported_architecture_names_class_and_step():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel.*'check architecture'.*gpt2"):
        capture(model)


def test_base_model_without_head_is_rejected():
    model = tiny_model("llama").model  # LlamaModel: no lm_head
    with pytest.raises(UnsupportedModelError, match="LlamaModel"):
        capture(model)


def test_not_a_model_is_rejected():
    with pytest.raises(UnsupportedModelError, match="not a transformers PreTrainedModel"):
        capture(torch.nn.Linear(2, 2))


def test_mismatch_is_caught_by_verification():
    model = tiny_model("llama")

    class Scaled(
        torch.nn.Module
    ):  # glue capture does not reproduce: embeddings scaled in the model's forward
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner.embed_tokens(input_ids) * 2

    class Wrapped(type(model)):
        def forward(self, input_ids=None, **kw):
            return super().forward(inputs_embeds=Scaled(self.model)(input_ids), **kw)

    wrapped = Wrapped(model.config).eval()
    wrapped.load_state_dict(model.state_dict())
    with pytest.raises(UnsupportedModelError, match="'verify'"):
        capture(wrapped)


def test_sliding_window_layers():
    model = tiny_model("mistral", sliding_window=4)
    prog = capture(model)
    assert prog.windows == {4}
    ids = torch.randint(3, 96, (1, 12))
    with torch.no_grad():
        assert torch.equal(prog(ids), model(input_ids=ids).logits)
