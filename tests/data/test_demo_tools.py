"""The tool-calling demo data: reproducible, clean by the doctor's tool checks, held-out split disjoint."""

from __future__ import annotations

import json

from sftlab.data.doctor_tools import argument_problems, function_schemas, tool_checks
from sftlab.data.types import Conversation, Message
from sftlab.demo_data import demo_path
from sftlab.demo_data.tools import N_EVAL, N_TRAIN, build


def _conv(rec: dict, line: int) -> Conversation:
    msgs = [Message(m["role"], m["content"], tool_calls=tuple(m["tool_calls"]) if m.get("tool_calls") else None,
                    tool_call_id=m.get("tool_call_id"), name=m.get("name")) for m in rec["messages"]]
    return Conversation(msgs, tools=rec["tools"], source="tools.jsonl", line=line)


def test_files_are_what_the_generator_writes():
    train, evl = build()
    for split, rows in (("tools_train", train), ("tools_eval", evl)):
        assert demo_path(split).read_text(encoding="utf-8") == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    assert (len(train), len(evl)) == (N_TRAIN, N_EVAL)


def test_every_call_fits_its_schema_and_the_splits_are_disjoint():
    train, evl = build()
    findings = []
    for i, rec in enumerate(train + evl, start=1):
        tool_checks(_conv(rec, i), findings)
    assert findings == []
    schemas = function_schemas(train[0]["tools"])
    calls = [m["tool_calls"][0]["function"] for r in train + evl for m in r["messages"] if m.get("tool_calls")]
    assert {c["name"] for c in calls} == set(schemas) == {"get_weather", "convert_currency", "set_timer"}
    assert all(argument_problems(c["arguments"], schemas[c["name"]]) == [] for c in calls)
    asks = lambda rows: {r["messages"][1]["content"] for r in rows}  # noqa: E731
    assert not asks(train) & asks(evl)
    assert all(r["messages"][-1]["tool_calls"] for r in evl)  # held out: each ends at the call to make
    plain = [r for r in train if not any(m.get("tool_calls") for m in r["messages"])]
    assert 0 < len(plain) < len(train) // 4  # some requests need no tool
