"""Trackers: tensorboard event files match metrics.jsonl; trackio, mlflow and wandb get the run name and project.

Only tensorboard is in the `test` extra; the other trackers are tested where their package is
installed (offline or local modes only) and skipped with the reason otherwise.
"""

import importlib.util
import os

import pytest
from conftest import chat_data, train_config

from sftlab.rundir import RunDir
from sftlab.train.run import train

pytestmark = pytest.mark.xdist_group("train")


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _tiny_run(tmp_path, tiny_model_dir, **kw):
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=4, eval_steps=2, save_steps=2,
                       eval_data=chat_data(tmp_path / "eval.jsonl", 4, offset=100), **kw)
    summary = train(cfg, quiet=True)
    return tmp_path / "run", summary


def test_tensorboard_events_match_metrics_jsonl(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard", reason="tensorboard is in the `test` extra: pip install -e '.[test]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = _tiny_run(tmp_path, tiny_model_dir, report_to=["tensorboard"], load_best_model_at_end=False)
    logdir = run / "tensorboard"
    assert any(p.name.startswith("events.out.tfevents") for p in logdir.iterdir())
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()

    def scalars(tag):
        return {e.step: e.value for e in acc.Scalars(tag)}

    rows = RunDir(run).metrics()
    train_rows = [r for r in rows if r["split"] == "train"]
    eval_rows = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4] and [r["step"] for r in eval_rows] == [2, 4]
    for tag, key, src in (("train/loss", "loss", train_rows), ("train/learning_rate", "learning_rate", train_rows),
                          ("train/tokens_per_second", "tokens_per_second", train_rows),
                          ("train/trained_tokens_per_second", "trained_tokens_per_second", train_rows),
                          ("eval/loss", "eval_loss", eval_rows)):
        got = scalars(tag)
        want = {r["step"]: r[key] for r in src}
        assert set(got) == set(want), tag
        for step, v in want.items():  # event files store float32
            assert got[step] == pytest.approx(v, rel=1e-6, abs=1e-9), (tag, step)
    assert all(v > 0 for v in scalars("train/tokens_per_second").values())


def test_run_name_and_project_reach_the_training_arguments(tmp_path, tiny_model_dir):
    from sftlab.train.run import training_arguments

    cfg = train_config(tmp_path, tiny_model_dir, run_name="exp-7", project="sftlab-tests")
    args = training_arguments(cfg, tmp_path / "ckpt", has_eval=False, quiet=True)
    assert args.run_name == "exp-7" and args.project == "sftlab-tests"
    default = training_arguments(train_config(tmp_path, tiny_model_dir), tmp_path / "ckpt", has_eval=False, quiet=True)
    assert default.run_name == "run"  # the run folder's name


def test_project_is_set_for_wandb_and_mlflow_only_while_training(monkeypatch):
    from sftlab.train.callbacks import tracker_env

    monkeypatch.setenv("WANDB_PROJECT", "users-own")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    with tracker_env("p1"):
        assert os.environ["WANDB_PROJECT"] == os.environ["MLFLOW_EXPERIMENT_NAME"] == "p1"
    assert os.environ["WANDB_PROJECT"] == "users-own" and "MLFLOW_EXPERIMENT_NAME" not in os.environ
    with tracker_env(None):
        assert os.environ["WANDB_PROJECT"] == "users-own"


@pytest.mark.skipif(not _installed("mlflow"), reason="mlflow is not installed (not a dependency of sftlab)")
def test_mlflow_local_run_gets_name_experiment_and_metrics(tmp_path, tiny_model_dir, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3.x: the local file store is opt-in
    _tiny_run(tmp_path, tiny_model_dir, report_to=["mlflow"], run_name="mix-1", project="sftlab-exp")
    exp = mlflow.get_experiment_by_name("sftlab-exp")
    assert exp is not None
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    assert len(runs) == 1 and runs[0].info.run_name == "mix-1"
    assert "loss" in runs[0].data.metrics and "tokens_per_second" in runs[0].data.metrics


def _spy(monkeypatch, module, name="init") -> list[dict]:
    """Record the keyword arguments of ``module.init`` and still call the real one."""
    calls: list[dict] = []
    real = getattr(module, name)

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.skipif(not _installed("wandb"), reason="wandb is not installed (not a dependency of sftlab)")
def test_wandb_offline_run_gets_name_and_project(tmp_path, tiny_model_dir, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    calls = _spy(monkeypatch, wandb)
    _tiny_run(tmp_path, tiny_model_dir, report_to=["wandb"], run_name="mix-1", project="sftlab-exp")
    assert calls and calls[0]["project"] == "sftlab-exp" and calls[0]["name"] == "mix-1"
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # the offline run was written locally
    assert "WANDB_PROJECT" not in os.environ  # restored after training


@pytest.mark.skipif(not _installed("trackio"), reason="trackio is not installed (not a dependency of sftlab)")
def test_trackio_local_run_gets_name_and_project(tmp_path, tiny_model_dir, monkeypatch):
    import trackio

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    calls = _spy(monkeypatch, trackio)
    _tiny_run(tmp_path, tiny_model_dir, report_to=["trackio"], run_name="mix-1", project="sftlab-exp")
    assert calls and calls[0]["project"] == "sftlab-exp" and calls[0]["name"] == "mix-1"


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "trackio", "tensorboard"])
def test_a_tracker_whose_package_is_missing_is_one_clear_error_before_loading(tmp_path, tiny_model_dir, monkeypatch,
                                                                              capsys, tracker):
    # without its package, transformers' integration raised a RuntimeError with a traceback once the model was
    # loaded (report_to: [wandb] without wandb); --check said the configuration looked sound
    import yaml

    from sftlab.cli import main
    from sftlab.core.errors import SftlabError
    from sftlab.train import checks

    monkeypatch.setattr(checks, "_module_installed", lambda name: False)
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=1, report_to=[tracker])
    with pytest.raises(SftlabError, match=rf"report_to {tracker}: .*not installed") as e:
        train(cfg, quiet=True)
    assert "pip install" in e.value.hint
    assert not (tmp_path / "run").exists()  # stopped before the run folder was started
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["train", str(path), "--check"]) == 2
    assert f"check error: report_to {tracker}:" in capsys.readouterr().out
