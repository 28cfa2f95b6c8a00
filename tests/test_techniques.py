"""The technique registry (effx.techniques): techniques declared once, read by the plan, the exporter, FLOP
counting, the decode loop and the ONNX backend. Two toy techniques declared here, outside effx, run on both
backends without a line of effx changed: a draft source, and a pass with a stage kind and a prefill hook."""

import dataclasses
import json

import pytest
import torch
from conftest import tiny_model

import effx
from effx import techniques
from effx.errors import PlanError
from effx.fx import export_function
from effx.passes import Pass, PassResult
from effx.program import Stage
from effx.techniques import StageKind, Technique
from effx.techniques.draft import Draft, DraftSource

# -- a toy draft source: each row drafts its last token again -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RepeatPolicy:
    draft: int = 2

    def __post_init__(self):
        if self.draft < 1:
            raise PlanError(f"toy-repeat draft must be >= 1, got {self.draft}")


class RepeatDraft(DraftSource):
    name = "repeat"

    def __init__(self, draft):
        self.draft = draft

    def propose(self, spec, n):
        xp = spec.xp
        tokens = xp.stack([spec.last] * n, axis=1)
        return Draft(tokens, [n if a else 0 for a in spec.active])


@dataclasses.dataclass(frozen=True)
class ToyRepeat(Pass):
    name = "toy-repeat"
    draft: int = 2

    def apply(self, program):
        policy = program.plan.policy.updated(toy_repeat=RepeatPolicy(self.draft))
        return PassResult(program.with_stages(program.stages, policy=policy), True, self.new_report())


REPEAT = Technique(
    name="toy-repeat",
    key="toy_repeat",
    policy=RepeatPolicy,
    speculative=lambda policy, plan: True,
    rollback=lambda policy, plan: True,
    draft=lambda policy, plan: RepeatDraft(policy.draft),
)

# -- a toy stage kind: a prefill-only probe after the embedding, run by the technique's prefill hook ------------

SEEN: list = []  # (backend name, probe scores) per prefill the hook saw


def _after_embed(prev, stage, _next):
    return (
        None
        if prev.kind == "embed"
        else f"toy_probe stage {stage.name!r} must directly follow the embed stage"
    )


def probe_prefill(backend, cache, input_ids, positions, key_valid, stats):
    plan = backend.plan
    probe = next(s for s in plan.stages if s.kind == "toy_probe")
    hidden = backend.run(plan.embed, input_ids, positions)[0]
    (scores,) = backend.run(probe, hidden)
    SEEN.append((backend.name, scores))
    return None  # an observer: the plan's plain prefill follows


PROBE = Technique(
    name="toy-probe",
    key="toy_probe",
    stage_kinds=(StageKind("toy_probe", ("hidden",), ("scores",), runs="prefill", check=_after_embed),),
    prefill=probe_prefill,
)


@dataclasses.dataclass(frozen=True)
class ToyProbe(Pass):
    name = "toy-probe"

    def apply(self, program):
        info = program.info
        hidden = torch.randn(2, 3, info.hidden_size)
        graph = export_function(lambda h: ((h.float() @ h.float().transpose(1, 2)).mean(-1),), (hidden,), ({0: "batch", 1: "seq"},))
        stages = list(program.stages)
        stages.insert(1, Stage("toy_probe", "toy_probe", graph))
        return PassResult(program.with_stages(stages), True, self.new_report())


@pytest.fixture
def registered():
    techniques.register(REPEAT)
    techniques.register(PROBE)
    SEEN.clear()
    yield
    techniques.unregister("toy-repeat")
    techniques.unregister("toy-probe")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=3, seed=2)


def _prompt():
    return torch.tensor([[5, 9, 5, 9, 5, 9, 7, 5], [3, 3, 3, 3, 8, 2, 3, 3]])


def test_the_builtin_techniques_declare_the_stage_kinds_and_policies_the_plan_knows():
    names = [t.name for t in techniques.techniques()]
    assert names[:3] == ["prompt-lookup", "draft-branch", "early-exit"]  # the order draft sources are tried in
    kinds = {"exit", "full_head", "token_score", "token_drop", "branch", "branch_head"}
    assert kinds <= set(techniques.stage_kinds())
    policies = {"early_exit", "token_drop", "neuron_mask", "prompt_lookup", "draft_branch"}
    assert set(techniques.policy_types()) == policies
    assert effx.plan.stage_signature("exit", {"vocab": "pruned"})[0][-1] == "vocab_ids"
    with pytest.raises(PlanError, match="unknown stage kind 'nope'"):
        techniques.stage_kind("nope")


def test_a_technique_is_registered_once():
    with pytest.raises(ValueError, match="name 'prompt-lookup'.*key 'prompt_lookup'"):
        techniques.register(Technique(name="prompt-lookup", key="prompt_lookup"))
    with pytest.raises(ValueError, match="stage kind 'exit' already registered"):
        techniques.register(Technique(name="other", key="other", stage_kinds=(StageKind("exit", (), ()),)))
    with pytest.raises(ValueError, match="names tensors"):
        StageKind("bad", ("hidden", "what"), ())
    assert "other" not in [t.name for t in techniques.techniques()]  # a refused one leaves nothing behind


def test_a_draft_source_declared_outside_effx_is_verified_losslessly(registered, model):
    dense = effx.transform(model)
    prog = effx.transform(model, passes=[ToyRepeat(draft=3)])
    assert prog.plan.speculative and prog.plan.policy.toy_repeat == RepeatPolicy(3)
    again = effx.Plan.from_json(prog.plan.to_json())  # the policy serializes under its key
    assert again.policy.get("toy_repeat") == RepeatPolicy(3)
    ids = _prompt()
    stats: dict = {}
    out = prog.generate(ids, max_new_tokens=12, eos_token_id=[], stats=stats)
    assert torch.equal(out, dense.generate(ids, max_new_tokens=12, eos_token_id=[]))
    assert stats["sources"]["repeat"]["drafted"] > 0  # it drafted, and the verifier kept only greedy tokens


def test_a_policy_of_an_unregistered_technique_is_refused(model):
    with pytest.raises(PlanError, match="belong to no registered technique"):
        effx.plan.Policy(toy_repeat=RepeatPolicy(2))
    plan = json.loads(effx.transform(model).plan.to_json())
    plan["policy"] = {"toy_repeat": {"draft": 2}}
    with pytest.raises(PlanError, match="does not know"):
        effx.Plan.from_dict(plan)


def test_a_stage_kind_declared_outside_effx_validates_counts_and_runs(registered, model):
    dense = effx.transform(model)
    prog = effx.transform(model, passes=[ToyProbe()])
    assert [s.kind for s in prog][:3] == ["embed", "toy_probe", "layer"]
    assert effx.Plan.from_json(prog.plan.to_json()) == prog.plan
    flops = prog.flops()  # a prefill-only stage costs nothing per decode step, something per prompt
    assert flops["toy_probe"] == 0
    assert prog.flops(prompt=8)["toy_probe"] > 0
    ids = _prompt()
    out = prog.generate(ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out, dense.generate(ids, max_new_tokens=6, eos_token_id=[]))
    ((backend, scores),) = SEEN
    assert backend == "torch" and tuple(scores.shape) == (2, 8)
    stages = prog.plan.stages
    misplaced = dataclasses.replace(prog.plan, stages=(stages[0], stages[2], stages[1], *stages[3:]))
    with pytest.raises(PlanError, match="must directly follow the embed stage"):
        misplaced.validate()


def test_a_stage_kind_declared_outside_effx_exports_and_runs_on_onnx_runtime(registered, model, tmp_path):
    from effx.exporters import onnx as exporter
    from effx.runtime import onnx as onnx_runtime

    prog = effx.transform(model, passes=[ToyProbe()])
    exporter.export(prog, tmp_path / "art")
    gen = onnx_runtime.load(tmp_path / "art")
    ids = _prompt()
    out = gen.generate(ids.numpy(), max_new_tokens=6, eos_token_id=[])
    want = prog.generate(ids, max_new_tokens=6, eos_token_id=[])
    assert (out == want.numpy()).all()
    onnx_scores = next(s for name, s in SEEN if name != "torch")
    torch_scores = next(s for name, s in SEEN if name == "torch")
    assert abs(onnx_scores - torch_scores.numpy()).max() < 1e-4
