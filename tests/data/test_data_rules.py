"""Reading rules a user relies on: a JSON key given twice, a boolean weight, the label rule's wording."""

from __future__ import annotations

import json

from sftlab.data.doctor import run_doctor
from sftlab.data.masking import PrepareReport


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


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
