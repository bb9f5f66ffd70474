"""eval_steps and save_steps: changed only where load_best_model_at_end needs it, and never silently."""

import pytest
import yaml
from conftest import chat_data, train_config

from sftlab import rundir as A
from sftlab.cli import main
from sftlab.train.checks import checkpoint_steps
from sftlab.train.run import train, training_arguments

pytestmark = pytest.mark.xdist_group("train")


@pytest.mark.parametrize("ev, sv, best, has_eval, used", [
    (500, 100, True, True, (100, 100)),  # eval above save: lowered to it
    (100, 250, True, True, (100, 200)),  # save not a multiple of eval: rounded down
    (100, 300, True, True, (100, 300)),  # already a multiple: kept
    (500, 100, False, True, (500, 100)),  # nothing restores a checkpoint: both kept
    (500, 100, True, False, (500, 100)),  # no eval data, no best model: both kept
])
def test_checkpoint_steps_change_only_when_load_best_model_at_end_needs_it(tmp_path, tiny_model_dir, ev, sv, best,
                                                                          has_eval, used):
    cfg = train_config(tmp_path, tiny_model_dir, eval_steps=ev, save_steps=sv, load_best_model_at_end=best)
    assert checkpoint_steps(cfg, has_eval=has_eval) == used
    args = training_arguments(cfg, tmp_path / "ckpt", has_eval=has_eval, quiet=True)
    assert (args.eval_steps, args.save_steps) == used


def test_check_says_what_the_run_uses_and_the_resolved_config_holds_it(tmp_path, tiny_model_dir, capsys):
    evald = chat_data(tmp_path / "eval.jsonl", 4, offset=100)
    cfg = train_config(tmp_path, tiny_model_dir, eval_data=evald, eval_steps=500, save_steps=100)
    checked = train(cfg, check_only=True, quiet=True)
    found = [f for f in checked["findings"] if f["rule"] == "checkpoint_steps"]
    assert len(found) == 1 and found[0]["severity"] == "info"
    assert found[0]["message"].startswith("eval_steps 500 -> 100: load_best_model_at_end needs")
    assert found[0]["fixes"] == ["--set save_steps=500 (a multiple of eval_steps) to keep yours, "
                                 "or --set load_best_model_at_end=false"]
    assert (checked["resolved"]["eval_steps"], checked["resolved"]["save_steps"]) == (100, 100)

    capsys.readouterr()
    code = main(["train", "--model", str(tiny_model_dir), "--data", cfg.data, "--eval-data", evald, "--check",
                 "--set", "eval_steps=500", "--set", "save_steps=100", "--output-dir", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert code == 0 and "check info: eval_steps 500 -> 100: load_best_model_at_end needs" in out

    quiet = train_config(tmp_path / "off", tiny_model_dir, eval_data=evald, eval_steps=500, save_steps=100,
                         load_best_model_at_end=False)
    checked = train(quiet, check_only=True, quiet=True)
    assert not [f for f in checked["findings"] if f["rule"] == "checkpoint_steps"]
    assert (checked["resolved"]["eval_steps"], checked["resolved"]["save_steps"]) == (500, 100)


def test_a_run_prints_the_change_and_saves_the_values_it_used(tmp_path, tiny_model_dir, capsys):
    evald = chat_data(tmp_path / "eval.jsonl", 4, offset=100)
    cfg = train_config(tmp_path, tiny_model_dir, eval_data=evald, max_steps=2, eval_steps=3, save_steps=2)
    summary = train(cfg)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "eval_steps 3 -> 2" in ln]
    assert lines == ["check info: eval_steps 3 -> 2: load_best_model_at_end needs every checkpoint at an "
                     "evaluation (save_steps a multiple of eval_steps) -> --set save_steps=3 (a multiple of "
                     "eval_steps) to keep yours, or --set load_best_model_at_end=false"]
    saved = yaml.safe_load((tmp_path / "run" / A.CONFIG).read_text())
    assert (saved["eval_steps"], saved["save_steps"]) == (2, 2)
    assert summary["steps"] == 2 and (tmp_path / "run" / A.CHECKPOINTS / "checkpoint-2").is_dir()


def test_check_says_when_the_run_ends_before_its_first_evaluation(tmp_path, tiny_model_dir):
    """eval_steps 500 (the default) on a 30-step run with eval data: the eval data was evaluated once, after
    training, so no eval curve and early stopping (patience 3) never acted, and nothing said so."""
    evald = chat_data(tmp_path / "eval.jsonl", 4, offset=100)
    data = chat_data(tmp_path / "forty.jsonl", 40)
    cfg = train_config(tmp_path, tiny_model_dir, data=data, eval_data=evald, epochs=3, eval_steps=500, save_steps=500)

    def found(c):
        return [f for f in train(c, check_only=True, quiet=True)["findings"] if f["rule"] == "eval_steps"]

    [f] = found(cfg)  # 40 examples at batch 4, 3 epochs: 30 steps
    assert f["severity"] == "info" and f["message"] == (
        "eval_steps 500 is past the run's 30 steps: the eval data is evaluated only once, after training "
        "(no eval curve, and early stopping never acts)")
    assert f["fixes"] == ["--set eval_steps=6 to evaluate during the run"]
    assert found(train_config(tmp_path, tiny_model_dir, data=data, eval_data=evald, epochs=3, eval_steps=6)) == []
    assert found(train_config(tmp_path, tiny_model_dir, data=data, epochs=3, eval_steps=500)) == []  # no eval data


@pytest.mark.parametrize("second", [4.0, float("nan")])
def test_the_restored_checkpoint_is_the_saved_one_with_the_lowest_eval_loss(tmp_path, tiny_model_dir, monkeypatch,
                                                                            second):
    """Evaluated every step, saved every 2nd: eval losses 5, 4, 3, 3.5. Step 3 (the best evaluation) has no
    checkpoint; transformers then kept checkpoint-2 (4.0) as the best and restored it over checkpoint-4 (3.5).
    A NaN eval loss at step 2 is never the best."""
    import json

    import torch
    from safetensors.torch import load_file

    import sftlab.train.run as run_module

    script, real = [5.0, second, 3.0, 3.5], run_module.training_eval

    def scripted(model, tok, examples, **kw):
        row = real(model, tok, examples, **kw)
        if script:
            row["eval_loss"] = script.pop(0)
        return row

    monkeypatch.setattr(run_module, "training_eval", scripted)
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=4, eval_steps=1, save_steps=2, save_total_limit=0,
                       early_stopping_patience=0, learning_rate=1e-2, eval_data=chat_data(tmp_path / "e.jsonl", 4, offset=100))
    s = train(cfg, quiet=True)
    ckpts = tmp_path / "run" / A.CHECKPOINTS
    state = json.loads((ckpts / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(ckpts / "checkpoint-4")
    assert s["final_eval_loss"] == 3.5 and s["best_eval_loss"] == 3.0  # the best evaluation, though not saved
    final = load_file(str(tmp_path / "run" / A.MODEL_DIR / "model.safetensors"))
    kept = load_file(str(ckpts / "checkpoint-4" / "model.safetensors"))
    assert all(torch.equal(final[k], kept[k]) for k in final)
