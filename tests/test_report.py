"""`sftlab report`: one self-contained HTML page whose plots really render in a browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import HEALTHY_SUMMARY, healthy_rows, make_run

from sftlab.cli import main
from sftlab.data.masking import length_histogram
from sftlab.eval.compare import compare
from sftlab.report import write_report

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)


def _eval_result():
    before = {"metrics": {"loss": 2.5, "task_score": 0.1, "format_adherence": 0.2, "general_loss": 2.0},
              "scorer": "json_fields", "format_check": "json_object",
              "samples": [{"prompt": "Extract: <Maria>, 34", "reference": '{"name": "Maria"}', "reply": "Maria is 34"}]}
    after = {"metrics": {"loss": 0.8, "task_score": 0.9, "format_adherence": 1.0, "general_loss": 2.1},
             "scorer": "json_fields", "format_check": "json_object",
             "samples": [{"prompt": "Extract: <Maria>, 34", "reference": '{"name": "Maria"}', "reply": '{"name": "Maria"}'}]}
    return {"kind": "compare", "target": "run", "data": "eval.jsonl", "base": "tiny", **compare(before, after)}


def _run(tmp_path: Path, **kw) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(5)) + json.dumps({"messages": [{"role": "user", "content": "q0"},
                                                                          {"role": "assistant", "content": "a0"}]}) + "\n")
    prepare = {**HEALTHY_SUMMARY["prepare"], "length_histogram": length_histogram([40, 90, 95, 300, 510, 512])}
    summary = {**HEALTHY_SUMMARY, "eval": _eval_result(), "prepare": prepare, **kw.pop("summary_extra", {})}
    return make_run(tmp_path / "run", summary=summary, data=str(data), **kw)


PLOTS = ["Loss", "Learning rate", "Gradient norm", "Throughput (tokens/s)", "Memory (MB)", "Generation metrics",
         "Example lengths (tokens)", "Before and after"]


def _png_size(b64: str) -> tuple[int, int]:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", raw[16:24])


def test_report_is_self_contained_with_every_section(tmp_path, capsys):
    run = _run(tmp_path)
    assert main(["report", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == str(run / "report.html")
    assert info["plots"] == PLOTS
    page = (run / "report.html").read_text()
    # self-contained: no external resources of any kind
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<link" not in page and "@import" not in page
    images = re.findall(r'<img class="plot" alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [t for t, _ in images] == info["plots"]
    for _, b64 in images:
        w, h = _png_size(b64)
        assert w > 100 and h > 100
    for section in ("Summary", "Training curves", "Data", "Data doctor", "Before and after", "Sample generations",
                    "Diagnosis"):
        assert f">{section}<" in page
    assert "json_fields" in page and "task score" in page and "better" in page
    assert "&lt;Maria&gt;" in page and "<Maria>" not in page  # text is escaped
    assert "duplicate" in page.lower()  # the doctor's summary of train.jsonl (one exact duplicate)
    assert "No problems found" in page


def test_the_reports_doctor_checks_the_data_as_the_run_trained_it(tmp_path, tiny_model_dir):
    """The report ran the doctor with its defaults (no template, no limit), not the run's settings: with the
    run's saved tokenizer it checks the data as `sftlab doctor RUN.yaml` does, the run's limit included."""
    run = _run(tmp_path, tokenizer_from=tiny_model_dir, max_seq_length=8)
    page = Path(write_report(run, doctor=True)["path"]).read_text()
    assert "as the run trains it: model tiny" in page and "template chatml" in page
    assert "no example is left" in page or "nothing_left" in page  # every chat is longer than the run's 8 tokens


def test_length_histogram_bins_every_length():
    h = length_histogram([0, 1, 31, 32, 100], bins=4)
    assert h == {"bin_width": 26, "counts": [2, 2, 0, 1]}  # 0..100 in bins of 26: [0,26) [26,52) [52,78) [78,104)
    assert sum(length_histogram(list(range(1, 2049)))["counts"]) == 2048
    assert length_histogram([]) == {}


def test_plots_left_out_without_their_data(tmp_path, capsys):
    ev = {**_eval_result(), "table": [{"metric": "loss", "label": "loss", "before": None, "after": 0.8}]}
    run = make_run(tmp_path / "run", summary={**HEALTHY_SUMMARY, "eval": ev})  # no length histogram either
    assert main(["report", str(run), "--json", "--no-doctor"]) == 0
    plots = json.loads(capsys.readouterr().out)["plots"]
    assert "Example lengths (tokens)" not in plots and "Before and after" not in plots and "Loss" in plots


def test_report_plots_the_learning_rate_sweep_of_find_lr(tmp_path, capsys):
    lrs = [1e-5 * 1.5 ** i for i in range(12)]
    losses = [2.0 - 0.1 * i for i in range(10)] + [3.0, float("nan")]  # the last step blew up: left out
    sweep = {"lrs": lrs, "losses": losses, "smoothed": losses, "choice": lrs[8] / 3, "reason": "r",
             "stopped": "diverged", "table_lr": 1e-4}
    run = _run(tmp_path, summary_extra={"lr_sweep": sweep})
    assert main(["report", str(run), "--json", "--no-doctor"]) == 0
    plots = json.loads(capsys.readouterr().out)["plots"]
    assert plots == PLOTS + ["Learning-rate sweep (--find-lr)"]
    page = (run / "report.html").read_text()
    b64 = re.search(r'alt="Learning-rate sweep \(--find-lr\)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert b64 and _png_size(b64.group(1))[0] > 100


def test_report_shows_the_diagnosis_and_custom_out(tmp_path, capsys):
    train, evals = healthy_rows()
    train[3]["loss"] = float("nan")  # non-finite points are left out of the plots, and diagnosed
    out = tmp_path / "elsewhere" / "r.html"
    run = _run(tmp_path, train=train, evals=evals)
    assert main(["report", str(run), "--out", str(out), "--no-doctor"]) == 0
    assert "1 findings" in capsys.readouterr().out
    page = out.read_text()
    assert "[error] divergence" in page and "train loss is nan at step 40" in page
    assert 'class="finding error"' in page


def test_report_of_interrupted_run_without_summary(tmp_path, capsys):
    run = make_run(tmp_path / "run", summary=False)
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "the run did not finish" in page and "No before/after evaluation" in page


def test_report_bad_run_folder(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text("{oops\n")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl:1: damaged metrics line" in err[0]
    assert not (run / "report.html").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium) for the browser check")
def test_plots_render_in_headless_chromium(tmp_path):
    run = _run(tmp_path)
    assert main(["report", str(run), "--no-doctor"]) == 0
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
           "--enable-logging=stderr", "--v=0",  # the page's console messages go to stderr as CONSOLE lines
           (run / "report.html").as_uri()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    # The page's own script counts images with naturalWidth > 0 after load and writes the result.
    m = re.search(r'id="plot-check"[^>]*data-ok="(\w+)"[^>]*>plots rendered: (\d+)/(\d+)<', dom)
    assert m, dom[-2000:]
    assert m.group(1) == "true" and m.group(2) == m.group(3) == str(len(PLOTS))
    titles = re.findall(r'<img class="plot" alt="([^"]+)"', dom)
    assert titles == PLOTS
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console  # no error (nor any other message) from the page's script


def test_forgetting_line_reads_right_both_ways(tmp_path):
    """A rise within the threshold says so; an improvement is not called 'within the threshold'."""
    (tmp_path / "rise").mkdir()
    (tmp_path / "better").mkdir()
    html = write_report(str(_run(tmp_path / "rise")))["path"]
    text = Path(html).read_text()
    assert "a rise within the 10% threshold" in text and "+5.0%" in text
    improved = _eval_result()
    improved["forgetting"] = {**improved["forgetting"], "after": 1.8, "relative": -0.1, "flagged": False}
    text = Path(write_report(str(_run(tmp_path / "better", summary_extra={"eval": improved})))["path"]).read_text()
    assert "improved: no forgetting" in text and "within" not in text.split("improved: no forgetting")[0][-200:]


def test_report_shows_max_steps_when_it_ends_the_run(tmp_path):
    _, evals = healthy_rows()
    evals[-1]["gen_format_adherence"] = 0.4
    run = make_run(tmp_path / "run", evals=evals, summary={**HEALTHY_SUMMARY, "steps": 6, "epochs": 0.6},
                   epochs=3, max_steps=6)
    page = Path(write_report(run, doctor=False)["path"]).read_text()
    assert "config: max_steps" in page and "max_steps: 6 -&gt; 12" in page and "epochs: 3 -&gt; 4" not in page


def test_report_of_a_single_eval_names_its_data_scorer_and_sources(tmp_path, capsys):
    # `sftlab eval RUN --data A --data B --save` (no --compare): the section was headed "Before and after"
    # with no base model, and left out the eval data, the scorer and the per-source results
    single = {"kind": "single", "target": "run", "data": "ea, eb", "result": {
        "metrics": {"loss": 0.5, "task_score": 0.75}, "task_score_by": "json_fields+exact", "format_check": "json_object+finished",
        "sources": {"ea": {"n_examples": 4, "loss": 0.25, "task_score": 0.875, "scorer": "json_fields", "format_adherence": 1.0},
                    "eb": {"n_examples": 3, "loss": 0.75, "task_score": 0.625, "scorer": "exact", "format_adherence": 0.5}},
        "samples": []}}
    run = _run(tmp_path, summary_extra={"eval": single})
    assert main(["report", str(run), "--no-doctor"]) == 0
    page = (run / "report.html").read_text()
    assert "<h2>Evaluation</h2>" in page and "<h2>Before and after</h2>" not in page
    assert "Eval data: ea, eb; scorer: json_fields+exact; format check: json_object+finished" in page
    assert "<td>ea</td><td class=\"num\">4</td><td class=\"num\">0.25</td><td class=\"num\">0.875</td><td>json_fields</td>" in page


def test_report_of_a_saved_compare_shows_before_and_after_per_source(tmp_path, capsys):
    """`sftlab eval RUN --data A --data B --compare base --save`: eval printed each source before and after,
    the report showed only the totals."""
    from sftlab.eval.run import format_sources

    src = lambda loss, score, fmt: {"n_examples": 3, "loss": loss, "task_score": score,  # noqa: E731
                                    "format_adherence": fmt, "scorer": "json_fields", "n_generated": 3}
    before = {"metrics": {"loss": 2.5, "task_score": 0.1}, "sources": {"ea": src(2.25, 0.125, 0.5), "eb": src(2.75, 0.5, 1.0)}}
    after = {"metrics": {"loss": 0.8, "task_score": 0.9}, "sources": {"ea": src(0.5, 0.875, 1.0), "eb": src(1.0, 0.25, 0.75)}}
    ev = {"kind": "compare", "target": "run", "data": "ea, eb", "base": "tiny", **compare(before, after)}
    run = _run(tmp_path, summary_extra={"eval": ev})
    assert main(["report", str(run), "--no-doctor"]) == 0
    page = (run / "report.html").read_text()
    assert "<h3>Per source</h3>" in page and "<th>task score (base)</th><th>task score (fine-tuned)</th>" in page
    assert ('<td>ea</td><td class="num">3</td><td>json_fields</td><td class="num">2.25</td><td class="better">0.5</td>'
            '<td class="num">0.125</td><td class="better">0.875</td>') in page
    assert '<td>eb</td>' in page and '<td class="num">0.5</td><td class="worse">0.25</td>' in page
    assert "tool call match" not in page  # no source expected a call
    text = format_sources(ev)  # and `sftlab eval` prints the same before/after for each source
    assert "ea: 3 examples, loss 0.5000 (before 2.2500), task_score (json_fields) 0.875 (before 0.125)" in text
    assert "format_adherence 0.750 (before 1.000)" in text
    tools = {"valid_tool_call_rate": 0.5, "tool_call_match_rate": 0.25, "n_tool_calls_expected": 4}
    ev["before"]["sources"]["eb"].update(tools)
    ev["after"]["sources"]["eb"].update(tools, valid_tool_call_rate=1.0, tool_call_match_rate=0.75)
    assert ("valid_tool_call 1.000 (before 0.500), tool_call_match 0.750 (before 0.250) (4 call turns)"
            in format_sources(ev))
    (tmp_path / "tools").mkdir()
    run = _run(tmp_path / "tools", summary_extra={"eval": ev})
    write_report(run, doctor=False)
    page = (run / "report.html").read_text()
    assert ('<th>tool call match (base)</th><th>tool call match (fine-tuned)</th></tr><tr><td>ea</td>' in page
            and '<td class="num">0.25</td><td class="better">0.75</td></tr>' in page)
    (tmp_path / "one").mkdir()
    single = _run(tmp_path / "one", summary_extra={"eval": _eval_result()})  # one source: no per-source table
    write_report(single, doctor=False)
    assert "Per source" not in (single / "report.html").read_text()
