"""Loading every file type and converting every format into one Conversation type."""

import csv
import json
from pathlib import Path

import pytest

from sftlab.core.errors import SftlabError
from sftlab.data.formats import load_conversations, resolve_format, to_conversations
from sftlab.data.load import read_records

ROW = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("row,expected", [
    (ROW, [("user", "Hi"), ("assistant", "Hello")]),
    ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
     [("system", "S"), ("user", "Hi"), ("assistant", "Yo")]),
    ({"instruction": "Add", "input": "1 2", "output": "3"}, [("user", "Add\n\n1 2"), ("assistant", "3")]),
    ({"instruction": "Add", "input": "", "output": "3", "system": "S"}, [("system", "S"), ("user", "Add"), ("assistant", "3")]),
    ({"prompt": "P", "completion": "C"}, [("user", "P"), ("assistant", "C")]),
    ({"prompt": [{"role": "user", "content": "P"}], "completion": [{"role": "assistant", "content": "C"}]},
     [("user", "P"), ("assistant", "C")]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                   {"role": "assistant", "content": "c"}]}, [("user", "ab"), ("assistant", "c")]),
])
def test_each_format_converts(tmp_path, row, expected):
    (conv,) = load_conversations(_jsonl(tmp_path / "d.jsonl", [row]))
    assert [(m.role, m.content) for m in conv.messages] == expected
    assert conv.line == 1


def test_text_format_and_weights(tmp_path):
    (c,) = load_conversations(_jsonl(tmp_path / "t.jsonl", [{"text": "raw", "weight": 2.5}]))
    assert c.is_text and c.text == "raw" and c.weight == 2.5


def test_system_prompt_option_adds_missing_system(tmp_path):
    (c,) = load_conversations(_jsonl(tmp_path / "d.jsonl", [ROW]), system_prompt="Be terse.")
    assert c.messages[0].role == "system" and c.messages[0].content == "Be terse."


def test_format_override_and_unknown_format(tmp_path):
    recs = read_records(_jsonl(tmp_path / "d.jsonl", [ROW]))
    assert resolve_format("openai", recs) == "messages"
    with pytest.raises(SftlabError, match="unknown format 'xml'"):
        resolve_format("xml", recs)


def test_undetectable_format_names_line_and_fields(tmp_path):
    with pytest.raises(SftlabError, match=r"d.jsonl:1: cannot tell the data format from fields \['foo'\]"):
        load_conversations(_jsonl(tmp_path / "d.jsonl", [{"foo": 1}]))


def test_a_file_mixing_formats_is_read_as_its_most_common_one_and_the_mix_is_named(tmp_path):
    """prepare and the doctor read the file by one rule and blame the same line, naming the mix."""
    from sftlab.data.doctor import run_doctor

    alpaca = {"instruction": "Q0", "output": "A0"}
    msgs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(3)]
    path = _jsonl(tmp_path / "mixed.jsonl", [msgs[0], alpaca] + msgs[1:])
    mix = ("line 2: this record looks like 'alpaca' format, but the file is read as 'messages', its most common "
           "format; the file mixes formats: 3 records look like messages, 1 like alpaca; first other at line 2")
    with pytest.raises(SftlabError) as err:
        load_conversations(path)
    assert str(err.value).startswith(f"{path}:2: " + mix.removeprefix("line 2: "))
    assert "convert such records to 'messages' format" in str(err.value)
    (f,) = run_doctor(path).findings
    assert (f.rule, f.severity, f.where) == ("mixed_formats", "error", f"{path}:2") and f.message in str(err.value)
    with pytest.raises(SftlabError) as err:  # --format given: the user's choice, no mix note
        load_conversations(path, "messages")
    assert "mixes formats" not in str(err.value) and f"{path}:2: 'messages' must be a list" in str(err.value)


def test_a_json_file_holding_one_conversation_is_one_example(tmp_path):
    p = tmp_path / "single.json"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                             "tools": [{"name": "f"}]}))
    (conv,) = load_conversations(str(p))
    assert [m.content for m in conv.messages] == ["hi", "hello"] and conv.where() == f"{p}:1"
    assert conv.tools == [{"type": "function", "function": {"name": "f"}}]
    p.write_text(json.dumps({"data": [ROW, ROW]}))  # an object holding one list of examples: still a list
    assert len(load_conversations(str(p))) == 2


def test_csv_messages_column_holding_json_text_is_parsed_like_tools(tmp_path):
    p = tmp_path / "msgs.csv"
    msgs = [{"role": "user", "content": "hi, there"}, {"role": "assistant", "content": "yo"}]
    with p.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["messages", "tools"])
        w.writerow([json.dumps(msgs), json.dumps([{"name": "f"}])])
        w.writerow(["[{not json", ""])
    with pytest.raises(SftlabError, match=r"msgs.csv:3: 'messages' \(a string\) is not valid JSON"):
        load_conversations(str(p))
    (conv,) = to_conversations(read_records(p), strict=False)[0]
    assert [m.content for m in conv.messages] == ["hi, there", "yo"] and conv.tools[0]["function"]["name"] == "f"


def test_malformed_line_is_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROW) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(SftlabError, match=r"d.jsonl:3: line is not valid JSON"):
        load_conversations(str(p))


def test_bad_role_order_and_empty_reply(tmp_path):
    bad = {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}
    with pytest.raises(SftlabError, match=r"d.jsonl:2: message 1 has role 'assistant' where 'user' was expected"):
        load_conversations(_jsonl(tmp_path / "d.jsonl", [ROW, bad]))
    empty = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}
    with pytest.raises(SftlabError, match="message 2 \\(assistant\\) is empty"):
        load_conversations(_jsonl(tmp_path / "e.jsonl", [empty]))


def test_json_array_lines_csv_parquet_and_dataset_folder(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    j = tmp_path / "d.json"
    j.write_text("[\n" + ",\n".join("  " + json.dumps(r) for r in rows) + "\n]\n")
    assert [c.line for c in load_conversations(str(j))] == [2, 3, 4]

    c = tmp_path / "d.csv"
    with c.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerows(rows)
    convs = load_conversations(str(c))
    assert [cv.line for cv in convs] == [2, 3, 4] and convs[2].messages[1].content == "c2"

    import datasets

    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert len(load_conversations(str(tmp_path / "d.parquet"))) == 3
    ds.save_to_disk(str(tmp_path / "hf"))
    assert [cv.messages[0].content for cv in load_conversations(str(tmp_path / "hf"))] == ["p0", "p1", "p2"]


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(SftlabError, match="not found"):
        load_conversations(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.xml").write_text("<x/>")
    with pytest.raises(SftlabError, match="unsupported file type '.xml'"):
        load_conversations(str(tmp_path / "d.xml"))


@pytest.mark.parametrize("name,body", [
    ("d.csv", "instruction,input,output\nhi,,hello\n"),
    ("d.jsonl", json.dumps({"instruction": "hi", "output": "hello"}) + "\n"),
    ("d.json", json.dumps([{"instruction": "hi", "output": "hello"}])),
])
def test_utf8_bom_at_file_start_is_ignored(tmp_path, name, body):
    p = tmp_path / name
    p.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))  # Excel's "CSV UTF-8", Notepad's UTF-8
    (c,) = load_conversations(str(p))
    assert [(m.role, m.content) for m in c.messages] == [("user", "hi"), ("assistant", "hello")]
    assert c.line == (2 if name.endswith(".csv") else 1)


def test_csv_cell_over_128_kib_loads(tmp_path):
    p = tmp_path / "big.csv"
    with p.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["Summarize", "word " * 30000, "short"])  # 150,000 characters in one cell
    (c,) = load_conversations(str(p))
    assert len(c.messages[0].content) > 150_000 and c.messages[1].content == "short"


def test_empty_csv_weight_cell_is_the_default_weight(tmp_path):
    p = tmp_path / "w.csv"
    p.write_text("instruction,input,output,weight\nhi,,hello,2\nyo,,sup,\n", encoding="utf-8")
    assert [c.weight for c in load_conversations(str(p))] == [2.0, 1.0]
    p.write_text("instruction,input,output,weight\nhi,,hello,x\n", encoding="utf-8")
    with pytest.raises(SftlabError, match=r"w.csv:2: 'weight' must be a number, got 'x'"):
        load_conversations(str(p))


CUT = {"messages": [{"role": "user", "content": "hi \ud83d"}, {"role": "assistant", "content": "hello"}]}  # half an emoji


def test_cut_character_is_one_error_naming_the_line(tmp_path):
    with pytest.raises(SftlabError, match=r"d.jsonl:2: messages\[0\].content holds an unpaired UTF-16 surrogate "
                                          r"\\ud83d .*remove or complete the cut character"):
        load_conversations(_jsonl(tmp_path / "d.jsonl", [ROW, CUT]))  # json.dumps writes it as \ud83d
    j = tmp_path / "d.json"
    j.write_text("[\n" + ",\n".join(json.dumps(r) for r in [ROW, ROW, CUT]) + "\n]\n")
    with pytest.raises(SftlabError, match=r"d.json:4: messages\[0\].content holds an unpaired UTF-16 surrogate"):
        load_conversations(str(j))
    call = {"type": "function", "function": {"name": "f", "arguments": json.dumps({"city": "Par\ud83d"})}}
    row = {"messages": [{"role": "user", "content": "w?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "done"}]}
    with pytest.raises(SftlabError, match=r"t.jsonl:1: message 2 tool call 1 'arguments': city holds an unpaired"):
        load_conversations(_jsonl(tmp_path / "t.jsonl", [row]))


def test_parquet_text_that_is_not_utf8_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # b"\xed\xa0\xbd" is a lone surrogate written as UTF-8 bytes (a cut emoji from a CESU-8 writer)
    col = lambda vals: pa.array(vals).view(pa.string())  # noqa: E731  (no UTF-8 check on a view)
    pq.write_table(pa.table({"prompt": col([b"p1", b"hi \xed\xa0\xbd"]), "completion": col([b"c1", b"c2"])}),
                   tmp_path / "d.parquet")
    with pytest.raises(SftlabError, match=r"d.parquet:2: invalid UTF-8 in a text column .*cut character"):
        load_conversations(str(tmp_path / "d.parquet"))


def test_deeply_nested_json_is_one_error_naming_the_line(tmp_path):
    deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROW) + "\n" + deep + "\n", encoding="utf-8")
    with pytest.raises(SftlabError, match=r"d.jsonl:2: line is nested too deeply"):
        load_conversations(str(p))
    j = tmp_path / "d.json"
    j.write_text("[\n" + json.dumps(ROW) + ",\n" + deep + "\n]\n", encoding="utf-8")
    with pytest.raises(SftlabError, match=r"d.json:3: nested too deeply"):
        load_conversations(str(j))


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "http://x/cat.png"}},
    {"type": "image", "image": "cat.png"},
    {"type": "input_audio", "input_audio": {"data": "...", "format": "wav"}},
])
def test_non_text_content_part_is_one_error(tmp_path, part):
    # Dropping the part silently left the model trained to answer an empty (or partial) prompt.
    row = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]},
                        {"role": "assistant", "content": "A cat."}]}
    with pytest.raises(SftlabError, match=rf"d.jsonl:2: message 1 content has a part of type '{part['type']}'; "
                                          r"sftlab trains text models only \(drop this example, or use text-only data"):
        load_conversations(_jsonl(tmp_path / "d.jsonl", [ROW, row]))
    text = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_text", "text": "b"}]},
                         {"role": "assistant", "content": [{"type": "output_text", "text": "c"}]}]}
    (c,) = load_conversations(_jsonl(tmp_path / "t.jsonl", [text]))
    assert [m.content for m in c.messages] == ["ab", "c"]


def _chats(path, *words):
    path.parent.mkdir(parents=True, exist_ok=True)
    return _jsonl(path, [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w}]}
                         for w in words])


def test_folder_of_files_reads_the_train_split_like_load_dataset(tmp_path):
    d = tmp_path / "ds"
    _chats(d / "train.jsonl", "t1", "t2")
    _chats(d / "test.jsonl", "held-out")
    _chats(d / "validation.jsonl", "val")
    _chats(d / ".ipynb_checkpoints" / "train-checkpoint.jsonl", "copy")  # hidden: never read
    assert [(Path(c.source).name, c.messages[0].content) for c in load_conversations(str(d))] == \
        [("train.jsonl", "t1"), ("train.jsonl", "t2")]

    shards = tmp_path / "shards"  # the Hub's layout: data/train-0000N-of-0000M.*
    _chats(shards / "data" / "train-00000-of-00002.jsonl", "a")
    _chats(shards / "data" / "train-00001-of-00002.jsonl", "b")
    _chats(shards / "data" / "test-00000-of-00001.jsonl", "held-out")
    assert [c.messages[0].content for c in load_conversations(str(shards))] == ["a", "b"]

    plain = tmp_path / "plain"  # no split names: every file is the training data
    _chats(plain / "part1.jsonl", "p1")
    _chats(plain / "part2.jsonl", "p2")
    _chats(plain / "contest.jsonl", "p3")  # 'test' inside a word is no split name
    assert sorted(c.messages[0].content for c in load_conversations(str(plain))) == ["p1", "p2", "p3"]


def test_folder_with_other_splits_but_no_train_is_an_error(tmp_path):
    d = tmp_path / "ds"
    _chats(d / "test.jsonl", "x")
    _chats(d / "dev.jsonl", "y")
    with pytest.raises(SftlabError, match=r"ds: no training split in this folder of 2 data files.*dev.jsonl is "
                                          r"validation, test.jsonl is test \(name the file train.jsonl"):
        load_conversations(str(d))


def test_a_folder_given_as_held_out_data_reads_its_validation_else_its_test_split(tmp_path):
    """--eval-data DIR (and doctor --eval, eval --data): the held-out split, never the training one."""
    import datasets

    d = tmp_path / "ds"
    _chats(d / "train.jsonl", "t1")
    _chats(d / "test.jsonl", "te")
    assert [c.messages[0].content for c in load_conversations(str(d), split="eval")] == ["te"]
    _chats(d / "validation.jsonl", "va")
    assert [c.messages[0].content for c in load_conversations(str(d), split="eval")] == ["va"]
    only = tmp_path / "only"
    _chats(only / "train.jsonl", "t1")
    _chats(only / "other.jsonl", "o")
    with pytest.raises(SftlabError, match="only: no validation or test split in this folder of 2 data files"):
        load_conversations(str(only), split="eval")
    saved = tmp_path / "saved"
    datasets.DatasetDict({name: datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": name},
                                                                          {"role": "assistant", "content": name}]]})
                          for name in ("train", "test")}).save_to_disk(str(saved))
    assert [c.messages[0].content for c in load_conversations(str(saved), split="eval")] == ["test"]
    assert [c.messages[0].content for c in load_conversations(str(saved))] == ["train"]


def test_csv_row_split_by_an_unquoted_comma_is_an_error_not_a_cut_reply(tmp_path):
    # "red, green, blue" unquoted is three cells: reading the row would train the reply "red".
    p = tmp_path / "c.csv"
    p.write_text("instruction,output\nhi,hello\nList three colors,red, green, blue\n", encoding="utf-8")
    with pytest.raises(SftlabError, match=r"c.csv:3: row has 4 cells, the header 2") as e:
        load_conversations(str(p))
    assert "double quotes" in e.value.hint
    p.write_text('instruction,output\nhi,hello\nList three colors,"red, green, blue"\n', encoding="utf-8")
    assert load_conversations(str(p))[1].messages[1].content == "red, green, blue"


def test_alpaca_history_turns_are_read_before_the_instruction(tmp_path):
    # LLaMA-Factory's alpaca rows carry earlier turns in "history": they were dropped without a word
    rows = [{"instruction": "and 3+3?", "input": "", "output": "6", "history": [["2+2?", "4"], ["and 2+3?", "5"]]},
            {"instruction": "hi", "output": "yo", "history": []},
            {"instruction": "hi", "output": "yo", "history": [["only a question"]]}]
    convs, failures = to_conversations(read_records(_jsonl(tmp_path / "a.jsonl", rows)), strict=False)
    assert [(m.role, m.content) for m in convs[0].messages] == [
        ("user", "2+2?"), ("assistant", "4"), ("user", "and 2+3?"), ("assistant", "5"), ("user", "and 3+3?"), ("assistant", "6")]
    assert [(m.role, m.content) for m in convs[1].messages] == [("user", "hi"), ("assistant", "yo")]
    ((rec, exc),) = failures
    assert rec.line == 3 and "'history' must be a list of [instruction, response] pairs" in str(exc)


def test_top_level_system_field_of_messages_and_prompt_completion_rows_is_read(tmp_path):
    # as sharegpt and alpaca rows' 'system' already was; it was dropped, and the template's default system prompt trained instead
    def roles(row):
        (c,) = load_conversations(_jsonl(tmp_path / "s.jsonl", [row]))
        return [(m.role, m.content) for m in c.messages]

    assert roles({"system": "S", **ROW}) == [("system", "S"), ("user", "Hi"), ("assistant", "Hello")]
    assert roles({"system": "S", "prompt": "P", "completion": "C"}) == [("system", "S"), ("user", "P"), ("assistant", "C")]
    assert roles({"system": "S", "prompt": [{"role": "user", "content": "P"}],
                  "completion": [{"role": "assistant", "content": "C"}]}) == [("system", "S"), ("user", "P"), ("assistant", "C")]
    assert roles({"system": "S", "messages": [{"role": "system", "content": "S"}] + ROW["messages"]})[0] == ("system", "S")
    assert roles({"system": "", **ROW}) == [("user", "Hi"), ("assistant", "Hello")]
    with pytest.raises(SftlabError, match=r"s.jsonl:1: the record has a 'system' field and a different system message"):
        roles({"system": "S", "messages": [{"role": "system", "content": "other"}] + ROW["messages"]})


def test_conversations_of_role_content_turns_are_read_as_messages(tmp_path):
    # {"conversations": [{"role", "content"}]}, as many hub datasets store chats: it was refused, and
    # `--format messages` (the hint) could not read it either
    row = {"conversations": ROW["messages"], "system": "S"}
    (c,) = load_conversations(_jsonl(tmp_path / "r.jsonl", [row]))
    assert [(m.role, m.content) for m in c.messages] == [("system", "S"), ("user", "Hi"), ("assistant", "Hello")]


@pytest.mark.parametrize("name,split,message", [
    ("test.jsonl", "train", r"ds: no training split in this folder of 1 data file, named as other splits: test.jsonl is test"),
    ("train.jsonl", "eval", r"ds: no validation or test split in this folder of 1 data file, named as other splits: "
                            r"train.jsonl is train"),
])
def test_folder_of_one_file_named_as_another_split_is_not_read_as_this_one(tmp_path, name, split, message):
    # a folder holding only test.jsonl trained on the test set; only train.jsonl, as eval data, scored the training set
    (tmp_path / "ds").mkdir()
    _jsonl(tmp_path / "ds" / name, [ROW])
    with pytest.raises(SftlabError, match=message):
        read_records(tmp_path / "ds", split=split)
    _jsonl(tmp_path / "ds" / name, [ROW])
    assert len(read_records(tmp_path / "ds", split="eval" if split == "train" else "train")) == 1


def test_saved_dataset_dict_never_reads_another_split_as_the_training_data(tmp_path):
    # a DatasetDict without a 'train' split was read through its first split: test or validation data trained on
    from datasets import Dataset, DatasetDict

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]
    DatasetDict(test=Dataset.from_list(rows[:3]), validation=Dataset.from_list(rows[3:])).save_to_disk(str(tmp_path / "held"))
    with pytest.raises(SftlabError, match=r"held: no training split in this dataset \(it has test, validation\)"):
        read_records(tmp_path / "held")
    assert len(read_records(tmp_path / "held", split="eval")) == 2  # validation first
    DatasetDict(test_sft=Dataset.from_list(rows[:3]), train_sft=Dataset.from_list(rows[3:])).save_to_disk(str(tmp_path / "sft"))
    assert [len(read_records(tmp_path / "sft", split=s)) for s in ("train", "eval")] == [2, 3]


@pytest.mark.parametrize("body,expected", [
    ("Instruction,Input,Output\nAdd, 1 2 ,3\n", [("user", "Add\n\n 1 2 "), ("assistant", "3")]),
    (" prompt , completion ,WEIGHT\n2+2?, 4 ,2\n", [("user", "2+2?"), ("assistant", " 4 ")]),
    ("TEXT\nsome text\n", "some text"),
])
def test_csv_header_names_match_ignoring_case_and_spaces(tmp_path, body, expected):
    p = tmp_path / "d.csv"
    p.write_text(body, encoding="utf-8")
    (c,) = load_conversations(str(p))
    if isinstance(expected, str):
        assert c.text == expected
    else:  # the cells are kept exactly, spaces and all
        assert [(m.role, m.content) for m in c.messages] == expected
    assert c.weight == (2.0 if "WEIGHT" in body else 1.0) and c.line == 2


def test_csv_header_of_no_format_is_one_line_naming_it(tmp_path, tiny_model_dir, capsys):
    from sftlab.cli import main

    p = tmp_path / "qa.csv"
    p.write_text("Question,Answer\nq,a\n", encoding="utf-8")
    assert main(["prepare", "--model", str(tiny_model_dir), "--data", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{p}: cannot tell the data format from the CSV header 'Question,Answer'" in err
    assert "prompt+completion" in err and "instruction+output" in err
    p.write_text("prompt,Prompt ,completion\na,b,c\n", encoding="utf-8")
    with pytest.raises(SftlabError, match=r"CSV header 'prompt,Prompt ,completion' names the column 'prompt' twice \('prompt' and 'Prompt '\)"):
        load_conversations(str(p))


def test_parquet_column_names_match_ignoring_case_and_spaces(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"Prompt": ["2+2?"], " Completion": [" 4"]}), p)
    (c,) = load_conversations(str(p))
    assert [(m.role, m.content) for m in c.messages] == [("user", "2+2?"), ("assistant", " 4")]
    pq.write_table(pa.table({"Q": ["a"], "A": ["b"]}), p)
    with pytest.raises(SftlabError, match=r"d.parquet: cannot tell the data format from the columns 'Q,A'"):
        load_conversations(str(p))


@pytest.mark.parametrize("name,body,why", [
    ("e.jsonl", "", "the file is empty"),
    ("b.jsonl", "\n  \n", "the file holds only blank lines"),
    ("h.csv", "prompt,completion\n", "the CSV file has a header but no rows"),
    ("l.json", "[]", "the JSON holds an empty list"),
])
def test_no_records_says_what_the_file_holds(tmp_path, name, body, why):
    p = tmp_path / name
    p.write_text(body, encoding="utf-8")
    with pytest.raises(SftlabError, match=f"{name}: no examples found") as e:
        read_records(p)
    assert e.value.hint == why


@pytest.mark.parametrize("name", ["latin.csv", "latin.json"])
def test_bad_utf8_names_the_line_not_a_chunk_offset(tmp_path, name):
    rows = [f"question number {i}" for i in range(1000)]
    rows[700] = "caf\xe9 " + rows[700]
    if name.endswith(".csv"):  # the csv reader decodes in chunks: its offset was into the last chunk
        body = "prompt,completion\n" + "".join(f"{r},answer\n" for r in rows)
    else:
        body = "[\n" + ",\n".join(json.dumps({"prompt": r, "completion": "answer"}, ensure_ascii=False) for r in rows) + "\n]"
    p = tmp_path / name
    p.write_bytes(body.encode("latin-1"))
    line = 702  # the header or the opening bracket, then row 701
    with pytest.raises(SftlabError, match=rf"{name}:{line}: invalid UTF-8 at byte \d+ of the line \(b'\\xe9'\)"):
        read_records(p)


def test_a_file_type_given_as_format_says_so(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [ROW])
    with pytest.raises(SftlabError, match="unknown format 'csv'") as e:
        load_conversations(p, "csv")
    assert e.value.hint.startswith("'csv' is a file type, read from the file name") and "prompt_completion" in e.value.hint
    with pytest.raises(SftlabError, match="unknown format 'xml'") as e:
        load_conversations(p, "xml")
    assert e.value.hint.startswith("use one of: messages")


@pytest.mark.parametrize("row,reply", [({"prompt": "p"}, "completion"), ({"instruction": "i", "input": "x"}, "output")])
def test_prompts_without_replies_are_refused_for_training_naming_generate(tmp_path, row, reply):
    p = _jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(SftlabError, match=rf"d.jsonl:1: the records hold prompts without replies \(no '{reply}' field\)") as e:
        load_conversations(p)
    assert "sftlab generate" in e.value.hint
    (c,) = load_conversations(p, open_end=True)  # as generate reads them
    assert [m.role for m in c.messages] == ["user"]


def test_saved_dataset_column_names_match_ignoring_case(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"Instruction": "Add", "Output": "3"}]).save_to_disk(str(tmp_path / "hf"))
    (c,) = load_conversations(str(tmp_path / "hf"))
    assert [(m.role, m.content) for m in c.messages] == [("user", "Add"), ("assistant", "3")]
    Dataset.from_list([{"Q": "a"}]).save_to_disk(str(tmp_path / "q"))
    with pytest.raises(SftlabError, match=r"q: cannot tell the data format from the columns 'Q'"):
        load_conversations(str(tmp_path / "q"))
