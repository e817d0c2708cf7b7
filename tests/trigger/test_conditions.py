"""Trigger conditions on event fields, table-driven (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.program import Condition, Program, Trigger, parse_program
from services.trigger.rules import holds, sampled_in

EVENT: dict[str, Any] = {
    "type": "ticket.solved",
    "source": "zendesk://acme",
    "time": "2026-11-20T14:03:00Z",
    "data": {
        "team": "billing",
        "channel": "email",
        "case_id": "98213",
        "customer": {"id": "c-1", "locale": "fi"},
        "attributes": {"priority": "high", "reopens": 2, "vip": True, "tags": ["a", "b"]},
    },
}


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"field": "data.team", "eq": "billing"}, True),
        ({"field": "data.team", "eq": "sales"}, False),
        ({"field": "data.team", "ne": "sales"}, True),
        ({"field": "data.missing", "ne": "x"}, True),
        ({"field": "data.attributes.priority", "in": ["high", "urgent"]}, True),
        ({"field": "data.attributes.priority", "not_in": ["high"]}, False),
        ({"field": "data.missing", "not_in": ["x"]}, True),
        ({"field": "data.agent", "exists": False}, True),
        ({"field": "data.team", "exists": True}, True),
        ({"field": "data.attributes.reopens", "gt": 1}, True),
        ({"field": "data.attributes.reopens", "gte": 2}, True),
        ({"field": "data.attributes.reopens", "lt": 2}, False),
        ({"field": "data.attributes.reopens", "lte": 2}, True),
        ({"field": "data.attributes.priority", "gt": 1}, False),  # text is not a number
        ({"field": "time", "gte": "2026-11-20T00:00:00Z"}, True),  # ISO times order as text
        ({"field": "data.attributes.vip", "eq": True}, True),
        ({"field": "data.attributes.vip", "eq": "true"}, False),
        ({"field": "data.case_id", "eq": 98213}, True),  # YAML users need not quote ids
        ({"field": "data.case_id", "eq": "98213"}, True),
        ({"field": "source", "matches": "^zendesk://"}, True),
        ({"field": "data.attributes.tags.1", "eq": "b"}, True),
        ({"field": "data.missing", "matches": "."}, False),
    ],
)
def test_operators(condition: dict[str, Any], expected: bool) -> None:
    assert holds(Condition.model_validate(condition), EVENT) is expected


def test_all_any_and_lists() -> None:
    when = Trigger.model_validate(
        {
            "id": "t",
            "event": "ticket.solved",
            "survey": "s",
            "when": {
                "all": [
                    {"field": "data.team", "eq": "billing"},
                    {
                        "any": [
                            {"field": "data.channel", "eq": "chat"},
                            {"field": "data.attributes.reopens", "gte": 2},
                        ]
                    },
                ]
            },
        }
    ).when
    assert when is not None and holds(when, EVENT)
    as_list = [
        Condition.model_validate({"field": "data.team", "eq": "billing"}),
        Condition.model_validate({"field": "data.channel", "eq": "chat"}),
    ]
    assert not holds(as_list, EVENT)


def test_sampling_is_stable_and_proportional() -> None:
    trigger = Trigger(id="t", event="e", survey="s", sample=0.3)
    picks = [sampled_in(trigger, f"cust-{i}") for i in range(10_000)]
    assert picks == [sampled_in(trigger, f"cust-{i}") for i in range(10_000)]
    assert 0.28 < sum(picks) / 10_000 < 0.32
    other = Trigger(id="other", event="e", survey="s", sample=0.3)
    assert picks != [sampled_in(other, f"cust-{i}") for i in range(10_000)]  # per trigger


def test_invalid_conditions_are_refused_with_their_line(program: Program) -> None:
    from services.common.program import ProgramError

    text = """version: 1
surveys:
  - {id: s, metric: csat, question: {en: "Q?"}}
triggers:
  - id: t
    event: ticket.solved
    survey: s
    when:
      - {field: data.team, eq: a, ne: b}
      - {field: data.team, matches: "("}
"""
    with pytest.raises(ProgramError) as info:
        parse_program(text, "p.yaml")
    joined = "\n".join(info.value.errors)
    assert "exactly one operator" in joined
    assert "p.yaml:9:" in joined
    assert "not a regular expression" in joined
