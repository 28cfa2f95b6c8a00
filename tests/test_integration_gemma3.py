"""The real Gemma 3 270M (262,144-token vocabulary, local and global attention layers, two rotary tables):
the dense Program is token-identical to ``model.generate`` on a left-padded batch, and the GGUF file's own
values (Q5_0, Q4_K, Q6_K, Q8_0) are imported exactly."""

import pytest
import torch

import effx
from effx.data import encode_prompts

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""']


@pytest.fixture(scope="module")
def batch(gemma3):
    _, tokenizer = gemma3
    ids, mask = encode_prompts(tokenizer, PROMPTS)  # no chat template: plain text with <bos>
    assert bool((ids[mask.bool()] == tokenizer.bos_token_id).sum() == 2)
    return ids, mask


def test_dense_is_token_identical_to_model_generate(gemma3, batch):
    model, _ = gemma3
    ids, mask = batch
    prog = effx.transform(model, kernels="reference")
    assert prog.info.rope_tables == 2 and len(prog.layers) == 18
    windows = [s.attrs["sliding_window"] for s in prog.layers]
    assert windows.count(None) == 3 and set(windows) == {None, 512}  # 5 local layers to 1 global
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24)
    assert torch.equal(prog.generate(ids, attention_mask=mask, max_new_tokens=24), ref)
    fast = effx.transform(model)  # effx's kernels: last-bit differences, the same greedy tokens here
    assert torch.equal(fast.generate(ids, attention_mask=mask, max_new_tokens=24), ref)


def test_gguf_values_are_imported_exactly(gemma3, batch):
    model, _ = gemma3
    ids, mask = batch
    dense = effx.transform(model, kernels="reference")
    q = effx.transform(model, passes="quantize{source=gguf}", kernels="reference")
    report = next(r for r in q.reports if r.name == "quantize")
    kinds = {what for _, what in report.changed}
    assert report.skipped == [] and kinds == {"gguf Q5_0", "gguf Q4_K", "gguf Q6_K", "gguf Q8_0"}
    with torch.inference_mode():
        assert torch.equal(q(ids, mask), dense(ids, mask))  # every weight de-quantizes bitwise
    assert effx.flops.weight_bytes(q) < 0.3 * effx.flops.weight_bytes(dense)
    # effx's kernels on the quantized bytes: the float kernels' last-bit differences, the same greedy tokens
    fast, fast_q = effx.transform(model), effx.transform(model, passes="quantize{source=gguf}")
    ref = fast.generate(ids, attention_mask=mask, max_new_tokens=16)
    assert torch.equal(fast_q.generate(ids, attention_mask=mask, max_new_tokens=16), ref)
