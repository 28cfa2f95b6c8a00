"""DraftBranch: the pass (stages, policy, checks of the weights file), the branch draft source (token-identical
to dense greedy, single rows and batches with holes, with prompt lookup), and training on the model's own
generations (acceptance before and after, the training-time-test masks)."""

import json

import pytest
import torch
from conftest import layer_inputs, tiny_model
from safetensors.torch import load_file, save_file

import effx
from effx.draft_branch import (
    BranchData,
    acceptance,
    chains,
    collect_branch_data,
    fit_draft_branch,
    init_branch,
    save_draft_branch,
)
from effx.errors import ArtifactError, PassConfigError, PassError, PlanError
from effx.exit_heads import own_generations
from effx.passes import DraftBranch, EarlyExit
from effx.passes.draft_branch import load_branch


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2, seed=3)


@pytest.fixture(scope="module")
def dense(model):
    return effx.transform(model)


def _generations(dense, n=24, new=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(3, 90, (8,), generator=g)
        gen = dense.generate(prompt[None], max_new_tokens=new, do_sample=False, eos_token_id=[])
        out.append((gen[0], 7, gen.shape[1] - 1))
    return out


@pytest.fixture(scope="module")
def sequences(dense):
    return _generations(dense, n=4, new=40)


@pytest.fixture(scope="module")
def trained(dense, sequences, tmp_path_factory):
    """A branch fitted on four of the tiny model's own greedy continuations until it drafts them well (a
    random model's text is not learnable from so little; these four are memorised, which is what the
    runtime test needs: drafts that a round accepts)."""
    data = collect_branch_data(dense, sequences, progress=False)
    result = fit_draft_branch(
        dense, data, steps=3, vocab_k=48, epochs=60, lr=3e-3, batch_tokens=48, holdout=0, progress=False
    )
    path = tmp_path_factory.mktemp("branch") / "branch.safetensors"
    save_draft_branch(dense, result, path)
    return result, path, data


def _branch(prog, args):
    """The branch's fuse and layer stages of ``prog`` on BranchLayer's inputs."""
    (fused,) = prog.stages[-4].graph(*args[:2])
    return prog.stages[-3].graph(fused, *args[2:])


def test_the_pass_adds_the_branch_before_the_head_and_sets_the_policy(model, trained):
    result, path, _ = trained
    prog = effx.transform(model, passes=f"draft-branch{{weights={path} draft=3}}")
    kinds = [s.kind for s in prog.stages]
    assert kinds[-4:] == ["branch_fuse", "branch", "branch_head", "head"]
    assert prog.plan.policy.draft_branch.draft == 3 and prog.plan.speculative
    assert prog.stages[-2].attrs["vocab_k"] == len(result.vocab) == 48
    # the branch head scores the draft vocabulary only
    logits = prog.stages[-2].graph(torch.randn(1, 2, prog.info.hidden_size))[0]
    outside = torch.ones(prog.info.vocab_size, dtype=torch.bool)
    outside[result.vocab] = False
    assert torch.isinf(logits[..., outside]).all() and torch.isfinite(logits[..., ~outside]).all()
    # the branch's stages compute what the module they were exported from computes; by default (bits=8)
    # their products read int8 weights, within int8 rounding of the float32 branch (bits=32)
    layer, _ = load_branch(str(path), prog.info)
    args = (
        torch.randn(2, 3, 64), torch.randn(2, 3, 64), torch.randn(2, 3, 16), torch.randn(2, 3, 16),
        torch.zeros(2, 1, 3, 5), torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16),
    )  # fmt: skip
    exact = effx.transform(model, passes=f"draft-branch{{weights={path} bits=32}}")
    for got, want in zip(_branch(exact, args), layer(*args), strict=True):
        torch.testing.assert_close(got, want)
    assert all(s.attrs["bits"] == 8 for s in prog.stages[-4:-1])
    assert all(s.attrs["bits"] == 32 for s in exact.stages[-4:-1])
    for stage in prog.stages[-4:-1]:
        linears = [n for n in stage.graph.graph.nodes if n.target == torch.ops.aten.linear.default]
        assert not linears and any(t.dtype == torch.int8 for t in stage.graph.buffers())
    for got, want in zip(_branch(prog, args), layer(*args), strict=True):
        err = (got - want).norm() / want.norm()
        assert 0 < err < 0.02
    # a later quantize keeps the int8 branch as the pass stored it, and quantizes a float32 one
    for bits, kept in ((8, True), (32, False)):
        spec = f"draft-branch{{weights={path} bits={bits}}}, quantize{{bits=4}}"
        stage = effx.transform(model, passes=spec).stages[-3]
        before = dict((prog if bits == 8 else exact).stages[-3].graph.named_buffers())
        after = dict(stage.graph.named_buffers())
        assert (
            after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
        ) == kept
        assert not [n for n in stage.graph.graph.nodes if n.target == torch.ops.aten.linear.default]
    # the plan round-trips with its stage kinds and policy
    assert effx.Plan.from_json(prog.plan.to_json()) == prog.plan


@pytest.mark.parametrize("bits", [32, 8])
def test_the_branch_layer_runs_as_one_kernel_call(model, trained, bits):
    """The branch's decoder layer has a captured layer's form, so the torch backend runs it as one kernel
    call, as it runs the model's layers; its output equals its lowered graph's within float rounding (the
    kernel's attention), its keys and values exactly."""
    from effx.kernels.layer import FusedLayer
    from effx.runtime.torch_backend import torch_backend

    prog = effx.transform(model, passes=f"draft-branch{{weights={trained[1]} bits={bits}}}")
    assert [s.kind for s in prog.stages][-4:] == ["branch_fuse", "branch", "branch_head", "head"]
    layer = torch_backend(prog)._graphs["branch"]
    assert isinstance(layer, FusedLayer)
    inputs = layer_inputs(prog, 2, 3, 5)
    with torch.inference_mode():
        want = layer.graph_module(*inputs)
        got = layer(*inputs)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert (got[0] - want[0]).norm() / want[0].norm() < 1e-6


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("extra", ["", ", prompt-lookup{min_ngram=1}"])
def test_branch_drafts_are_dense_greedy(model, dense, trained, sequences, rows, extra):
    """Token-identical to dense greedy decoding, one row or a left-padded batch whose rows accept different
    drafts (holes in the shared cache), alone or after prompt lookup."""
    _, path, _ = trained
    prog = effx.transform(model, passes=f"draft-branch{{weights={path} draft=4}}{extra}")
    prompts = [seq[:8] for seq, _, _ in sequences[:rows]]
    if rows > 1:  # a shorter prompt: the row's context differs from what the branch learned
        prompts[-1] = torch.cat([torch.zeros(3, dtype=torch.long), prompts[-1][3:]])
    ids = torch.stack(prompts)
    mask = torch.ones_like(ids)
    if rows > 1:
        mask[-1, :3] = 0
    want = dense.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False, eos_token_id=[])
    stats = {}
    got = prog.generate(
        ids, attention_mask=mask, max_new_tokens=48, do_sample=False, eos_token_id=[], stats=stats
    )
    assert torch.equal(got, want)
    assert stats["drafted"] > 0 and stats["accepted"] > 0
    branch = stats["sources"]["branch"]
    # per draft position: proposed and accepted counts add up to the source's totals, and fall with j
    assert (
        sum(branch["proposed_at"]) == branch["drafted"] and sum(branch["accepted_at"]) == branch["accepted"]
    )
    assert all(a <= p for a, p in zip(branch["accepted_at"], branch["proposed_at"], strict=False))
    assert branch["accepted_at"] == sorted(branch["accepted_at"], reverse=True)


def test_a_tight_cache_compacts_and_the_branch_follows(model, dense, trained, sequences, monkeypatch):
    """Rows that accept different drafts leave holes; a cache with no room for them is compacted, and the
    branch moves its features and recomputes its entries: the output is still dense."""
    import effx.runtime.loop as loop

    monkeypatch.setattr(loop, "capacity", lambda batch, prompt, new, draft: prompt + new + draft + 1)
    _, path, _ = trained
    prog = effx.transform(model, passes=f"draft-branch{{weights={path} draft=4 adaptive=false}}")
    ids = torch.stack([seq[:8] for seq, _, _ in sequences[:3]])
    ids[2, :4] = torch.tensor([9, 10, 11, 12])  # a row the branch has not learned: it rejects more
    want = dense.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=[])
    stats = {}
    got = prog.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=[], stats=stats)
    assert torch.equal(got, want)
    assert stats["compactions"] > 0 and stats["accepted"] > 0


def test_show_paths_marks_the_branch_drafts(model, trained, sequences):
    """``--show paths`` names each accepted branch draft: as many marks as the run accepted drafts."""
    from effx.show import Tracer

    _, path, _ = trained
    prog = effx.transform(model, passes=f"draft-branch{{weights={path} draft=3 adaptive=false}}")
    tracer = Tracer({}, prog.info.num_layers)
    seq, first, _ = sequences[0]
    prog.generate(
        seq[None, : first + 1],
        max_new_tokens=24,
        eos_token_id=[],
        on_token=tracer.on_token,
        stats=tracer.stats,
    )
    drafts = [m.draft for m in tracer.marks if m.draft]
    assert len(tracer.marks) == 24 and tracer.stats["accepted"] > 0
    assert drafts == ["branch"] * tracer.stats["accepted"]


def test_training_raises_acceptance(trained):
    result, _, _ = trained
    assert len(result.before) == len(result.after) == 3
    assert result.before[0] < 0.2 and result.after[0] > 0.6
    assert result.after[0] >= result.after[1] >= result.after[2]  # a chain: j drafts all accepted
    assert result.losses[-1] < result.losses[0] / 2


def test_decoding_accepts_what_training_predicts(model, dense, trained, sequences):
    """The runtime's rounds (catch-up on true features, then drafting on predicted ones, each key where a
    round puts it) are the chains training scores: the drafts a decode accepts on a training sequence are
    those that ``chains`` predicts, round by round."""
    result, path, data = trained
    from effx.draft_branch import _Head

    head = _Head(dense, torch.tensor(result.vocab))
    # three drafts every round, as chains scores them (no pacing), with the float32 branch it trained
    prog = effx.transform(model, passes=f"draft-branch{{weights={path} draft=3 adaptive=false bits=32}}")
    predicted = accepted = 0
    for i, (ids, first, _) in enumerate(sequences):
        lengths = chains(result.layer, dense, data, i, head, 3)
        end, p = ids.numel(), first + 1  # the first round starts at the first generated token
        while p + 1 < end:
            k = min(lengths[p - first - 1], 3, end - p - 2)
            predicted += k
            p += k + 1
        stats = {}
        prompt = ids[None, : first + 1]
        out = prog.generate(
            prompt, max_new_tokens=end - first - 1, do_sample=False, eos_token_id=[], stats=stats
        )
        assert torch.equal(out[0], ids)
        accepted += stats["accepted"]
    assert predicted > 60
    assert abs(accepted - predicted) <= 2


def test_training_masks_match_a_drafting_round():
    from effx.draft_branch import _masks

    valid = torch.ones(1, 5, dtype=torch.bool)
    m = _masks(5, 2, valid)[0, 0] == 0  # [5 queries, 15 keys]: step 0, step 1, step 2
    # query 4 drafted 2 steps into a round that started at 2: true keys 0..2, step 1's key at 3, its own at 4
    assert m[4].nonzero().flatten().tolist() == [0, 1, 2, 5 + 3, 10 + 4]
    assert m[1].nonzero().flatten().tolist() == [5 + 0, 10 + 1]  # a round that started before the text


def test_acceptance_counts_chains(dense):
    """acceptance() of a branch that always drafts the right token is 1 at every position, of one that
    never does 0 (checked through a head that maps features to fixed tokens)."""
    data = collect_branch_data(dense, _generations(dense, n=3, new=12), progress=False)
    layer = init_branch(dense)

    class Head:
        ids = None
        column = torch.arange(dense.info.vocab_size)

        def __init__(self, right):
            self.right = right

        def __call__(self, h):
            # the correct targets of the sequence being scored, one-hot
            return torch.nn.functional.one_hot(self.tokens, dense.info.vocab_size).float() * (
                1.0 if self.right else -1.0
            )

    head = Head(True)
    for i in range(3):
        head.tokens = data.targets[i][None]
        n, first = data.ids[i].numel(), data.first[i]
        # every round accepts both drafts, but the last, which has one token left to draft
        assert chains(layer, dense, data, i, head, 2) == [2] * (n - first - 2) + [1]
        assert acceptance(layer, dense, data, [i], head, 2) == [1.0, (n - first - 2) / (n - first - 1)]
    head = Head(False)
    head.tokens = data.targets[0][None]
    assert acceptance(layer, dense, data, [0], head, 2) == [0.0, 0.0]


def test_weights_file_is_checked_before_capture(model, dense, trained, tmp_path):
    _, path, _ = trained
    with pytest.raises(PassConfigError, match="weights="):
        DraftBranch()
    with pytest.raises(PassConfigError, match="no such file"):
        effx.transform(model, passes=f"draft-branch{{weights={tmp_path / 'none.safetensors'}}}")
    with pytest.raises(PassConfigError, match="draft must be an integer >= 1"):
        DraftBranch(weights=str(path), draft=0)
    with pytest.raises(PassConfigError, match="bits must be 8"):
        DraftBranch(weights=str(path), bits=4)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["effx"])

    def write(name, tensors, meta):
        bad = tmp_path / name
        save_file(tensors, str(bad), metadata={"effx": json.dumps(meta)})
        return bad

    cases = {
        "shape.safetensors": ({**tensors, "q.weight": tensors["q.weight"][:, :8].contiguous()}, meta, "q.weight is"),
        "nan.safetensors": (
            {**tensors, "fc.weight": tensors["fc.weight"] * float("nan")}, meta, "NaN or infinite",
        ),
        "model.safetensors": (tensors, {**meta, "hidden_size": 32}, "hidden_size=32"),
        "missing.safetensors": ({k: v for k, v in tensors.items() if k != "down.weight"}, meta, "lacks"),
        "vocab.safetensors": (tensors, {**meta, "vocab": [1, 1, 2]}, "distinct token ids"),
        "kind.safetensors": (tensors, {**meta, "kind": "other"}, "not written by"),
    }  # fmt: skip
    for name, (t, m, match) in cases.items():
        bad = write(name, t, m)
        with pytest.raises(ArtifactError, match=match):
            load_branch(str(bad), dense.info)
        with pytest.raises(PassConfigError, match="weights: "):
            effx.transform(model, passes=f"draft-branch{{weights={bad}}}")


def test_refused_with_lossy_exits_twice_and_in_a_bad_plan(model, dense, trained):
    _, path, _ = trained
    with pytest.raises((PassConfigError, PassError), match="lossy early exits"):
        effx.transform(model, passes=[EarlyExit(layers=[0], mode="lossy"), DraftBranch(weights=str(path))])
    prog = effx.transform(model, passes=[DraftBranch(weights=str(path))])
    with pytest.raises(PassError, match="already drafts"):
        DraftBranch(weights=str(path)).apply(prog)
    # a plan with the stages and no policy, or the policy and no stages, is refused
    plan = prog.plan
    import dataclasses

    with pytest.raises(PlanError, match="both its stages and its draft_branch policy"):
        dataclasses.replace(plan, policy=dense.plan.policy).validate()
    with pytest.raises(PlanError, match="must be followed by its branch_head"):
        dataclasses.replace(plan, stages=tuple(s for s in plan.stages if s.kind != "branch_head")).validate()
    # a plan from before the fusion was a stage of its own (an older artifact) is told to export again
    with pytest.raises(
        PlanError, match="must directly follow its branch_fuse stage.*export the program again"
    ):
        dataclasses.replace(plan, stages=tuple(s for s in plan.stages if s.kind != "branch_fuse")).validate()


def test_data_split_holds_out_whole_sequences(dense):
    data = BranchData(
        [torch.zeros(3, dtype=torch.long)] * 10, [torch.zeros(3, 4)] * 10, [torch.zeros(3)] * 10, [0] * 10
    )
    train, held = data.split(0.2)
    assert train == list(range(8)) and held == [8, 9]
    assert data.tokens == 30
    # with text chunks (no prompt) and generations, generations are held out
    data.first = [0, 0, 0, 0, 0, 0, 4, 4, 4, 4]
    assert data.split(0.5) == ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9])
    assert data.split(0.0) == (list(range(10)), list(range(10)))


def test_own_generations_feed_training(dense):
    """The training data keeps, per sequence, the model's greedy next token at each position: on the
    generated part it is the next token itself."""
    from effx.testing import tiny_tokenizer

    seqs = own_generations(dense, tiny_tokenizer(), ["w5 w6 w7"], max_new_tokens=6, progress=False)
    data = collect_branch_data(dense, seqs, progress=False)
    ids, targets, first = data.ids[0], data.targets[0], data.first[0]
    assert torch.equal(targets[first:-1], ids[first + 1 :])
    assert data.features[0].shape == (ids.numel(), dense.info.hidden_size)


def test_own_generations_batch_prompts_by_length(dense):
    """Within a window of prompts, batches are formed by length (left padding costs a prefill); every prompt
    is generated once, the sequences come back in the prompts' order, each with its prompt first."""
    from effx.data import encode_prompts
    from effx.testing import tiny_tokenizer

    batches = []
    tok = tiny_tokenizer()
    prompts = ["w5", "w5 w6 w7 w8 w9 w10", "w6 w7", "w9 w8 w7 w6 w5 w4 w3", "w3 w4 w5"]
    lengths = {encode_prompts(tok, [p])[0].shape[1]: i for i, p in enumerate(prompts)}

    class Recorder:
        plan = dense.plan

        def generate(self, ids, attention_mask, **kw):
            batches.append([lengths[int(n)] for n in attention_mask.sum(1)])
            return dense.generate(ids, attention_mask=attention_mask, **kw)

    seqs = own_generations(Recorder(), tok, prompts, max_new_tokens=4, batch_size=2, progress=False)
    assert [len(b) for b in batches] == [2, 2, 1]
    # the short prompts share the first batch, the long ones the next
    assert [sorted(b) for b in batches] == [[0, 2], [1, 4], [3]]
    for p, (ids, first, last) in zip(prompts, seqs, strict=True):
        prompt = encode_prompts(tok, [p])[0][0]
        assert first == prompt.numel() - 1 < last == ids.numel() - 1
        assert torch.equal(ids[: prompt.numel()], prompt)


def test_collection_batches_sequences_and_keeps_their_order(dense):
    """Sequences of different lengths read right-padded in batches give each sequence's own features and
    targets, in the order given; in bfloat16 the features stay close to float32's."""
    seqs = [(s[0][: 20 + 7 * i], s[1], s[2]) for i, s in enumerate(_generations(dense, n=5, new=30, seed=4))]
    alone = collect_branch_data(dense, seqs, batch_tokens=1, bf16=False, progress=False)
    batched = collect_branch_data(dense, seqs, batch_tokens=4096, bf16=False, progress=False)
    half = collect_branch_data(dense, seqs, batch_tokens=4096, bf16=True, progress=False)
    for i, (ids, first, _) in enumerate(seqs):
        assert torch.equal(alone.ids[i], ids) and torch.equal(batched.ids[i], ids)
        assert alone.first[i] == batched.first[i] == first
        # a prefill's products run on torch's F.linear, whose last bits depend on the batch's shape
        torch.testing.assert_close(batched.features[i], alone.features[i], rtol=1e-3, atol=5e-4)
        assert torch.equal(batched.targets[i], alone.targets[i])
        err = (half.features[i] - alone.features[i]).norm() / alone.features[i].norm()
        assert 0 < err < 0.05  # bfloat16 products, not float32's


def test_bf16_only_where_the_cpu_has_it(monkeypatch):
    import effx.draft_branch as db

    monkeypatch.setattr(db, "cpu_features", lambda: frozenset({"avx2", "fma"}))
    assert not db.native_bf16()
    monkeypatch.setattr(db, "cpu_features", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert db.native_bf16()
    monkeypatch.setattr(db, "cpu_features", lambda: frozenset({"asimd", "bf16"}))
    assert db.native_bf16()


def test_later_steps_are_scored_where_the_drafts_before_them_are_right():
    from effx.draft_branch import _step_masks

    ids = torch.tensor([[5, 6, 7, 9, 1, 2]])
    targets = torch.tensor([[6, 7, 8, 1, 2, 3]])  # the model's greedy token after each position
    valid = torch.ones(1, 6, dtype=torch.bool)
    valid[0, 5] = False
    masks = _step_masks(ids, targets, valid, 3)
    # ids agree with the greedy token before them at 1, 2, 4 (and 5, padding); 3 does not (9 != 8)
    assert masks[0][0].tolist() == [True] * 5 + [False]
    assert masks[1][0].tolist() == [False, True, True, False, True, False]
    assert masks[2][0].tolist() == [False, False, True, False, False, False]


def test_the_branch_exports_and_drafts_the_same_on_onnx_runtime(model, trained, sequences, tmp_path):
    """The branch stages go into the ONNX artifact like any stage, and ONNX Runtime makes the same drafts,
    accepts the same ones and emits the same tokens as torch (the float32 branch, drafting every round: the
    adaptive rule times the machine, and two backends' int8 products differ in their last bits, either of
    which may change a draft). The default int8 branch runs there too, and its output is the dense one."""
    from effx.exporters.onnx import export
    from effx.runtime.onnx import load

    _, path, _ = trained
    ids = sequences[1][0][None, :8]
    dense = effx.transform(model).generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=[])
    for bits in (32, 8):
        prog = effx.transform(
            model, passes=f"draft-branch{{weights={path} draft=3 adaptive=false bits={bits}}}"
        )
        gen = load(export(prog, tmp_path / f"art{bits}"))
        assert [s.kind for s in gen.plan.stages][-3:] == ["branch", "branch_head", "head"]
        assert gen.plan.stages[-3].attrs["bits"] == bits
        torch_stats, onnx_stats = {}, {}
        want = prog.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=[], stats=torch_stats)
        got = gen.generate(ids.numpy(), max_new_tokens=30, eos_token_id=[], stats=onnx_stats)
        assert torch.equal(torch.from_numpy(got), want) and torch.equal(want, dense)
        assert onnx_stats["accepted"] > 0
        if bits == 32:
            assert onnx_stats["accepted"] == torch_stats["accepted"]
            assert onnx_stats["drafted"] == torch_stats["drafted"]
