"""`sftlab prepare`: --dump contract, --show, --out, and bad input as one clear line."""

import json

import pytest

from sftlab.cli import main


def _data(tmp_path, n=5):
    p = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(n)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_dump_writes_one_object_per_example_in_order(tmp_path, tiny_model_dir, capsys):
    data = _data(tmp_path)
    dump = tmp_path / "out.jsonl"
    assert main(["prepare", "--model", str(tiny_model_dir), "--data", str(data), "--dump", str(dump)]) == 0
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for i, r in enumerate(rows):
        assert len(r["input_ids"]) == len(r["labels"])
        trained = [t for t, lab in zip(r["input_ids"], r["labels"]) if lab != -100]
        assert tok.decode(trained) == f"answer {i}<|im_end|>"
    assert "5/5 examples kept" in capsys.readouterr().out


def test_show_highlights_trained_tokens(tmp_path, tiny_model_dir, capsys):
    data = _data(tmp_path, 2)
    assert main(["prepare", "--model", str(tiny_model_dir), "--data", str(data), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "«answer 0<|im_end|>»" in out
    assert "«question" not in out


def test_out_writes_arrow_dataset_and_report(tmp_path, tiny_model_dir):
    import datasets

    data = _data(tmp_path, 3)
    out = tmp_path / "prepared"
    assert main(["prepare", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)]) == 0
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert len(ds) == 3 and set(ds.column_names) >= {"input_ids", "labels"}
    assert json.loads((out / "report.json").read_text())["n_kept"] == 3


@pytest.mark.parametrize("content,args,message", [
    (None, [], "data file '{d}' not found"),
    ('{"messages": [}\n', [], "{d}:1: line is not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n', ["--format", "xml"], "unknown format 'xml'"),
    ('{"prompt": "a", "completion": "b"}\n', ["--template", "nope"], "unknown template 'nope'"),
    ('{"prompt": "a", "completion": "b"}\n', ["--set", "lerning_rate=1"], "unknown config key 'lerning_rate'"),
    ('{"prompt": "a", "completion": "b"}\n', ["--max-seq-length", "2"], "max_seq_length"),
    # a template that refuses a record names it and the fix
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"messages": [{"role": "system", "content": "S"}, {"role": "user", '
     '"content": "a"}, {"role": "assistant", "content": "b"}]}\n', ["--template", "NOSYS"],
     "{d}:2: chat template 'nosys.jinja' failed to render: System role not supported (the template refuses system "
     "messages: drop them"),
])
def test_bad_input_is_one_line_and_nothing_written(tmp_path, tiny_model_dir, capsys, content, args, message):
    d = tmp_path / "d.jsonl"
    if content is not None:
        d.write_text(content)
    if "NOSYS" in args:
        from test_doctor import NO_SYSTEM

        (tmp_path / "nosys.jinja").write_text(NO_SYSTEM)
        args = [str(tmp_path / "nosys.jinja") if a == "NOSYS" else a for a in args]
    dump = tmp_path / "dump.jsonl"
    code = main(["prepare", "--model", str(tiny_model_dir), "--data", str(d), "--dump", str(dump)] + args)
    err = capsys.readouterr().err
    assert code == 2
    assert message.format(d=d) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not dump.exists()
    assert not list(tmp_path.glob(".dump.jsonl.*"))


def test_unknown_model_path(tmp_path, capsys):
    d = _data(tmp_path, 1)
    code = main(["prepare", "--model", str(tmp_path / "missing-model"), "--data", str(d)])
    assert code == 2 and "not found" in capsys.readouterr().err


@pytest.mark.parametrize("case, dump, extra, message", [
    ("data", "train.jsonl", [], "--dump train.jsonl is the training data (config key 'data')"),
    ("data-spelled-otherwise", "sub/../train.jsonl", [], "is the training data (config key 'data')"),
    ("data-through-a-link", "link.jsonl", [], "is the training data (config key 'data')"),
    ("data-through-a-hard-link", "hard.jsonl", [], "is the training data (config key 'data')"),
    ("eval-data", "eval.jsonl", ["--set", "eval_data=eval.jsonl"], "is the eval data (config key 'eval_data')"),
    ("replay-data", "general.jsonl", ["--set", "replay_data=general.jsonl"],
     "is the replay data (config key 'replay_data')"),
    ("mixture-source", "general.jsonl", ["--set", "data=[train.jsonl, {path: general.jsonl, weight: 1}]"],
     "is the training data (config key 'data')"),
    ("inside-a-data-folder", "folder/rows.jsonl", ["--data", "folder"], "is inside folder, the training data"),
    ("config-file", "cfg.yaml", ["cfg.yaml"], "--dump cfg.yaml is the config file"),
])
def test_dump_refuses_to_overwrite_an_input(tmp_path, tiny_model_dir, capsys, monkeypatch, case, dump, extra, message):
    """`--dump` naming an input (data, eval, replay, a mixture's source, the config) is one line; nothing is
    written or changed."""
    monkeypatch.chdir(tmp_path)
    _data(tmp_path, 3)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "train.jsonl")
    (tmp_path / "hard.jsonl").hardlink_to(tmp_path / "train.jsonl")
    for name in ("eval.jsonl", "general.jsonl"):
        (tmp_path / name).write_text((tmp_path / "train.jsonl").read_text())
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.jsonl").write_text((tmp_path / "train.jsonl").read_text())
    (tmp_path / "cfg.yaml").write_text("data: train.jsonl\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code = main(["prepare", "--model", str(tiny_model_dir), "--data", "train.jsonl", *extra, "--dump", dump])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_dump_beside_the_data_is_written(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _data(tmp_path, 2)
    assert main(["prepare", "--model", str(tiny_model_dir), "--data", "train.jsonl", "--dump", "train.prepared.jsonl"]) == 0
    assert len((tmp_path / "train.prepared.jsonl").read_text().splitlines()) == 2


def test_out_prints_no_datasets_progress_bar_and_leaves_the_setting_alone(tmp_path, tiny_model_dir, capfd):
    import datasets

    data = _data(tmp_path, 3)
    assert not datasets.are_progress_bars_disabled()  # as a user's process has it
    assert main(["prepare", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "p")]) == 0
    out, err = capfd.readouterr()
    assert "Saving the dataset" not in out + err and "%|" not in err
    assert f"wrote {tmp_path / 'p'}" in out
    assert not datasets.are_progress_bars_disabled()  # the caller's own datasets calls keep their bars


@pytest.mark.parametrize("out", ["notes", "afile"])
def test_refused_out_leaves_no_dump_written(tmp_path, tiny_model_dir, capsys, out):
    # --out at a folder of the user's files (or at a file) is refused: "nothing was written" must hold for --dump too
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    (tmp_path / "afile").write_text("keep")
    dump = tmp_path / "rows.jsonl"
    code = main(["prepare", "--model", str(tiny_model_dir), "--data", str(_data(tmp_path)), "--dump", str(dump),
                 "--out", str(tmp_path / out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(tmp_path / out) in err
    assert not dump.exists()
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep" and (tmp_path / "afile").read_text() == "keep"


def test_nothing_left_error_blames_the_length_not_the_end_of_turn_token(tmp_path, tiny_model_dir, capsys):
    # every example too long: the error said "end-of-turn token untrained after 0 of 0 trained replies" too
    code = main(["prepare", "--model", str(tiny_model_dir), "--data", str(_data(tmp_path)), "--max-seq-length", "8",
                 "--truncation", "drop"])
    err = capsys.readouterr().err
    assert code == 2 and "no example is left to train on (0/5 examples kept" in err and "5 dropped as too long" in err
    assert "end-of-turn" not in err and "0 of 0" not in err


def test_negative_show_is_an_error_not_all_but_the_last(tmp_path, tiny_model_dir, capsys):
    code = main(["prepare", "--model", str(tiny_model_dir), "--data", str(_data(tmp_path)), "--show", "-2"])
    cap = capsys.readouterr()
    assert code == 2 and "--show -2: must be a count of examples, 0 or more" in cap.err and "--- example" not in cap.out


def test_plain_text_rule_line_says_the_first_token_is_not_trained(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    dump = tmp_path / "d.jsonl"
    assert main(["prepare", "--model", str(tiny_model_dir), "--data", str(data), "--dump", str(dump)]) == 0
    assert "labels: plain text, every token trained but the first (nothing predicts it)" in capsys.readouterr().out
    (row,) = [json.loads(line) for line in dump.read_text().splitlines()]
    assert row["labels"] == [-100] + row["input_ids"][1:]


def test_show_and_dump_name_the_turn_each_example_of_a_split_chat_trains(tmp_path, tiny_model_dir, capsys):
    """Qwen3 splits a chat into one example per assistant turn: --show printed "example 1" three times with
    nothing to tell them apart, and --dump rows had no way to say which turn each trains."""
    from test_official_templates import QWEN3

    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "two"},
                          {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": "three"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    data, q3, dump = _data(tmp_path), tmp_path / "qwen3.jinja", tmp_path / "dump.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    q3.write_text(QWEN3)
    assert main(["prepare", "--model", str(tiny_model_dir), "--data", str(data), "--template", str(q3), "--show", "3",
                 "--dump", str(dump)]) == 0
    heads = [line.rsplit(": ", 1)[0] for line in capsys.readouterr().out.splitlines() if line.startswith("--- example")]
    assert heads == [f"--- example 1 ({data}:1), assistant turn 1 (one example per turn)",
                     f"--- example 1 ({data}:1), assistant turn 2 (one example per turn)", f"--- example 2 ({data}:2)"]
    assert [(r["index"], r["turn"]) for r in map(json.loads, dump.read_text().splitlines())] == [(0, 1), (0, 2), (1, None)]
