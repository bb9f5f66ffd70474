"""Small units of the hardening: bounded template renders, atomic writes on a full disk, recommend's
assumptions, the forgetting line in both directions."""

from __future__ import annotations

import errno

import pytest

from sftlab.core import io
from sftlab.core.errors import SftlabError
from sftlab.data import templates
from sftlab.data.templates import ChatTemplate
from sftlab.data.types import Message
from sftlab.eval.compare import forgetting, format_forgetting
from sftlab.plan import load_use_case, recommend, render_recommendation

MSGS = [Message("user", "hi"), Message("assistant", "hello")]


@pytest.mark.parametrize("src,phrase", [
    ("{{ range(10**9)|list|length }}", "over the limit"),
    ("{{ 'a' * 100000000 }}", "repeated string"),
    ("{{ [1] * 100000000 }}", "repeated string or list"),
    ("{{ 'a'|center(1000000000) }}", "filter argument"),
    ("{{ '%1000000000d' % 1 }}", "format width"),
    ("{{ 10 ** 100000000 }}", "too large"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{% for i in range(100000) %}{% for j in range(1000) %}{{ 'x' * 1000 }}{% endfor %}{% endfor %}",
     "rendered more than"),
])
def test_resource_exhaustion_in_a_template_is_one_line_naming_it(src, phrase):
    with pytest.raises(SftlabError) as e:
        ChatTemplate("evil.jinja", src).render(MSGS)
    assert "chat template 'evil.jinja'" in str(e.value) and phrase in str(e.value) and "\n" not in str(e.value)


def test_a_render_past_its_time_limit_stops(monkeypatch):
    monkeypatch.setattr(templates, "MAX_RENDER_SECONDS", 0.3)
    with pytest.raises(SftlabError, match="took longer than 0.3 s"):
        ChatTemplate("slow.jinja", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}").render(MSGS)


def test_ordinary_templates_still_render_with_ranges_and_filters():
    t = ChatTemplate("ok", "{{ range(3)|list|length }}{{ range(4)[1] }}{% for i in range(3)|reverse %}{{ i }}{% endfor %}"
                           "{{ messages|length }}{{ 'ab' * 2 }}{{ '%03d' % 7 }}{{ messages[0].content|upper }}")
    assert t.render(MSGS) == "3" + "1" + "210" + "2" + "abab" + "007" + "HI"
    chatml = templates.resolve_template("chatml", None)
    assert "<|im_start|>user\nhi<|im_end|>" in chatml.render(MSGS)


def test_atomic_write_on_a_full_disk_keeps_the_last_good_file(tmp_path, monkeypatch):
    target = tmp_path / "out.jsonl"
    io.write_jsonl(target, [{"a": 1}])
    good = target.read_text()

    def rows():
        yield {"a": 2}
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SftlabError) as e:
        io.write_jsonl(target, rows())
    assert str(e.value) == (f"cannot write {target}: the disk is full; the previous version is kept "
                            "(free some space and run again)")
    assert target.read_text() == good
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left


def test_atomic_dir_failure_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "model"
    with io.atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"good")
    with pytest.raises(SftlabError, match="the disk is full; the previous version is kept"):
        with io.atomic_dir(target) as tmp:
            (tmp / "w.bin").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (target / "w.bin").read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_never_deletes_what_sftlab_did_not_write(tmp_path, monkeypatch):
    """`prepare --out proj` where proj holds the data, `--out data.jsonl`, `--out .`: refused, nothing lost;
    an earlier output of sftlab's (even of another kind: adapter then merged) is replaced."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "data.jsonl").write_text("{}\n")
    (proj / "notes.txt").write_text("mine")
    with pytest.raises(SftlabError, match=r"proj already holds data.jsonl, notes.txt, which this output would "
                                          r"delete; nothing was written \(choose a new output folder"):
        with io.atomic_dir(proj) as tmp:
            (tmp / "report.json").write_text("{}")
    assert sorted(p.name for p in proj.iterdir()) == ["data.jsonl", "notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["proj"]  # no temp folder left
    ran = []
    with pytest.raises(SftlabError, match="data.jsonl is a file: the output is a folder"):
        with io.atomic_dir(proj / "data.jsonl"):
            ran.append(1)  # refused before any work
    assert ran == [] and (proj / "data.jsonl").read_text() == "{}\n"
    monkeypatch.chdir(proj)
    with pytest.raises(SftlabError, match="proj already holds data.jsonl, notes.txt"):
        with io.atomic_dir(".") as tmp:
            (tmp / "report.json").write_text("{}")
    assert sorted(p.name for p in proj.iterdir()) == ["data.jsonl", "notes.txt"]

    out = tmp_path / "export"
    with io.atomic_dir(out) as tmp:
        (tmp / "adapter_model.safetensors").write_text("a")
    with io.atomic_dir(out) as tmp:  # what the first output wrote may go
        (tmp / "model.safetensors").write_text("m")
    assert sorted(p.name for p in out.iterdir()) == [io.OUTPUT_MARK, "model.safetensors"]
    (out / "README.md").write_text("the user's own")
    with pytest.raises(SftlabError, match="already holds README.md"):
        with io.atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_text("m2")
    assert (out / "model.safetensors").read_text() == "m"
    empty = tmp_path / "empty"
    empty.mkdir()
    with io.atomic_dir(empty) as tmp:
        (tmp / "x").write_text("x")
    assert (empty / "x").read_text() == "x"


def test_atomic_write_where_a_file_blocks_the_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SftlabError, match="cannot write .*f/out.txt"):
        io.atomic_write_text(tmp_path / "f" / "out.txt", "y")


def test_recommend_asks_for_examples_and_states_every_assumption():
    with pytest.raises(SftlabError, match="--examples N"):
        load_use_case(None, {})
    rec = recommend(load_use_case(None, {"examples": 300}))
    assert rec.assumed == ["complexity moderate", "strict-format no", "domain-specific no", "latency medium",
                           "compute medium", "knowledge-updates never"]
    assert "assumed, as not given: complexity moderate" in render_recommendation(rec)
    full = recommend(load_use_case(None, {"examples": 300, "complexity": "simple", "strict_format": False,
                                          "domain_specific": False, "latency": "low", "compute": "low",
                                          "knowledge_updates": "never"}))
    assert full.assumed == [] and "assumed" not in render_recommendation(full)


@pytest.mark.parametrize("before,after,words", [
    (2.0, 1.608, "improved: no forgetting"),
    (2.0, 2.1, "a rise within the 10% threshold"),
    (2.0, 2.5, "FORGETTING: a rise above the 10% threshold"),
    (2.0, 2.0, "unchanged: no forgetting"),
])
def test_forgetting_line_reads_right_in_both_directions(before, after, words):
    line = format_forgetting(forgetting(before, after))
    assert line.endswith(words), line
    if after < before:
        assert "within" not in line and "-19.6%" in line


def test_atomic_dir_publishes_what_libraries_write_private(tmp_path):
    """safetensors writes its files 0600 and mkdtemp makes 0700 folders: the output gets the umask's modes."""
    import os

    import torch
    from safetensors.torch import save_file

    umask = os.umask(0)
    os.umask(umask)
    with io.atomic_dir(tmp_path / "out") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "x.json").write_text("{}")
        os.chmod(tmp / "sub" / "x.json", 0o600)
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(tmp / "run.sh", 0o700)
    out = tmp_path / "out"
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(out) == mode(out / "sub") == 0o777 & ~umask
    assert mode(out / "model.safetensors") == mode(out / "sub" / "x.json") == 0o666 & ~umask
    assert mode(out / "run.sh") == 0o777 & ~umask  # an execute bit stays
