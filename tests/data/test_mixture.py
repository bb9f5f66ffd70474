"""Dataset mixtures: shares by weight or count, a seeded draw per epoch, clear errors, per-source stats everywhere."""

import json
import random
import re
from collections import Counter

import pytest
import yaml
from conftest import build_tiny_tokenizer, chat_data

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.core.errors import SftlabError
from sftlab.data.doctor import run_doctor
from sftlab.data.mixture import draw, load_mixture, parse_sources, resolve_counts
from sftlab.data.prepare import prepare, source_lines


def _alpaca(path, n):
    path.write_text("".join(json.dumps({"instruction": f"say {i}", "input": "", "output": f"{i}!"}) + "\n"
                            for i in range(n)))
    return str(path)


@pytest.fixture
def three(tmp_path):
    """Three sources of different sizes (100, 50, 30) and formats (messages, alpaca, messages)."""
    return [{"path": chat_data(tmp_path / "a.jsonl", 100), "weight": 0.5},
            {"path": _alpaca(tmp_path / "b.jsonl", 50), "weight": 0.3, "format": "alpaca"},
            {"path": chat_data(tmp_path / "c.jsonl", 30, offset=1000), "weight": 0.2}]


def _prepared(spec, seed=7, **kw):
    cfg = load_config(None, {"data": spec, "template": "chatml", "max_seq_length": 128, "seed": seed, **kw})
    return prepare(cfg, build_tiny_tokenizer())


def _epoch(p, e: int) -> list[tuple[int, str]]:
    """(source index, file:line) of each example epoch ``e`` trains on."""
    return [(p.mixture.source_of[p.pool[j].index], p.pool[j].where) for j in p.draw.indices(e)]


def test_weights_give_each_source_its_share_of_every_epoch(three):
    p = _prepared(three)
    assert p.mixture.counts == [90, 54, 36] and p.mixture.sizes == [100, 50, 30]
    assert len(p.pool) == 180 and p.report.n_input == 180  # every source tokenized once, whole
    for e in range(3):
        epoch = _epoch(p, e)
        assert len(epoch) == 180  # an epoch of a weighted mix: all sources' sizes together
        n = Counter(i for i, _ in epoch)
        for i, want in enumerate((0.5, 0.3, 0.2)):
            assert abs(n[i] / len(epoch) - want) <= 0.02, (e, i, n)
        # each example really comes from the source it is attributed to
        assert all(where.startswith(three[i]["path"] + ":") for i, where in epoch)
        # a subsampled source repeats nothing; an upsampled one repeats every example as evenly as possible
        lines = {i: Counter(w for j, w in epoch if j == i) for i in range(3)}
        assert max(lines[0].values()) == 1 and len(lines[0]) == 90
        assert set(lines[1].values()) <= {1, 2} and len(lines[1]) == 50
        assert set(lines[2].values()) == {1, 2} and sum(lines[2].values()) == 36
    assert p.mixture.formats == ["messages", "alpaca", "messages"]
    # the prepared examples are the first epoch; its conversations are those of the epoch, each once
    assert [e.where for e in p.examples] == [w for _, w in _epoch(p, 0)]
    assert sorted(c.where() for c in p.conversations) == sorted({w for _, w in _epoch(p, 0)})


def test_each_epoch_draws_another_subsample_of_an_oversized_source(three):
    p = _prepared(three)
    big = [{w for i, w in _epoch(p, e) if i == 0} for e in range(3)]
    assert [len(b) for b in big] == [90, 90, 90]  # the right count, without repetition, every epoch
    assert big[0] != big[1] and big[1] != big[2] and big[0] != big[2]
    assert len(big[0] | big[1] | big[2]) > 90  # over epochs, more of the source is seen
    small = [Counter(w for i, w in _epoch(p, e) if i == 2) for e in range(2)]  # 36 of 30: the 6 repeats move
    assert sum(small[0].values()) == sum(small[1].values()) == 36 and small[0] != small[1]


def test_the_draws_are_deterministic_under_the_seed_and_change_with_it(three):
    a, b, c = _prepared(three, seed=1), _prepared(three, seed=1), _prepared(three, seed=2)
    for e in range(3):
        assert _epoch(a, e) == _epoch(b, e)
        assert _epoch(a, e) != _epoch(c, e)
    assert a.mixture.counts == c.mixture.counts
    # the resolved counts (what the run's config stores) draw the very same epochs
    saved = a.mixture.resolved()
    assert [s["count"] for s in saved] == [90, 54, 36]
    again = _prepared(saved, seed=1)
    assert [_epoch(again, e) for e in range(3)] == [_epoch(a, e) for e in range(3)]


def test_counts_and_plain_lists(three, tmp_path):
    counted = [{**{k: v for k, v in s.items() if k != "weight"}, "count": n} for s, n in zip(three, (10, 120, 5))]
    p = _prepared(counted, seed=0)
    assert p.mixture.counts == [10, 120, 5]
    for e in range(2):
        assert Counter(i for i, _ in _epoch(p, e)) == {0: 10, 1: 120, 2: 5}
    plain = [three[0]["path"], three[2]["path"]]  # no weight or count: concatenation, in order, every epoch
    mix = load_mixture(plain)
    assert [c.line for c in mix.conversations] == list(range(1, 101)) + list(range(1, 31))
    assert mix.source_of == [0] * 100 + [1] * 30
    whole = _prepared(plain)
    assert whole.draw is None and whole.pool is None and len(whole.examples) == 130
    assert whole.mixture.resolved() == [{"path": q, "format": "messages", "name": n} for q, n in zip(plain, "ac")]
    assert [(r["drawn"], r["examples"], r["redrawn"]) for r in whole.report.sources] == [(100, 100, False), (30, 30, False)]
    assert source_lines(whole.report)[1].startswith("  c: 30 examples per epoch (23.1%), all its usable examples (30 ")


def test_a_source_with_nothing_left_after_tokenization_is_one_clear_error(tmp_path):
    short = chat_data(tmp_path / "short.jsonl", 5)
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "x " * 200},
                                                     {"role": "assistant", "content": "y"}]}) + "\n" for _ in range(3)))
    spec = [{"path": short, "weight": 1}, {"path": str(long), "weight": 1}]
    with pytest.raises(SftlabError, match=r"source 'long' \(.*long.jsonl\): none of its 3 conversations is left") as e:
        _prepared(spec, max_seq_length=64, truncation="drop")
    # why, in the error itself: `sftlab prepare` stops at it, so it cannot list the dropped examples
    assert re.search(r"after tokenization; \S*long.jsonl:1: \d+ tokens > max_seq_length 64 \(", str(e.value))
    assert "see `sftlab prepare`" not in str(e.value)


def test_largest_remainder_counts_add_up_exactly():
    src = parse_sources([{"path": __file__, "weight": w} for w in (1, 1, 1)])
    assert resolve_counts(src, [10, 0, 0]) == [4, 3, 3]
    picks = Counter(draw(3, 7, random.Random(0)))  # 7 of 3: each twice, one of them a third time
    assert sorted(picks.values()) == [2, 2, 3]
    assert sorted(draw(5, 3, random.Random(0))) == sorted(set(draw(5, 3, random.Random(0))))  # no repeats


@pytest.mark.parametrize("bad, message", [
    ([{"path": "missing.jsonl", "weight": 1}], "source 1 (missing.jsonl): file not found"),
    ([{"path": "A", "weight": 0.5}, {"path": "B", "weight": 0}], "source 2 (B): weight must be > 0, got 0"),
    ([{"path": "A", "weight": -1}], "source 1 (A): weight must be > 0"),
    ([{"path": "A", "weight": 0.5}, {"path": "B", "count": 3}], "source 2 (B): has a count while source 1 has a weight"),
    ([{"path": "A", "weight": 0.5}, {"path": "B"}], "source 2 (B): has no weight or count while source 1 has a weight"),
    ([{"path": "A", "weight": 0.5, "count": 3}], "source 1 (A): has both weight and count"),
    ([{"path": "A", "count": 2.5}], "source 1 (A): count must be a whole number"),
    ([{"path": "A", "weight": 1, "ratio": 2}], "source 1: unknown key 'ratio'"),
    ([{"weight": 1}], "source 1: 'path' is missing"),
    ([], "the list of sources is empty"),
])
def test_a_bad_source_is_one_clear_error_naming_it(tmp_path, bad, message, capsys):
    a, b = chat_data(tmp_path / "A.jsonl", 3), chat_data(tmp_path / "B.jsonl", 3)
    spec = [{k: {"A": a, "B": b}.get(v, v) if k == "path" else v for k, v in s.items()} for s in bad]
    message = message.replace("(A)", f"({a})").replace("(B)", f"({b})")
    with pytest.raises(SftlabError) as exc:
        load_mixture(spec)
    assert str(exc.value).startswith("config key 'data'") and message in str(exc.value)
    # the same through the CLI: one line on stderr, no traceback
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": spec, "model": "unused"}))
    if spec:
        assert main(["prepare", str(cfg)]) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and message.split("(")[0] in err


def test_single_source_configs_are_unchanged(tmp_path):
    path = chat_data(tmp_path / "one.jsonl", 12)
    tok = build_tiny_tokenizer()
    cfg = load_config(None, {"data": path, "template": "chatml", "max_seq_length": 128})
    one = prepare(cfg, tok)
    assert one.mixture is None and one.report.sources == []
    assert [c.where() for c in one.conversations] == [f"{path}:{i}" for i in range(1, 13)]


def test_prepare_reports_each_source_for_one_epoch(three):
    p = _prepared(three, seed=3)
    rows = {r["name"]: r for r in p.report.sources}
    assert [rows[n]["drawn"] for n in "abc"] == [rows[n]["examples"] for n in "abc"] == [90, 54, 36]
    assert [rows[n]["usable"] for n in "abc"] == [100, 50, 30] and all(r["redrawn"] for r in rows.values())
    assert sum(r["usable"] for r in rows.values()) == len(p.pool) == p.report.n_kept  # tokenized once, whole
    assert sum(r["examples"] for r in rows.values()) == len(p.examples) == 180  # one epoch
    for name, r in rows.items():  # each source's own token counts, from its examples in the first epoch
        mine = [e for e in p.examples if p.mixture.source_of[e.index] == "abc".index(name)]
        assert r["tokens"] == sum(len(e.input_ids) for e in mine) > 0
        assert r["trained_tokens"] == sum(e.n_trained for e in mine) > 0
    assert p.report.to_dict()["sources"] == p.report.sources
    lines = source_lines(p.report)
    assert lines[0].startswith("  a: 90 examples per epoch (50.0%), drawn afresh each epoch from its 100 usable "
                               "examples (100 conversations); first epoch: ")


def test_doctor_reports_each_source(three, tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text(bad.read_text() + "{not json\n")
    res = run_doctor(three, tokenizer=build_tiny_tokenizer(), template="chatml")
    rows = {r["name"]: r for r in res.stats["sources"]}
    assert [rows[n]["records"] for n in "abc"] == [100, 50, 31]
    assert [rows[n]["examples"] for n in "abc"] == [100, 50, 30]
    assert rows["b"]["format"] == "alpaca" and rows["a"]["weight"] == 0.5
    assert all(rows[n]["trained_tokens"] > 0 and rows[n]["tokens"] > rows[n]["trained_tokens"] for n in "abc")
    assert res.stats["examples"] == 180
    parse = [f for f in res.findings if f.rule == "parse"]
    assert len(parse) == 1 and parse[0].data["file"] == str(bad) and parse[0].data["line"] == 31
    text = res.format_text()
    assert "per source" in text and "b (alpaca): 50 of 50 records usable" in text


def test_eval_reports_each_source(tiny_model_dir, tmp_path, capsys):
    from conftest import make_lora_run

    from sftlab.eval.generation import GenerationSettings
    from sftlab.eval.run import run_eval

    run = make_lora_run(tmp_path / "run", tiny_model_dir)
    a, b = chat_data(tmp_path / "ea.jsonl", 4), chat_data(tmp_path / "eb.jsonl", 3, offset=500)
    short = GenerationSettings(max_new_tokens=4)
    both = run_eval(str(run), [a, b], settings=short, samples=1)["result"]
    assert set(both["sources"]) == {"ea", "eb"}
    for path, name, n in ((a, "ea", 4), (b, "eb", 3)):
        alone = run_eval(str(run), path, settings=short, samples=1)["result"]
        assert "sources" not in alone  # one eval file: the result is as it always was
        mine = both["sources"][name]
        assert mine["n_examples"] == n and mine["tokens"] == alone["metrics"]["tokens"]
        assert mine["loss"] == pytest.approx(alone["metrics"]["loss"], rel=1e-5)
        assert mine["task_score"] == pytest.approx(alone["metrics"]["task_score"])
    assert main(["eval", str(run), "--data", a, "--data", b, "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "per source:" in out and "  ea: 4 examples, loss" in out and "  eb: 3 examples, loss" in out


@pytest.mark.xdist_group("train")
def test_a_training_run_saves_the_resolved_mixture_and_reports_each_source(tmp_path, tiny_model_dir):
    from conftest import train_config

    from sftlab import rundir as A
    from sftlab.report import write_report
    from sftlab.train.run import train

    a, b = chat_data(tmp_path / "a.jsonl", 12), chat_data(tmp_path / "b.jsonl", 4, offset=300)
    cfg = train_config(tmp_path, tiny_model_dir, data=[{"path": a, "weight": 0.5}, {"path": b, "weight": 0.5}],
                       max_steps=2, template="chatml")
    summary = train(cfg, quiet=True)
    run = tmp_path / "run"
    saved = yaml.safe_load((run / A.CONFIG).read_text())["data"]
    assert saved == [{"path": a, "format": "messages", "count": 8, "name": "a"},
                     {"path": b, "format": "messages", "count": 8, "name": "b"}]
    assert summary["examples"] == 16  # one epoch
    rows = {r["name"]: r for r in summary["prepare"]["sources"]}
    assert (rows["a"]["drawn"], rows["b"]["drawn"]) == (8, 8) and rows["b"]["size"] == 4
    assert (rows["a"]["usable"], rows["b"]["usable"]) == (12, 4) and summary["prepare"]["n_kept"] == 16
    # the saved config is a valid config that draws the same mix
    assert load_config(run / A.CONFIG).data == saved
    page = (run / "report.html").read_text() if write_report(run, doctor=True) else ""
    assert "<h3>Sources (one epoch)</h3>" in page and "50.0%" in page and "per source:" in page


def test_prepare_names_a_mixtures_files_not_its_python_list(tmp_path, tiny_model_dir, capsys):
    a, b = chat_data(tmp_path / "a.jsonl", 4), chat_data(tmp_path / "b.jsonl", 3)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": [{"path": a, "weight": 1}, {"path": b, "weight": 1}],
                                   "model": str(tiny_model_dir), "max_seq_length": 128}))
    assert main(["prepare", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"prepared {a}, {b}: 7/7 examples kept" in out and "{'path'" not in out


def test_wrong_format_of_a_source_points_at_its_format_key_not_at_the_flag(tmp_path):
    # `--format` cannot change a source's own `format:`: the hint sent users to a flag that does nothing
    path = chat_data(tmp_path / "chat.jsonl", 3)
    with pytest.raises(SftlabError, match=r"chat.jsonl:1: 'instruction' is missing") as e:
        load_mixture([{"path": path, "format": "alpaca", "weight": 1}])
    assert "change the `format: alpaca` of source 'chat'" in str(e.value) and "--format" not in str(e.value)


def test_an_unknown_format_of_a_source_names_the_source(tmp_path):
    """It said only "unknown format 'nosuch'": which of the sources, in which key, was left to guess."""
    a, b = chat_data(tmp_path / "a.jsonl", 3), chat_data(tmp_path / "b.jsonl", 3)
    with pytest.raises(SftlabError) as e:
        load_mixture([{"path": a, "weight": 1}, {"path": b, "weight": 1, "format": "nosuch"}])
    assert str(e.value).startswith(f"config key 'data', source 2 ({b}): unknown format 'nosuch'")
    assert "use one of: messages" in str(e.value)


def test_data_flag_takes_a_list_of_sources_as_its_help_says(tmp_path, tiny_model_dir, capsys):
    # `--data "[a.jsonl, {path: b.jsonl, count: 2}]"` was read as one file of that name: "not found"
    a, b = chat_data(tmp_path / "a.jsonl", 4), chat_data(tmp_path / "b.jsonl", 3)
    spec = f"[{{path: {a}, count: 3}}, {{path: {b}, count: 2}}]"
    assert main(["prepare", "--model", str(tiny_model_dir), "--data", spec, "--max-seq-length", "128"]) == 0
    out = capsys.readouterr().out
    assert f"prepared {a}, {b}:" in out and "  a: 3 examples per epoch" in out and "  b: 2 examples per epoch" in out


def test_eval_scores_each_source_with_its_own_scorer(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # a JSON-extraction source evaluated beside a plain-chat one was scored 'exact' (the scorer the union of
    # references called for): its per-source task score differed from evaluating it alone (json_fields)
    from conftest import make_lora_run

    import sftlab.eval.run as ev
    from sftlab.eval.generation import Generation, GenerationSettings, reference_reply

    run = make_lora_run(tmp_path / "run", tiny_model_dir)
    js = tmp_path / "js.jsonl"
    js.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"extract {i}"},
        {"role": "assistant", "content": json.dumps({"n": i, "even": i % 2 == 0}, separators=(",", ":"))}]}) + "\n"
        for i in range(3)))
    text = chat_data(tmp_path / "text.jsonl", 2)

    def replies(model, tok, tpl, convs, settings, batch_size):  # the reference, as JSON with spaces
        out = []
        for c in convs:
            ref = reference_reply(c)
            reply = json.dumps(json.loads(ref)) if ref.startswith("{") else ref
            out.append(Generation(reply, True, 3, [5, 6, 7]))
        return out

    monkeypatch.setattr(ev, "generate", replies)
    short = GenerationSettings(max_new_tokens=4)
    alone = ev.run_eval(str(run), str(js), settings=short)["result"]
    assert alone["scorer"] == "json_fields" and alone["metrics"]["task_score"] == 1.0
    both = ev.run_eval(str(run), [str(js), text], settings=short)["result"]
    assert both["sources"]["js"]["task_score"] == 1.0 and both["sources"]["js"]["scorer"] == "json_fields"
    assert both["sources"]["text"]["task_score"] == 1.0 and both["sources"]["text"]["scorer"] == "exact"
    assert both["scorer"] == "json_fields+exact" and both["format_check"] == "json_object+finished"
    assert both["metrics"]["task_score"] == 1.0
    assert ev.run_eval(str(run), [str(js), text], settings=short, compare_to=str(tiny_model_dir))["after"] == both
    assert main(["eval", str(run), "--data", str(js), "--data", text, "--max-new-tokens", "4"]) == 0
    assert "task_score (json_fields) 1.000" in capsys.readouterr().out


def test_a_bad_record_in_a_source_names_the_source_to_give_a_format(tmp_path):
    good = _alpaca(tmp_path / "a.jsonl", 2)
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"prompt": 5, "completion": "x"}) + "\n")
    with pytest.raises(SftlabError, match=r"b.jsonl:1: 'prompt' must be a string, got int") as e:
        load_mixture([str(good), str(bad)])
    assert "give source 'b' its own `format:`" in e.value.hint and "--format" not in e.value.hint
    # a record whose problem is not its format gets its own fix
    bad.write_text(json.dumps({"prompt": "p", "completion": ""}) + "\n")
    with pytest.raises(SftlabError, match=r"b.jsonl:1: message 2 \(assistant\) is empty") as e:
        load_mixture([str(good), str(bad)])
    assert e.value.hint == "write the reply, or remove the example"


def test_a_source_whose_weight_rounds_to_no_example_is_a_warning(tmp_path, tiny_model_dir):
    """0.01 of 0.01 + 1 over 13 examples rounds to 0: the source was read and silently never trained on."""
    from conftest import train_config

    from sftlab.train.run import train

    a, b = chat_data(tmp_path / "a.jsonl", 3), chat_data(tmp_path / "b.jsonl", 10, offset=50)
    mix = load_mixture([{"path": a, "weight": 0.01}, {"path": b, "weight": 1}])
    assert mix.counts == [0, 13]
    [f] = mix.unused_findings()
    assert (f.rule, f.severity, f.where) == ("mixture", "warning", "data")
    assert f.message == f"source 'a' ({a}): weight 0.01 is 0.99% of the weights, under one of an epoch's 13 examples: " \
                        "it is never trained on"
    assert load_mixture([{"path": a, "weight": 0.1}, {"path": b, "weight": 1}]).unused_findings() == []
    assert load_mixture([a, b]).unused_findings() == [] and load_mixture([{"path": a, "count": 1}]).unused_findings() == []
    cfg = train_config(tmp_path, tiny_model_dir, data=[{"path": a, "weight": 0.01}, {"path": b, "weight": 1}])
    found = train(cfg, check_only=True)["findings"]
    assert [x["message"] for x in found if x["rule"] == "mixture"] == [f.message]


def test_a_runs_saved_mixture_names_its_files_from_anywhere(tmp_path, tiny_model_dir, monkeypatch, capsys):
    # sources given relative to the working folder were saved as given, while a plain `data:` path was made
    # absolute: `sftlab prepare RUN/config.yaml` (diagnose's own suggestion) failed from any other folder
    from conftest import train_config

    from sftlab import rundir as A
    from sftlab.train.run import train

    chat_data(tmp_path / "a.jsonl", 8), chat_data(tmp_path / "b.jsonl", 4, offset=300)
    monkeypatch.chdir(tmp_path)
    train(train_config(tmp_path, tiny_model_dir, data=[{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl", "weight": 1}],
                       eval_data=["a.jsonl", "b.jsonl"], max_steps=1,
                       template="chatml"), quiet=True)
    saved = yaml.safe_load((tmp_path / "run" / A.CONFIG).read_text())
    assert [s["path"] for s in saved["data"]] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert [s["path"] for s in saved["eval_data"]] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["prepare", str(tmp_path / "run" / A.CONFIG)]) == 0
    assert "examples kept" in capsys.readouterr().out
