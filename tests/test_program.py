import dataclasses
import json

import pytest

from effx import Plan, PlanError


def test_plan_json_round_trip(llama_program):
    plan = llama_program.plan
    again = Plan.from_json(plan.to_json())
    assert again == plan
    data = json.loads(plan.to_json())
    assert data["schema_version"] == 1
    assert [s["name"] for s in data["stages"]] == ["embed", "layer.0", "layer.1", "head"]
    assert data["model"]["num_layers"] == 2 and data["eos_token_ids"] == [2]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(schema_version=99), "schema version 99 is not supported"),
        (lambda d: d.pop("model"), "malformed plan"),
        (lambda d: d["stages"].pop(1), "plan layers"),
        (lambda d: d["stages"].pop(0), "starts with an embed stage"),
        (lambda d: d["stages"][1].update(inputs=["hidden"]), "signature"),
        (lambda d: d["stages"][1].update(kind="mystery"), "unknown kind|plan layers"),
    ],
)
def test_malformed_plans_raise_plan_error(llama_program, mutate, match):
    data = json.loads(llama_program.plan.to_json())
    mutate(data)
    with pytest.raises(PlanError, match=match):
        Plan.from_dict(data)


def test_not_json_is_a_plan_error():
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{nope")
    with pytest.raises(PlanError, match="JSON object"):
        Plan.from_json("[1, 2]")


def test_program_rejects_a_plan_that_does_not_match(llama_program):
    from effx import Program

    bad = dataclasses.replace(llama_program.plan, stages=llama_program.plan.stages[:-1])
    with pytest.raises(PlanError):
        Program(list(llama_program.stages), bad)


def test_report_lists_stages_and_flops(llama_program):
    text = llama_program.report(file=None)
    assert "layer.0" in text and "head" in text and "passes: none (dense)" in text
    assert "decode FLOPs/token at context 512" in text


def test_a_plan_without_family_loads_as_a_decoder(llama_program):
    data = json.loads(llama_program.plan.to_json())
    assert data["model"]["family"] == "decoder"
    del data["model"]["family"]  # a plan written before the field
    plan = Plan.from_dict(data)
    assert plan.model.family == "decoder" and plan == llama_program.plan


def test_a_plan_of_another_family_is_refused(llama_program):
    data = json.loads(llama_program.plan.to_json())
    data["model"]["family"] = "encoder"
    with pytest.raises(PlanError, match="model.family is 'encoder'"):
        Plan.from_dict(data)
