"""Pass infrastructure, exercised with small real passes defined here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import effx
from effx.errors import PassConfigError, PassError
from effx.passes import (
    PHASES,
    Lower,
    Pass,
    PassManager,
    PassResult,
    Quantize,
    get_pass,
    parse_pipeline,
    register_pass,
    registered_passes,
)


@register_pass
@dataclasses.dataclass(frozen=True)
class ScaleLogits(Pass):
    """Multiply the head's logits by a constant: logits -> logits * factor (factor=1 changes nothing)."""

    name = "test-scale-logits"
    factor: float = 1.0

    def __post_init__(self):
        if not self.factor > 0:
            raise PassConfigError(f"factor must be > 0, got {self.factor}")

    def apply(self, program):
        report = self.new_report()
        if self.factor == 1.0:
            report.skip("head", "factor is 1: nothing to do")
            return PassResult(program, False, report)
        gm = program.head.copy_graph()
        out = next(n for n in gm.graph.nodes if n.op == "output")
        logits = out.args[0][0]
        with gm.graph.inserting_after(logits):
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (logits, self.factor))
        scaled.meta.update(effx_role="lm_head", effx_layer=None, effx_pass=self.name)
        out.args = ((scaled,),)
        gm.recompile()
        report.change("head", f"logits scaled by {self.factor}")
        return PassResult(program.replace({"head": program.head.with_graph(gm)}), True, report)

    def ensures(self, program):
        tagged = [n for n in program.head.graph.graph.nodes if n.meta.get("effx_pass") == self.name]
        if self.factor != 1.0 and not tagged:
            raise PassError("no scaled logits in the head")


@register_pass
@dataclasses.dataclass(frozen=True)
class NeedsScale(Pass):
    """Does nothing, but must run after test-scale-logits (to exercise ordering checks)."""

    name = "test-needs-scale"
    after = ("test-scale-logits",)
    layers: tuple[int, ...] = ()
    flag: bool = False
    label: str = ""

    def apply(self, program):
        report = self.new_report()
        report.skip("all", "this pass never changes anything")
        return PassResult(program, False, report)


@register_pass
@dataclasses.dataclass(frozen=True)
class Cycle(Pass):
    """Must run before test-scale-logits and after test-needs-scale: impossible together."""

    name = "test-cycle"
    after = ("test-needs-scale",)
    before = ("test-scale-logits",)

    def apply(self, program):
        return PassResult(program, False, self.new_report())


@register_pass
@dataclasses.dataclass(frozen=True)
class Broken(Pass):
    """Raises inside apply()."""

    name = "test-broken"

    def apply(self, program):
        raise RuntimeError("boom")


@register_pass
@dataclasses.dataclass(frozen=True)
class Liar(Pass):
    """Claims a change but breaks its own postcondition."""

    name = "test-liar"

    def apply(self, program):
        return PassResult(program, True, self.new_report())

    def ensures(self, program):
        raise PassError("the promised node is missing")


@register_pass
@dataclasses.dataclass(frozen=True)
class ToyRewrite(Pass):
    """A new rewrite pass that names no other pass, and that no other pass names: changes nothing."""

    name = "test-toy-rewrite"

    def apply(self, program):
        return PassResult(program, False, self.new_report())


@register_pass
@dataclasses.dataclass(frozen=True)
class AfterQuantize(Pass):
    """A rewrite pass that asks to run after quantize: against the phases, so never placeable."""

    name = "test-after-quantize"
    after = ("quantize",)

    def apply(self, program):
        return PassResult(program, False, self.new_report())


def test_pass_rewrites_graph_tags_provenance_and_reports(llama, llama_program):
    prog = effx.transform(llama, passes=[ScaleLogits(factor=2.0)])
    head = prog.head.graph
    assert sum(1 for n in head.graph.nodes if n.meta.get("effx_pass") == "test-scale-logits") == 1
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(prog(ids), llama_program(ids) * 2.0)
    # the input program is untouched (functional passes)
    assert not any(n.meta.get("effx_pass") for n in llama_program.head.graph.graph.nodes)
    assert prog.plan.passes == (
        {"name": "test-scale-logits", "config": {"factor": 2.0}},
        {"name": "lower", "config": {"kernels": "fast"}},  # transform's last step
    )
    text = prog.report(file=None)
    assert "changed head: logits scaled by 2.0" in text and "FLOPs/token" in text


def test_identity_setting_reports_unmodified(llama):
    result = ScaleLogits(factor=1.0).apply(effx.capture(llama))
    assert result.modified is False
    assert result.report.skipped == [("head", "factor is 1: nothing to do")]


def test_pipeline_string_parses_values():
    p1, p2 = parse_pipeline(
        " test-scale-logits{factor=0.5} , test-needs-scale{layers=8,16,24 flag=true; label=x}"
    )
    assert p1 == ScaleLogits(factor=0.5)
    assert p2 == NeedsScale(layers=(8, 16, 24), flag=True, label="x")
    assert parse_pipeline("test-needs-scale{layers=3}")[0].layers == (3,)
    assert parse_pipeline("") == []


@pytest.mark.parametrize(
    "text, match",
    [
        ("test-scale-logits{factor=2", "never closed"),
        ("test-scale-logits{factor=2},", "trailing ','"),
        ("test-scale-logits{factor}", "key=value"),
        ("test-scale-logits{factor=}", "empty value"),
        ("test-scale-logits{factor=1 factor=2}", "given twice"),
        ("test-scale-logits test-needs-scale", "expected ','"),
        ("{factor=2}", "expected a pass name"),
        ("no-such-pass", "unknown pass 'no-such-pass'; known passes: .*test-scale-logits"),
        ("test-scale-logits{speed=2}", r"has no argument\(s\) \['speed'\]; its arguments are \['factor'\]"),
        ("test-scale-logits{factor=-1}", "factor must be > 0"),
    ],
)
def test_malformed_pipelines(text, match):
    with pytest.raises(PassConfigError, match=match):
        parse_pipeline(text)


def test_invalid_argument_is_a_value_error():
    with pytest.raises(ValueError, match="factor must be > 0"):
        ScaleLogits(factor=0)


def test_json_round_trip():
    p = NeedsScale(layers=(1, 2), flag=True, label="a")
    data = p.to_json()
    assert data == {"name": "test-needs-scale", "config": {"layers": [1, 2], "flag": True, "label": "a"}}
    assert Pass.from_json(data) == p
    assert get_pass("test-needs-scale") is NeedsScale
    with pytest.raises(PassConfigError):
        Pass.from_json({"config": {}})


def test_pipeline_out_of_order_is_reordered_and_the_move_is_explained(llama):
    manager = PassManager("test-needs-scale, test-scale-logits{factor=2}")
    assert [p.name for p in manager.passes] == ["test-scale-logits", "test-needs-scale"]
    program = manager.run(effx.transform(llama))
    notes = program.reports[-1].notes
    assert any("listed before 'test-scale-logits' but run after it" in n for n in notes), notes
    right = PassManager("test-scale-logits{factor=2}, test-needs-scale")  # the right order stays as it is
    assert [p.name for p in right.passes] == ["test-scale-logits", "test-needs-scale"] and not right.moves


def test_contradicting_order_constraints_are_an_error():
    with pytest.raises(PassError, match="ordering constraints that contradict each other"):
        PassManager("test-cycle, test-scale-logits{factor=2}, test-needs-scale")


def test_a_new_rewrite_pass_runs_before_quantize_and_lower_without_naming_them(llama):
    assert ToyRewrite.phase == "rewrite" and not ToyRewrite.after and not ToyRewrite.before
    assert "test-toy-rewrite" not in Quantize.after + Quantize.before + Lower.after + Lower.before
    manager = PassManager("lower{kernels=reference}, quantize{bits=8}, test-toy-rewrite")
    assert [p.name for p in manager.passes] == ["test-toy-rewrite", "quantize", "lower"]
    assert manager.moves[1].startswith(
        "listed before 'test-toy-rewrite' but run after it: quantize runs in the weights phase, after every rewrite"
    )
    assert manager.moves[2].startswith(
        "listed before 'test-toy-rewrite', 'quantize' but run after them: lower runs in the lower phase, "
        "after every rewrite and weights pass"
    )
    program = effx.transform(llama, "quantize{bits=8}, test-toy-rewrite", kernels="reference")
    assert [p["name"] for p in program.plan.passes] == ["test-toy-rewrite", "quantize", "lower"]
    notes = next(r for r in program.reports if r.name == "quantize").notes
    assert any("quantize runs in the weights phase, after every rewrite" in n for n in notes), notes
    # in phase order nothing moves
    right = PassManager("test-toy-rewrite, quantize{bits=8}, lower")
    assert [p.name for p in right.passes] == ["test-toy-rewrite", "quantize", "lower"] and not right.moves


def test_a_pass_of_an_unknown_phase_is_an_error(monkeypatch):
    with pytest.raises(
        TypeError, match=r"declares phase 'optimize'; the phases are, in order: rewrite, weights, lower"
    ):

        @dataclasses.dataclass(frozen=True)
        class Odd(Pass):
            name = "test-odd-phase"
            phase = "optimize"

    # a phase changed after the class was defined is refused when a manager orders the pass
    monkeypatch.setattr(ToyRewrite, "phase", "optimize")
    with pytest.raises(PassError, match=r"pass 'test-toy-rewrite' declares phase 'optimize'; the phases are"):
        PassManager("test-toy-rewrite")


def test_an_after_against_the_phases_is_a_contradiction():
    with pytest.raises(PassError, match="ordering constraints that contradict each other"):
        PassManager("quantize{bits=8}, test-after-quantize")


def test_the_phase_order_is_documented():
    assert PHASES == ("rewrite", "weights", "lower")
    assert Quantize.phase == "weights" and Lower.phase == "lower"
    assert all(k.phase in PHASES for k in registered_passes().values())
    assert "rewrite, then the weights, then lowering" in (PassManager.__doc__ or "")
    assert "``phase`` (one of :data:`PHASES`" in (Pass.__doc__ or "")
    architecture = " ".join((Path(__file__).parents[1] / "docs" / "architecture.md").read_text().split())
    assert "`rewrite` -> `weights` -> `lower`" in architecture


def test_failing_pass_error_names_it_and_those_before(llama):
    with pytest.raises(
        PassError,
        match=r"'test-broken' \(#3; after: test-scale-logits, test-needs-scale\) failed: RuntimeError: boom",
    ):
        effx.transform(llama, passes="test-scale-logits{factor=2}, test-needs-scale, test-broken")


def test_broken_promise_is_caught(llama):
    with pytest.raises(PassError, match="'test-liar'.*broke its promise: the promised node is missing"):
        effx.transform(llama, passes=[Liar()])


def test_transform_rejects_non_passes(llama):
    with pytest.raises(PassConfigError, match="expected a Pass or a pipeline string"):
        effx.transform(llama, passes=[42])


@register_pass
@dataclasses.dataclass(frozen=True)
class Dishonest(Pass):
    """Rewrites nothing but says it did."""

    name = "test-dishonest"

    def apply(self, program):
        return PassResult(program, True, self.new_report())


def test_modified_must_match_what_the_pass_returned(llama):
    with pytest.raises(PassError, match="'test-dishonest'.*reported modified=True but returned its input"):
        effx.transform(llama, passes="test-dishonest")


def test_the_manager_records_modified(llama):
    prog = effx.transform(llama, passes="test-scale-logits{factor=1}, test-scale-logits{factor=2}")
    assert [r.modified for r in prog.reports] == [False, True, True]  # lower: reference -> fast kernels


def test_preconditions_are_checked_before_apply(llama):
    from effx.errors import PassPreconditionError

    with pytest.raises(
        PassPreconditionError, match=r"'vocab-reduce' \(#1; after: none\) cannot apply: .*where='draft'"
    ):
        effx.transform(llama, passes="vocab-reduce{k=8 where=draft vocab=none.json}")


def test_parentheses_are_braces_in_a_pipeline():
    """``name(k=v ...)`` parses as ``name{k=v ...}`` (lm-eval's --model_args takes no braces); mismatched
    or nested delimiters are refused."""
    from effx.passes import parse_pipeline

    assert parse_pipeline(
        "early-exit(layers=1,2 thresholds=0.5), token-drop{at_layers=1 keep=0.5}"
    ) == parse_pipeline("early-exit{layers=1,2 thresholds=0.5}, token-drop(at_layers=1 keep=0.5)")
    for bad, message in (
        ("early-exit(layers=1", "never closed"),
        ("early-exit{layers=1)", "never closed"),
        ("early-exit(layers=(1))", "nested"),
    ):
        with pytest.raises(PassConfigError, match=message):
            parse_pipeline(bad)


def test_passes_declare_their_families():
    from effx.passes import EarlyExit, PassManager, TokenDrop, VocabReduce

    assert VocabReduce.families == ("decoder",)
    assert "encoder" in TokenDrop.families and "recurrent" in EarlyExit.families
    manager = PassManager([VocabReduce(k=16)])
    manager.check_family("decoder", "LlamaForCausalLM")
    with pytest.raises(
        PassError, match=r"pass 'vocab-reduce' does not apply to MambaForCausalLM \(a recurrent"
    ):
        manager.check_family("recurrent", "MambaForCausalLM")
    with pytest.raises(PassError, match="unknown model family 'rnn'"):
        manager.check_family("rnn", "X")
