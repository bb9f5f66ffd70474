"""The shipped demo data: regenerated identically, parseable, and no train/eval overlap."""

import json

from sftlab.data.formats import load_conversations
from sftlab.demo_data import demo_path


def test_every_split_loads_and_train_eval_do_not_overlap():
    splits = {s: load_conversations(str(demo_path(s))) for s in ("train", "eval", "general")}
    assert len(splits["train"]) == 300 and len(splits["eval"]) == 60 and len(splits["general"]) == 60
    prompts = {s: {c.messages[-2].content for c in convs} for s, convs in splits.items()}
    assert not prompts["train"] & prompts["eval"]
    for c in splits["train"] + splits["eval"]:
        json.loads(c.replies()[-1])  # every demo reply is the JSON answer
