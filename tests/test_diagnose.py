"""`sftlab diagnose`: every rule on a run folder that shows the symptom and on one that does not."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import HEALTHY_SUMMARY, healthy_rows, make_run

from sftlab.cli import main
from sftlab.diagnose import RULES, diagnose
from sftlab.rundir import RunDir, Summary


def rules_found(run: Path) -> dict:
    return {f.rule: f for f in diagnose(run).findings}


def test_healthy_run_has_no_findings(tmp_path, tiny_model_dir):
    summary = {**HEALTHY_SUMMARY, "eval": {"kind": "compare", "before": {"metrics": {"loss": 1.9}},
                                           "after": {"metrics": {"loss": 1.6}}}}
    run = make_run(tmp_path / "run", tokenizer_from=tiny_model_dir, summary=summary)
    d = diagnose(run)
    assert d.findings == []
    assert d.checked == {name: "ok" for name in RULES}
    assert d.exit_code == 0
    assert "no problems found" in d.format_text()


# --- overfitting ---------------------------------------------------------------------------------

def _overfit_rows():
    train, _ = healthy_rows(200)
    for r in train:  # train loss keeps falling to 0.4
        r["loss"] = 3.0 - 2.6 * r["step"] / 200
    evals = [{"split": "eval", "step": s, "eval_loss": v} for s, v in
             [(40, 2.0), (80, 1.5), (120, 1.4), (160, 1.6), (200, 1.9)]]
    return train, evals


def test_overfitting_found(tmp_path):
    train, evals = _overfit_rows()
    summary = {**HEALTHY_SUMMARY, "steps": 200}
    f = rules_found(make_run(tmp_path / "run", train=train, evals=evals, summary=summary, epochs=3))["overfitting"]
    text = " ".join(f.evidence)
    assert "1.400 at step 120 (best)" in text and "1.900 at step 200" in text
    assert f.data["gap"] == pytest.approx(1.9 - (0.4 + 0.53 + 0.66) / 3, abs=1e-6)
    assert "epochs: 3 -> 2 (eval loss was lowest at step 120 of 200)" in f.fixes
    assert any(x.startswith("lora_dropout: 0 -> 0.1") for x in f.fixes)
    assert any(x.startswith("weight_decay:") for x in f.fixes)


def test_overfitting_advice_from_what_ended_the_run(tmp_path):
    train, evals = _overfit_rows()
    # max_steps ended it in its first epoch: the step count is the knob, not epochs
    summary = {**HEALTHY_SUMMARY, "steps": 200, "epochs": 0.6}
    f = rules_found(make_run(tmp_path / "ms", train=train, evals=evals, summary=summary, epochs=3, max_steps=200))["overfitting"]
    assert "max_steps: 200 -> 120 (eval loss was lowest at step 120 of 200)" in f.fixes
    assert not any(x.startswith("epochs:") for x in f.fixes)
    # early stopping ended it after 1.5 epochs: the best step was 0.9 epochs in, not 3 * 120 / 200
    summary = {**HEALTHY_SUMMARY, "steps": 200, "epochs": 1.5, "stopped": "early_stopping"}
    f = rules_found(make_run(tmp_path / "es", train=train, evals=evals, summary=summary, epochs=3))["overfitting"]
    assert "epochs: 3 -> 1 (eval loss was lowest at step 120 of 200)" in f.fixes


def test_overfitting_not_found_when_train_loss_rises_too(tmp_path):
    train, evals = _overfit_rows()
    for r in train:
        r["loss"] = 1.0 + r["step"] / 200  # both rise: not overfitting
    assert "overfitting" not in rules_found(make_run(tmp_path / "run", train=train, evals=evals))


def test_overfitting_not_found_with_small_gap(tmp_path):
    train, evals = _overfit_rows()
    for r in train:
        r["loss"] = 2.0 - 0.5 * r["step"] / 200  # ends at 1.5; eval 1.9 -> gap 0.25, not above
    for e in evals:
        e["eval_loss"] -= 0.2
    assert "overfitting" not in rules_found(make_run(tmp_path / "run", train=train, evals=evals))


def test_overfitting_skipped_with_too_few_evals(tmp_path):
    _, evals = _overfit_rows()
    d = diagnose(make_run(tmp_path / "run", evals=evals[:2]))
    assert d.checked["overfitting"].startswith("skipped")


# --- forgetting ----------------------------------------------------------------------------------

def test_forgetting_found_from_eval_rows(tmp_path):
    _, evals = healthy_rows()
    evals[-1]["general_loss"] = 2.5  # 2.0 -> 2.5: +25%
    f = rules_found(make_run(tmp_path / "run", evals=evals))["forgetting"]
    assert "2.000 (step 20) -> 2.500 (step 100), +25.0%" in f.evidence[0]
    assert "replay_ratio: 0 -> 0.2" in f.fixes and "learning_rate: 0.0002 -> 0.0001" in f.fixes
    assert any(x.startswith("replay_data:") for x in f.fixes) and any(x.startswith("ewc_lambda: 0 -> 1") for x in f.fixes)


def test_forgetting_found_from_before_after_eval(tmp_path):
    _, evals = healthy_rows()
    for e in evals:
        del e["general_loss"]
    summary = {**HEALTHY_SUMMARY, "eval": {"kind": "compare", "before": {"metrics": {"general_loss": 1.0}},
                                           "after": {"metrics": {"general_loss": 1.3}}}}
    f = rules_found(make_run(tmp_path / "run", evals=evals, summary=summary))["forgetting"]
    assert "(base model)" in f.evidence[0] and "+30.0%" in f.evidence[0]


def test_an_eval_loss_far_above_the_base_models_is_an_error(tmp_path):
    """The QA prefix run: eval loss 0.97 (base) -> 10.35 (fine-tuned), and diagnose said nothing."""
    summary = {**HEALTHY_SUMMARY, "method": "prefix", "eval": {"kind": "compare", "before": {"metrics": {"loss": 0.972}},
                                                               "after": {"metrics": {"loss": 10.348}}}}
    f = rules_found(make_run(tmp_path / "run", summary=summary, method="prefix"))["worse_than_base"]
    assert f.severity == "error" and "0.972 (base model) -> 10.348 (fine-tuned)" in f.evidence[0]
    assert f.fixes[0].startswith("retrain with this sftlab: prefix runs now start")
    summary["eval"]["after"]["metrics"]["loss"] = 1.2  # +23%: a fine-tune may trade some eval loss; not flagged
    assert "worse_than_base" not in rules_found(make_run(tmp_path / "run2", summary=summary))
    no_base = diagnose(make_run(tmp_path / "run3"))
    assert "worse_than_base" not in {f.rule for f in no_base.findings}
    assert "--compare base --save" in no_base.checked["worse_than_base"]


def test_forgetting_not_found_below_threshold(tmp_path):
    _, evals = healthy_rows()
    evals[-1]["general_loss"] = 2.15  # +7.5%
    assert "forgetting" not in rules_found(make_run(tmp_path / "run", evals=evals))


# --- format, repetition --------------------------------------------------------------------------

def test_format_found(tmp_path):
    _, evals = healthy_rows()
    evals[-1]["gen_format_adherence"] = 0.4
    f = rules_found(make_run(tmp_path / "run", evals=evals, masking="all"))["format"]
    assert "40%" in f.evidence[0] and "step 100" in f.evidence[0]
    assert any("masking: all -> all_assistant" in x for x in f.fixes)
    assert "epochs: 3 -> 4 (eval loss was still falling at the end)" in f.fixes


def test_format_advises_max_steps_for_a_run_cut_by_max_steps(tmp_path):
    _, evals = healthy_rows()
    evals[-1]["gen_format_adherence"] = 0.4
    cut = {**HEALTHY_SUMMARY, "steps": 6, "epochs": 0.6}  # 0.6 of 3 epochs: raising epochs changes nothing
    f = rules_found(make_run(tmp_path / "a", evals=evals, summary=cut, epochs=3, max_steps=6))["format"]
    assert not any(x.startswith("epochs:") for x in f.fixes), f.fixes
    assert any(x.startswith("max_steps: 6 -> 12 (the run stopped at max_steps after 0.6 of the 3 configured epochs")
               for x in f.fixes), f.fixes
    near = {**HEALTHY_SUMMARY, "steps": 100, "epochs": 2.0}  # all 3 epochs are 150 steps: drop max_steps
    f = rules_found(make_run(tmp_path / "b", evals=evals, summary=near, epochs=3, max_steps=100))["format"]
    assert any(x.startswith("max_steps: 100 -> -1 (remove it: all 3 epochs are about 150 steps") for x in f.fixes), f.fixes
    done = {**HEALTHY_SUMMARY, "steps": 100, "epochs": 3.0}  # max_steps set, but every epoch ran
    f = rules_found(make_run(tmp_path / "c", evals=evals, summary=done, epochs=3, max_steps=100))["format"]
    assert "epochs: 3 -> 4 (eval loss was still falling at the end)" in f.fixes
    stopped = {**HEALTHY_SUMMARY, "steps": 100, "epochs": 1.0, "stopped": "early_stopping"}
    f = rules_found(make_run(tmp_path / "d", evals=evals, summary=stopped, epochs=3))["format"]
    assert any(x.startswith("early_stopping_patience: 3 -> 5 (early stopping ended the run after 1 of the 3") for x in f.fixes)
    assert not any(x.startswith("epochs:") for x in f.fixes)


def test_format_does_not_advise_more_epochs_when_overfitting(tmp_path):
    train, evals = _overfit_rows()
    evals[-1]["gen_format_adherence"] = 0.4
    found = rules_found(make_run(tmp_path / "run", train=train, evals=evals))
    assert "overfitting" in found and not any(x.startswith("epochs: 3 -> 4") for x in found["format"].fixes)


def test_format_uses_final_eval_and_not_found_when_good(tmp_path):
    _, evals = healthy_rows()
    evals[-1]["gen_format_adherence"] = 0.4  # the final before/after eval wins over the training rows
    summary = {**HEALTHY_SUMMARY, "eval": {"kind": "compare", "before": {"metrics": {"format_adherence": 0.1}},
                                           "after": {"metrics": {"format_adherence": 0.95}}}}
    assert "format" not in rules_found(make_run(tmp_path / "run", evals=evals, summary=summary))


def test_repetition_found(tmp_path):
    _, evals = healthy_rows()
    evals[-1]["gen_repetition_rate"] = 0.6
    evals[-1]["gen_finished_rate"] = 0.3
    f = rules_found(make_run(tmp_path / "run", evals=evals))["repetition"]
    assert "60%" in f.evidence[0] and "30%" in f.evidence[1]
    assert any("repetition-penalty" in x for x in f.fixes) and any("temperature" in x for x in f.fixes)


def test_repetition_fix_starts_from_the_settings_the_eval_used(tmp_path):
    # the final eval already used --repetition-penalty 1.3 and sampling: "1.0 -> 1.2" and "sample with a
    # lower temperature" were advice the user had already taken (or the wrong way round)
    settings = {"max_new_tokens": 64, "do_sample": True, "temperature": 0.8, "top_p": 1.0, "repetition_penalty": 1.3}
    summary = {**HEALTHY_SUMMARY, "eval": {"kind": "single", "result": {
        "metrics": {"repetition_rate": 0.5, "finished_rate": 0.4}, "settings": settings}}}
    f = rules_found(make_run(tmp_path / "run", summary=summary))["repetition"]
    assert "generation: --repetition-penalty 1.3 -> 1.4" in f.fixes
    assert not any("temperature" in x for x in f.fixes)


def test_repetition_not_found_at_threshold(tmp_path):
    _, evals = healthy_rows()
    evals[-1]["gen_repetition_rate"] = 0.2
    assert "repetition" not in rules_found(make_run(tmp_path / "run", evals=evals))


# --- divergence ----------------------------------------------------------------------------------

def _nan_loss(train, summary):
    train[5]["loss"] = float("nan")
    return "train loss is nan at step 60"


def _exploding_loss(train, summary):
    train[7]["loss"] = 9.0  # first is 2.82: 3.2x
    return "train loss 9.000 at step 80, 3.2x its first value"


def _exploding_grad(train, summary):
    train[4]["grad_norm"] = 50.0
    return "gradient norm 50.000 at step 50"


def _stopped_diverged(train, summary):
    summary.update(stopped="diverged", divergence={"step": 70, "loss": 25.0})
    return "training stopped as diverged at step 70 (loss 25.0)"


@pytest.mark.parametrize("symptom", [_nan_loss, _exploding_loss, _exploding_grad, _stopped_diverged])
def test_divergence_found(tmp_path, symptom):
    train, _ = healthy_rows()
    summary = copy.deepcopy(HEALTHY_SUMMARY)
    expected = symptom(train, summary)
    f = rules_found(make_run(tmp_path / "run", train=train, summary=summary, precision="fp16"))["divergence"]
    assert f.severity == "error"
    assert any(expected in e for e in f.evidence), f.evidence
    assert "learning_rate: 0.0002 -> 2e-05" in f.fixes
    assert any("precision: fp16 -> bf16" in x for x in f.fixes)
    assert any("sftlab doctor train.jsonl" in x for x in f.fixes)


def test_divergence_not_found_for_normal_noise(tmp_path):
    train, _ = healthy_rows()
    train[4]["grad_norm"] = 5.0  # 5x the median: noisy but not exploding
    train[3]["loss"] = 3.5  # a bump above the first value, below 2x
    assert "divergence" not in rules_found(make_run(tmp_path / "run", train=train))


# --- EOS / pad -----------------------------------------------------------------------------------

def test_pad_equals_eos_with_eos_masked(tmp_path):
    summary = {**HEALTHY_SUMMARY, "pad_equals_eos": True, "eos_trained": False}
    f = rules_found(make_run(tmp_path / "run", summary=summary))["eos"]
    assert f.severity == "error" and "pad token == EOS" in f.message
    assert any("pad token other than EOS" in x for x in f.fixes)


def test_eos_not_trained_without_pad_eos(tmp_path):
    summary = {**HEALTHY_SUMMARY, "pad_equals_eos": False, "eos_trained": False}
    f = rules_found(make_run(tmp_path / "run", summary=summary))["eos"]
    assert f.severity == "warning"


def _train_summary(**kw) -> Summary:
    """A summary as training writes it: every field, through rundir.Summary."""
    fields = {**HEALTHY_SUMMARY, "epochs": 3.0, "examples": 100, "replay_examples": 0,
              "trained_tokens_per_second": 500.0, "gradient_checkpointing": False, "packing": False,
              "attention_batches": None, **kw}
    return Summary(**fields)


@pytest.mark.parametrize("pad_equals_eos, severity", [(True, "error"), (False, "warning")])
def test_eos_rule_fires_on_a_summary_written_by_train(tmp_path, pad_equals_eos, severity):
    run = make_run(tmp_path / "run", summary=False)
    RunDir(run).write_summary(_train_summary(pad_equals_eos=pad_equals_eos, eos_trained=False))
    d = diagnose(run)
    assert d.checked["eos"] == "found" and [(f.rule, f.severity) for f in d.findings] == [("eos", severity)]
    assert d.exit_code == (2 if severity == "error" else 1)
    assert "eos_trained = false" in " ".join(d.findings[0].evidence)


def test_eos_rule_quiet_when_trained_and_skipped_when_unknown(tmp_path):
    run = make_run(tmp_path / "run", summary=False)
    RunDir(run).write_summary(_train_summary(pad_equals_eos=True, eos_trained=True))
    assert diagnose(run).checked["eos"] == "ok"
    RunDir(run).write_summary(_train_summary(eos_trained=None))  # no end-of-turn token known
    assert diagnose(run).checked["eos"].startswith("skipped")


def test_pad_equals_eos_but_eos_trained_is_fine(tmp_path):
    summary = {**HEALTHY_SUMMARY, "pad_equals_eos": True, "eos_trained": True}
    assert "eos" not in rules_found(make_run(tmp_path / "run", summary=summary))


# --- truncation ----------------------------------------------------------------------------------

def test_truncation_found(tmp_path):
    prep = {**HEALTHY_SUMMARY["prepare"], "n_kept": 90, "n_dropped_too_long": 10,
            "dropped": [{"where": "train.jsonl:7", "why": "3000 tokens > max_seq_length 512"}]}
    f = rules_found(make_run(tmp_path / "run", summary={**HEALTHY_SUMMARY, "prepare": prep},
                             max_seq_length=512, truncation="drop"))["truncation"]
    assert f.severity == "warning"
    assert "10 of 100 examples (10.0%) dropped as longer than max_seq_length 512" in f.evidence
    assert "e.g. train.jsonl:7: 3000 tokens > max_seq_length 512" in f.evidence
    assert "max_seq_length: 512 -> 1024" in f.fixes and any("truncation: drop -> cut_turns" in x for x in f.fixes)


def test_truncation_small_share_is_info(tmp_path):
    prep = {**HEALTHY_SUMMARY["prepare"], "n_input": 1000, "n_truncated": 2}
    f = rules_found(make_run(tmp_path / "run", summary={**HEALTHY_SUMMARY, "prepare": prep}))["truncation"]
    assert f.severity == "info"


# --- template mismatch ---------------------------------------------------------------------------

def test_template_mismatch_found(tmp_path, tiny_model_dir):
    # trained with alpaca, but the tokenizer saved for inference carries ChatML
    summary = {**HEALTHY_SUMMARY, "template": "alpaca"}
    f = rules_found(make_run(tmp_path / "run", summary=summary, template="alpaca",
                             tokenizer_from=tiny_model_dir))["template_mismatch"]
    assert f.severity == "error" and "renders differently" in f.evidence[0]


def test_template_mismatch_between_training_and_eval(tmp_path):
    summary = {**HEALTHY_SUMMARY, "eval": {"kind": "compare", "before": {"metrics": {}},
                                           "after": {"metrics": {}, "template": "llama3"}}}
    f = rules_found(make_run(tmp_path / "run", summary=summary))["template_mismatch"]
    assert "trained with template 'chatml', evaluated with 'llama3'" in f.evidence


def test_same_template_is_fine(tmp_path, tiny_model_dir):
    # the built-in chatml and the tokenizer's ChatML template are written differently but render the same
    assert "template_mismatch" not in rules_found(make_run(tmp_path / "run", tokenizer_from=tiny_model_dir))


# --- CLI and bad input ---------------------------------------------------------------------------

def test_cli_json_and_exit_codes(tmp_path, capsys):
    summary = {**HEALTHY_SUMMARY, "pad_equals_eos": True, "eos_trained": False}
    run = make_run(tmp_path / "bad", summary=summary)
    assert main(["diagnose", str(run), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert [f["rule"] for f in out["findings"]] == ["eos"] and out["exit_code"] == 2
    _, evals = healthy_rows()
    evals[-1]["gen_repetition_rate"] = float("nan")  # a non-finite number still prints as valid output
    evals[-2]["gen_repetition_rate"] = 0.5
    run = make_run(tmp_path / "warn", evals=evals)
    assert main(["diagnose", str(run)]) == 1
    text = capsys.readouterr().out
    assert "[warning] repetition" in text and "seen:" in text and "fix:" in text


def test_interrupted_run_without_summary(tmp_path):
    d = diagnose(make_run(tmp_path / "run", summary=False))
    assert d.checked["eos"].startswith("skipped")
    assert [(f.rule, f.severity) for f in d.findings] == [("interrupted", "info")] and d.exit_code == 0
    assert d.findings[0].message == (
        "the run did not finish (no summary.json); last logged at step 100 of about 100 (3 of 3 epochs)")


def test_interrupted_run_says_where_and_how_to_resume(tmp_path):
    import shutil

    train, evals = healthy_rows(100)
    summary = {**HEALTHY_SUMMARY, "steps": 2, "epochs": 0.2, "stopped": "interrupted", "signal": "SIGTERM"}
    run = make_run(tmp_path / "run", train=train[:1], evals=[], summary=summary, max_steps=6)
    shutil.rmtree(run / "model")  # an interrupted run saves no model
    for step, complete in ((2, True), (3, False)):  # checkpoint-3: cut off while saving
        (run / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    d = diagnose(run)
    f = {x.rule: x for x in d.findings}["interrupted"]
    assert f.severity == "warning" and f.message == "the run was interrupted at step 2 of 6" and d.exit_code == 1
    assert "stopped = interrupted by SIGTERM" in f.evidence[0] and "no model was saved" in f.evidence[1]
    assert f.evidence[2] == "last complete checkpoint: checkpoints/checkpoint-2"
    assert f.fixes[0].startswith(f"resume from checkpoint-2: sftlab train CONFIG --output-dir {run} --resume")
    assert "no problems found" not in d.format_text() and d.checked["template_mismatch"].startswith("skipped: no model/")
    shutil.rmtree(run / "checkpoints")
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("max_steps: 6", "max_steps: -1"))
    f = {x.rule: x for x in diagnose(run).findings}["interrupted"]
    assert f.message == "the run was interrupted at step 2 of about 30 (0.2 of 3 epochs)"
    assert f.fixes[0].startswith(f"train again: sftlab train CONFIG --output-dir {run} (no checkpoint")


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "metrics.jsonl").write_text('{"split": "train", "step": 1}\n{broken\n'), "metrics.jsonl:2: damaged"),
    (lambda run: (run / "metrics.jsonl").unlink(), "no metrics.jsonl"),
    (lambda run: (run / "summary.json").write_text("{not json"), "damaged summary"),
    (lambda run: (run / "config.yaml").unlink(), "no config.yaml"),
    (lambda run: (run / "config.yaml").write_text("learning_rate: fast\n"), "learning_rate"),
    (lambda run: __import__("shutil").rmtree(run), "not found"),
])
def test_bad_run_folder_is_one_line(tmp_path, capsys, damage, message):
    run = make_run(tmp_path / "run")
    damage(run)
    assert main(["diagnose", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sftlab diagnose: error:") and message in err[0], err


def test_format_names_the_tool_call_rate_and_tool_fixes(tmp_path):
    """On tool-calling evals the format is the call: the finding said only "format adherence" and advised
    a system prompt stating the output format, where the replies failed to make valid calls."""
    summary = {**HEALTHY_SUMMARY, "eval": {"kind": "single", "result": {"metrics": {
        "format_adherence": 0.3, "valid_tool_call_rate": 0.25, "tool_call_match_rate": 0.1}}}}
    f = rules_found(make_run(tmp_path / "run", summary=summary))["format"]
    assert any(e.startswith("valid tool call rate 25% in the final eval") for e in f.evidence), f.evidence
    assert not any(x.startswith("system_prompt:") for x in f.fixes), f.fixes
    assert any("replies call the tools" in x for x in f.fixes), f.fixes


# --- plateau -------------------------------------------------------------------------------------

def test_plateau_found_when_the_train_loss_never_falls(tmp_path):
    # a run whose loss stayed flat (learning rate far too low, or nothing trained) was "no problems found"
    train, evals = healthy_rows()
    for r in train:
        r["loss"] = 2.0 + 0.01 * (r["step"] % 20 == 0)
    for r in evals:
        r["eval_loss"] = 2.1
    f = rules_found(make_run(tmp_path / "run", train=train, evals=evals))["plateau"]
    assert f.severity == "warning" and "train loss 2.000 at step 10 -> 2.0" in f.evidence[0]
    assert "eval loss 2.100 at step 20 -> 2.100 at step 100" in f.evidence[1]
    assert "learning_rate: 0.0002 -> 0.0006" in f.fixes
    assert any("sftlab prepare" in x and "--show 3" in x for x in f.fixes)


def test_plateau_not_found_for_a_learning_or_unfinished_run(tmp_path):
    assert "plateau" not in rules_found(make_run(tmp_path / "healthy"))
    train, _ = healthy_rows()
    for r in train:
        r["loss"] = 0.02  # already fitted: nothing left to fall
    assert "plateau" not in rules_found(make_run(tmp_path / "fitted", train=train))
    flat = [{**r, "loss": 2.0} for r in healthy_rows()[0]]
    d = diagnose(make_run(tmp_path / "unfinished", train=flat, summary=False))
    assert d.checked["plateau"].startswith("skipped: the run did not finish")


def test_a_large_gradient_in_warmup_is_not_divergence(tmp_path):
    # the gradient norm of the first steps (before any real update: warmup keeps the rate near 0) is large
    # by nature; a run whose loss then fell smoothly was "[error] training diverged, lower the rate 10x"
    train, _ = healthy_rows()  # steps 10..100, warmup_ratio 0.1: warmup ends at step 10
    train[0]["grad_norm"] = 50.0
    assert "divergence" not in rules_found(make_run(tmp_path / "warm", train=train))
    train[0]["grad_norm"], train[4]["grad_norm"] = 1.0, 50.0  # after warmup it still counts
    assert "divergence" in rules_found(make_run(tmp_path / "late", train=train))


def test_gradients_that_shrink_as_the_loss_converges_are_not_divergence(tmp_path):
    """A healthy run's loss fell from 2.5 to 0.003 and its gradient norm with it, 0.37 -> 0.004: against the
    whole run's median (0.0088) the first logged norm after warmup read 42x, "[error] training diverged"."""
    train, _ = healthy_rows()
    for k, r in enumerate(train):
        r["grad_norm"] = 0.37 * 0.6 ** k  # 0.37 down to 0.004 over the run
    assert "divergence" not in rules_found(make_run(tmp_path / "converging", train=train))
    train[-1]["grad_norm"] = 0.5  # a late jump against the small norms before it still counts
    assert "divergence" in rules_found(make_run(tmp_path / "late-jump", train=train))
