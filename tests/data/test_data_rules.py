"""Reading rules a user relies on: a JSON key given twice, a boolean weight, the label rule's wording."""

from __future__ import annotations

import json

import pytest

from sftlab.core.errors import SftlabError
from sftlab.data.doctor import run_doctor
from sftlab.data.load import read_records
from sftlab.data.masking import PrepareReport


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_key_given_twice_is_an_error_naming_line_and_key(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                     '{"messages": [{"role": "user", "content": "lost", "content": "kept"}, '
                     '{"role": "assistant", "content": "yo"}]}\n')
    with pytest.raises(SftlabError, match=r"d\.jsonl:2: key 'content' is given twice in messages\[0\]"):
        read_records(jsonl)
    assert [r.line for r in read_records(jsonl, strict=False) if r.data is None] == [2]
    arr = tmp_path / "d.json"
    arr.write_text('[\n{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},\n'
                   '{"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],\n'
                   ' "weight": 1, "weight": 2}\n]\n')
    bad = [r for r in read_records(arr, strict=False) if r.data is None]
    assert [(r.line, "key 'weight'" in r.error) for r in bad] == [(3, True)]
    res = run_doctor(str(arr))
    assert [(f.rule, f.severity, f.data["line"]) for f in res.findings] == [("parse", "error", 3)]


def test_a_boolean_weight_is_refused(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "yo"}], "weight": True}])
    res = run_doctor(path)
    assert [(f.rule, f.severity) for f in res.findings] == [("fields", "error")]
    assert "'weight' must be a number, got True" in res.findings[0].message


def test_the_label_rule_line_says_chat_and_chats():
    assert "1 chat as one example (" in PrepareReport(n_single=1).rule()
    assert "2 chats as one example each" in PrepareReport(n_single=2).rule()
    assert "1 chat split into one example per assistant turn" in PrepareReport(n_split=1).rule()


def test_every_example_at_weight_zero_is_refused_by_prepare_and_the_doctor(tmp_path, tiny_model_dir):
    """Each example's loss is multiplied by its weight: all at 0, every step would learn nothing."""
    from sftlab.config import load_config
    from sftlab.data.prepare import prepare

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], "weight": 0}
            for i in range(2)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    cfg = load_config(None, {"model": str(tiny_model_dir), "data": path})
    with pytest.raises(SftlabError, match="every example has weight 0: training would learn nothing"):
        prepare(cfg)
    found = [(f.rule, f.severity) for f in run_doctor(path).findings]
    assert found == [("nothing_left", "error")]
    # one example with a weight is enough: a weight of 0 may be a choice
    path = _jsonl(tmp_path / "d.jsonl", rows + [{**rows[0], "weight": 0.5}])
    assert prepare(load_config(None, {"model": str(tiny_model_dir), "data": path})).report.n_kept == 3
    assert not [f for f in run_doctor(path).findings if f.rule == "nothing_left"]
