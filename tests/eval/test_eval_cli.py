"""`sftlab eval` end to end on a tiny LoRA run folder: single, before/after, --save, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_lora_run

from sftlab.cli import main

EVAL_ROWS = [
    {"messages": [{"role": "user", "content": "Extract as JSON: Maria Lopez, 34, Berlin"},
                  {"role": "assistant", "content": '{"name": "Maria Lopez", "age": 34, "city": "Berlin"}'}]},
    {"messages": [{"role": "user", "content": "Extract as JSON: 3 lamps on 2024-05-03"},
                  {"role": "assistant", "content": '{"item": "lamp", "quantity": 3, "date": "2024-05-03"}'}]},
    {"messages": [{"role": "system", "content": "Reply with JSON only."}, {"role": "user", "content": "Extract: Paris"},
                  {"role": "assistant", "content": '{"city": "Paris"}'}]},
]
GENERAL_ROWS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello world"}]},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    return make_lora_run(tmp_path_factory.mktemp("evalrun") / "run", tiny_model_dir)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("evaldata")
    return write_jsonl(d / "eval.jsonl", EVAL_ROWS), write_jsonl(d / "general.jsonl", GENERAL_ROWS)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what set-up printed
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str, text: str) -> bool:
    """stderr is exactly one 'sftlab eval: error: ...' line naming ``text``, no traceback."""
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("sftlab eval: error:") and text in lines[0]


def test_eval_run_json(lora_run, data_files, capsys):
    code, out, err = run_cli(capsys, "eval", lora_run, "--data", data_files[0], "--max-new-tokens", 6, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["kind"] == "single"
    r = res["result"]
    assert r["scorer"] == "json_fields" and r["format_check"] == "json_object" and r["template"] == "chatml"
    mt = r["metrics"]
    assert mt["tokens"] > 0 and mt["loss"] > 0 and mt["perplexity"] > 1
    for key in ("nonempty_rate", "repetition_rate", "task_score", "format_adherence", "mean_reply_tokens"):
        assert 0 <= mt[key] <= (6 if key == "mean_reply_tokens" else 1)
    assert r["n_examples"] == 3 and len(r["samples"]) == 3
    assert r["samples"][0]["prompt"] == "Extract as JSON: Maria Lopez, 34, Berlin"
    assert r["settings"]["max_new_tokens"] == 6 and r["settings"]["do_sample"] is False


def test_eval_is_deterministic(lora_run, data_files, capsys):
    outs = []
    for _ in range(2):
        code, out, err = run_cli(capsys, "eval", lora_run, "--data", data_files[0], "--max-new-tokens", 5, "--json")
        assert code == 0, err
        outs.append(json.loads(out)["result"])
    assert outs[0]["samples"] == outs[1]["samples"] and outs[0]["metrics"] == outs[1]["metrics"]


def test_compare_base_with_forgetting_and_save(lora_run, data_files, tmp_path, capsys):
    out_file = tmp_path / "res.json"
    code, out, err = run_cli(capsys, "eval", lora_run, "--data", data_files[0], "--compare", "base",
                             "--general", data_files[1], "--max-new-tokens", 4, "--save", "--out", out_file)
    assert code == 0, err
    assert "base" in out and "fine-tuned" in out and "general loss" in out and "forgetting:" in out
    res = json.loads(out_file.read_text())
    assert res["kind"] == "compare"
    rows = {r["metric"]: r for r in res["table"]}
    assert rows["loss"]["delta"] == pytest.approx(rows["loss"]["after"] - rows["loss"]["before"])
    assert rows["loss"]["before"] != rows["loss"]["after"]  # the adapter changes the model
    assert res["forgetting"]["before"] == rows["general_loss"]["before"]
    assert res["before"]["scorer"] == res["after"]["scorer"] == "json_fields"
    assert len(res["samples"]) == 3 and {"before", "after", "reference"} <= set(res["samples"][0])
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["eval"]["kind"] == "compare" and summary["method"] == "lora"


def test_eval_plain_model_with_template(tiny_model_dir, data_files, capsys):
    code, out, err = run_cli(capsys, "eval", tiny_model_dir, "--data", data_files[0], "--template", "chatml",
                             "--max-new-tokens", 3, "--scorer", "contains", "--limit", 2, "--json")
    assert code == 0, err
    res = json.loads(out)["result"]
    assert res["scorer"] == "contains" and res["n_examples"] == 2 and res["template"] == "chatml"
    assert res["metrics"]["n_generated"] == 2


def test_bad_inputs(lora_run, data_files, tiny_model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", tmp_path / "nope", "--data", data_files[0])
    assert code == 2 and one_error_line(err, "not found"), err

    bad_fmt = tmp_path / "eval.txt"
    bad_fmt.write_text("just text\n")
    code, _, err = run_cli(capsys, "eval", lora_run, "--data", bad_fmt)
    assert code == 2 and one_error_line(err, "unsupported file type"), err

    wrong_fields = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "q", "answer": "a"}])
    code, _, err = run_cli(capsys, "eval", lora_run, "--data", wrong_fields)
    assert code == 2 and one_error_line(err, "cannot tell the data format"), err

    code, _, err = run_cli(capsys, "eval", lora_run, "--data", data_files[0], "--scorer", "bleu")
    assert code == 2 and one_error_line(err, "unknown scorer"), err

    code, _, err = run_cli(capsys, "eval", lora_run, "--data", data_files[0], "--temperature", "0")
    assert code == 2 and one_error_line(err, "temperature"), err

    code, _, err = run_cli(capsys, "eval", lora_run, "--data", data_files[0], "--limit", "0")
    assert code == 2 and one_error_line(err, "--limit"), err


def test_model_that_does_not_load(tiny_model_dir, data_files, tmp_path, capsys):
    import shutil

    run = make_lora_run(tmp_path / "broken", tiny_model_dir)
    (run / "model" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run_cli(capsys, "eval", run, "--data", data_files[0])
    assert code == 2 and one_error_line(err, "does not load"), err

    broken_model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken_model)
    (broken_model / "config.json").write_text("{ damaged")
    code, _, err = run_cli(capsys, "eval", broken_model, "--data", data_files[0])
    assert code == 2 and one_error_line(err, "config.json"), err

    (run / "summary.json").unlink()
    code, _, err = run_cli(capsys, "eval", run, "--data", data_files[0], "--save")
    assert code == 2 and one_error_line(err, "summary.json"), err


@pytest.mark.parametrize("reasoning", ["drop", "last"])
def test_eval_labels_and_prompts_as_the_runs_reasoning_setting(tiny_model_dir, tmp_path, reasoning):
    """A run trained with reasoning: drop (or last) had its eval loss scored by `sftlab eval` with the
    reasoning tokens it never trained on, and its prompts showed earlier turns' reasoning."""
    from sftlab.data.formats import load_conversations
    from sftlab.data.prepare import labeler_for
    from sftlab.eval.loss import evaluate_loss
    from sftlab.eval.run import load_target, run_eval

    run = make_lora_run(tmp_path / "run", tiny_model_dir, reasoning=reasoning)
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}.", "reasoning_content": f"{i} and {i} make {2 * i}"},
                          {"role": "user", "content": "and twice that?"},
                          {"role": "assistant", "content": f"{4 * i}.", "reasoning_content": "double it"}]} for i in range(3)]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    res = run_eval(str(run), str(data), settings=None, device="cpu", samples=1)["result"]
    model, tok, tpl, cfg = load_target(str(run), device="cpu")
    examples, _ = labeler_for(cfg, tok, tpl).encode(load_conversations(str(data), None, split="eval"))
    assert res["metrics"]["loss"] == pytest.approx(evaluate_loss(model, tok, examples, 8)["loss"], rel=1e-6)
    assert "make" not in res["samples"][0]["prompt_text"]  # the first turn's reasoning is not in the prompt


def test_eval_of_an_exported_adapter_scores_as_its_run(lora_run, data_files, tmp_path, capsys):
    """`sftlab chat` took an adapter export; `sftlab eval` refused it: "a folder without config.json,
    so not a HF model folder" (about a folder that holds an adapter and names its base)."""
    from sftlab.export import export_run

    out = export_run(lora_run, tmp_path / "adapter", verify=False).out
    results = []
    for target in (lora_run, out):
        code, text, err = run_cli(capsys, "eval", target, "--data", data_files[0], "--max-new-tokens", 4, "--json")
        assert code == 0, err
        results.append(json.loads(text)["result"])
    assert results[1]["metrics"]["loss"] == pytest.approx(results[0]["metrics"]["loss"], rel=1e-5)
    assert [s["reply"] for s in results[1]["samples"]] == [s["reply"] for s in results[0]["samples"]]


def test_compare_base_of_an_exported_adapter_is_its_runs_comparison(lora_run, data_files, tmp_path, capsys):
    """`eval EXPORT --compare base` failed: "--compare base needs a run folder". The adapter's base is
    the one its adapter_config.json names: the same before/after as the run's own comparison."""
    from sftlab.export import export_run

    out = export_run(lora_run, tmp_path / "adapter", verify=False).out
    results = []
    for target in (lora_run, out):
        code, text, err = run_cli(capsys, "eval", target, "--data", data_files[0], "--compare", "base",
                                  "--max-new-tokens", 4, "--json")
        assert code == 0, err
        results.append(json.loads(text))
    run_res, exp_res = results
    assert exp_res["kind"] == "compare" and Path(exp_res["base"]).resolve() == Path(run_res["base"]).resolve()
    for side in ("before", "after"):
        assert exp_res[side]["metrics"]["loss"] == pytest.approx(run_res[side]["metrics"]["loss"], rel=1e-5)
    assert exp_res["before"]["metrics"]["loss"] != exp_res["after"]["metrics"]["loss"]
    assert [s["before"] for s in exp_res["samples"]] == [s["before"] for s in run_res["samples"]]


def test_compare_base_of_a_merged_export_is_its_runs_comparison(lora_run, data_files, tmp_path, capsys):
    """A merged export names no base in adapter_config.json: `--compare base` refused it; its
    sftlab_export.json names the base it was fine-tuned from (a full path, not the run's relative one)."""
    from sftlab.export import export_run

    out = export_run(lora_run, tmp_path / "merged", merge=True, verify=False).out
    code, text, err = run_cli(capsys, "eval", out, "--data", data_files[0], "--compare", "base", "--max-new-tokens", 2,
                              "--json")
    assert code == 0, err
    merged = json.loads(text)
    code, text, err = run_cli(capsys, "eval", lora_run, "--data", data_files[0], "--compare", "base",
                              "--max-new-tokens", 2, "--json")
    run_res = json.loads(text)
    assert Path(merged["base"]).is_absolute() and Path(merged["base"]).resolve() == Path(run_res["base"]).resolve()
    assert merged["before"]["metrics"]["loss"] == pytest.approx(run_res["before"]["metrics"]["loss"], rel=1e-6)
    assert merged["after"]["metrics"]["loss"] == pytest.approx(run_res["after"]["metrics"]["loss"], rel=1e-4)
    (out / "sftlab_export.json").unlink()  # a plain model folder: no base to compare with, said in one line
    code, _, err = run_cli(capsys, "eval", out, "--data", data_files[0], "--compare", "base")
    assert code != 0 and one_error_line(err, "--compare base needs a run folder or an export")


def test_save_of_an_export_or_a_model_says_it_is_not_a_run(tiny_model_dir, data_files, capsys):
    """--save of an export said "no summary.json in this run folder (the run did not finish)"."""
    code, _, err = run_cli(capsys, "eval", tiny_model_dir, "--data", data_files[0], "--save")
    assert code == 2 and one_error_line(err, "is not a run folder (no config.yaml)") and "--out FILE.json" in err
    assert "did not finish" not in err


def test_eval_of_an_export_labels_as_its_run(tiny_model_dir, tmp_path, capsys):
    """An export kept nothing of how its run labelled: `sftlab eval EXPORT` scored the loss with the default
    masking, reasoning and max_seq_length (another number than `sftlab eval RUN`), and chat/generate showed
    earlier turns' reasoning the run (reasoning: last) never trained on."""
    from sftlab.chat import run_reasoning
    from sftlab.export import export_run

    run = make_lora_run(tmp_path / "run", tiny_model_dir, reasoning="last", masking="last_assistant", max_seq_length=96)
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}.", "reasoning_content": f"{i} and {i} make {2 * i}"},
                          {"role": "user", "content": "and twice that?"},
                          {"role": "assistant", "content": f"{4 * i}.", "reasoning_content": "double it " * (i * 20)}]}
            for i in range(3)]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    results = []
    for target in (run, export_run(run, tmp_path / "adapter", verify=False).out,
                   export_run(run, tmp_path / "merged", merge=True, verify=False).out):
        code, text, err = run_cli(capsys, "eval", target, "--data", data, "--max-new-tokens", 2, "--json")
        assert code == 0, err
        results.append(json.loads(text)["result"])
        assert run_reasoning(str(target)) == "last"
    for res in results[1:]:
        assert res["prepare"] == results[0]["prepare"] and res["prepare"]["n_dropped_too_long"] == 2  # max_seq_length 96
        assert res["metrics"]["loss"] == pytest.approx(results[0]["metrics"]["loss"], rel=1e-4)
        assert res["samples"][0]["prompt_text"] == results[0]["samples"][0]["prompt_text"]
