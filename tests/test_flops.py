import torch
from fvcore.nn import FlopCountAnalysis
from torch.utils.flop_counter import FlopCounterMode

from effx.flops import count_graph_flops, decode_flops, prefill_flops, stage_inputs


def _real(inputs):
    out = []
    for x in inputs:
        if x.dtype == torch.long:
            out.append(torch.zeros(x.shape, dtype=torch.long))
        else:
            out.append(torch.zeros(x.shape, dtype=x.dtype))
    return tuple(out)


def _fvcore(gm, inputs):
    analysis = FlopCountAnalysis(gm, inputs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total()


def test_head_flops_agree_with_fvcore(llama_program):
    stage = llama_program.head
    inputs = stage_inputs(llama_program, "head", batch=2, seq=3, past=0)
    ours = sum(count_graph_flops(stage.graph, inputs).values())
    assert ours == 2 * _fvcore(stage.graph, _real(inputs)) == 2 * 2 * 3 * 64 * 96


def test_layer_flops_agree_with_fvcore_and_torch(llama_program):
    stage = llama_program.layers[0]
    inputs = stage_inputs(llama_program, "layer", batch=1, seq=4, past=6)
    by_role = count_graph_flops(stage.graph, inputs)
    # fvcore counts the projections (one multiply-add = 1) and does not know scaled_dot_product_attention
    projections = sum(v for r, v in by_role.items() if r != "attn.sdpa")
    assert projections == 2 * _fvcore(stage.graph, _real(inputs))
    # torch's own counter agrees on the projections (it does not count the CPU flash-attention kernel)
    with FlopCounterMode(display=False) as counter:
        stage.graph(*_real(inputs))
    assert projections == counter.get_total_flops()
    # attention: 4 heads x 4 queries x 10 keys x head_dim 16, two products, 2 FLOPs each
    assert by_role["attn.sdpa"] == 2 * 2 * 4 * 4 * 10 * 16


def test_decode_flops_grow_with_context_and_prefill_with_prompt(llama_program):
    assert decode_flops(llama_program, context=100) > decode_flops(llama_program, context=10)
    assert prefill_flops(llama_program, 20) > prefill_flops(llama_program, 10)
