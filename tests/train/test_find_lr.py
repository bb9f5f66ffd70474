"""`train --find-lr`: the learning-rate range test's smoothing, choice rule, sweep and CLI."""

import json
import math

import pytest
from conftest import train_config
from transformers import TrainerControl

from sftlab import rundir as A
from sftlab.cli import main
from sftlab.core.errors import SftlabError
from sftlab.train import find_lr as F

pytestmark = pytest.mark.xdist_group("train")


def _geometric(n: int, low: float = 1e-5, high: float = 1e-1) -> list[float]:
    return [low * (high / low) ** (i / (n - 1)) for i in range(n)]


def test_smoothing_is_bias_corrected_and_follows_a_step():
    assert F.smooth([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])  # no pull towards 0 at the start
    s = F.smooth([2.0] * 5 + [1.0] * 10, beta=0.6)
    assert s[0] == pytest.approx(2.0) and s[4] == pytest.approx(2.0)
    assert 1.0 < s[5] < 2.0 and s[-1] == pytest.approx(1.0 + 0.6 ** 10, rel=1e-3)


def test_the_choice_is_a_third_of_the_rate_of_the_lowest_smoothed_loss():
    lrs = _geometric(30)
    # flat, then falling, lowest at lrs[24], then blowing up
    loss = [2.0 - 1.5 / (1 + math.exp(-(i - 12) / 1.5)) if i <= 24 else 0.5 + 0.8 * (i - 24) for i in range(30)]
    lr, why = F.suggest(lrs, loss)
    assert lr == pytest.approx(lrs[24] / 3) and "1/3 of the rate of the lowest loss" in why
    assert "still falling" not in why


def test_a_loss_still_falling_at_the_end_says_a_higher_rate_may_do():
    lrs = _geometric(12)
    lr, why = F.suggest(lrs, [2.0 - 0.1 * i for i in range(12)])
    assert lr == pytest.approx(lrs[-1] / 3) and "still falling" in why


def test_a_loss_lowest_at_the_start_picks_the_sweeps_low_end_and_says_so():
    lrs = _geometric(10)
    lr, why = F.suggest(lrs, [1.0 + 0.5 * i for i in range(10)])
    assert lr == lrs[F.SKIP] and "starts too high" in why


def test_too_few_finite_steps_is_one_clear_error():
    with pytest.raises(SftlabError, match="only 3 usable steps"):
        F.suggest(_geometric(5), [1.0, 0.9, 0.8, float("nan"), float("nan")])


def test_a_sweep_too_short_to_choose_from_is_refused_before_any_loading(tmp_path, tiny_model_dir, capsys):
    cfg = train_config(tmp_path, tiny_model_dir, method="lora")
    with pytest.raises(SftlabError, match="a sweep needs at least 6 steps"):
        F.find_lr(cfg, steps=3)
    rc = main(["train", "--model", cfg.model, "--data", cfg.data, "--output-dir", str(tmp_path / "run"), "--find-lr", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "a sweep needs at least 6 steps" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_the_sweep_stops_once_the_smoothed_loss_blows_up():
    losses, lrs = [], []
    cb = F._stop_callback(None, losses, lrs, factor=4.0)
    control = TrainerControl()
    for loss in [2.0, 1.5, 1.0, 0.8, 0.7, 0.9]:
        cb.on_log(None, None, control, logs={"loss": loss})
    assert not control.should_training_stop
    for loss in [5.0, 20.0]:
        cb.on_log(None, None, control, logs={"loss": loss})
    assert control.should_training_stop and losses[-1] == 20.0


def test_find_lr_sweeps_the_real_run_geometrically_and_keeps_nothing(tmp_path, tiny_model_dir):
    cfg = train_config(tmp_path, tiny_model_dir, method="lora", learning_rate="auto", max_steps=3)
    sweep = F.find_lr(cfg, steps=10)
    n = len(sweep.lrs)
    assert n == len(sweep.losses) == len(sweep.smoothed) and F.SKIP + 3 <= n <= 10
    assert sweep.lrs[0] == pytest.approx(sweep.table_lr * F.LOW, rel=1e-6)  # the optimizer's own rate at step 1
    ratios = [b / a for a, b in zip(sweep.lrs, sweep.lrs[1:])]
    assert ratios == pytest.approx([(F.HIGH / F.LOW) ** (1 / 9)] * (n - 1), rel=1e-6)
    assert all(math.isfinite(x) for x in sweep.losses[:F.SKIP + 3])
    assert sweep.lrs[0] <= sweep.choice <= sweep.lrs[-1] and sweep.reason
    assert not (tmp_path / "run").exists()  # the sweep writes no run folder
    text = F.describe_sweep(sweep)
    assert text.startswith(f"learning-rate sweep: {n} steps") and f"learning_rate: {sweep.choice:.3g}" in text


def test_the_sweeps_model_is_freed_before_training_starts(tmp_path, tiny_model_dir, monkeypatch):
    import gc
    import weakref

    built = []
    real = F.build_model

    def build_model(*a, **k):
        model, ewc = real(*a, **k)
        built.append(weakref.ref(model))
        return model, ewc

    monkeypatch.setattr(F, "build_model", build_model)
    F.find_lr(train_config(tmp_path, tiny_model_dir, method="lora"), steps=6)
    gc.collect()
    assert len(built) == 1 and built[0]() is None  # training's model would otherwise sit beside it


def test_cli_find_lr_with_resume_is_one_clear_error(tmp_path, tiny_model_dir, capsys):
    cfg = train_config(tmp_path, tiny_model_dir)
    rc = main(["train", "--model", cfg.model, "--data", cfg.data, "--output-dir", str(tmp_path / "run"),
               "--find-lr", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "continues at its own learning rate" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_check_find_lr_prints_the_curve_and_trains_nothing(tmp_path, tiny_model_dir, capsys):
    cfg = train_config(tmp_path, tiny_model_dir, method="lora")
    rc = main(["train", "--model", cfg.model, "--data", cfg.data, "--output-dir", str(tmp_path / "run"),
               "--check", "--find-lr", "8", "--set", "max_seq_length=128", "--set", "precision=fp32"])
    out = capsys.readouterr().out
    assert rc == 0 and "learning-rate sweep: " in out and "\nlearning_rate: " in out
    assert not (tmp_path / "run" / A.MODEL_DIR).exists()


def test_cli_find_lr_trains_at_the_choice_and_records_the_sweep(tmp_path, tiny_model_dir, capsys):
    cfg = train_config(tmp_path, tiny_model_dir, method="lora")
    rc = main(["train", "--model", cfg.model, "--data", cfg.data, "--output-dir", str(tmp_path / "run"),
               "--find-lr", "8", "--set", "max_steps=2", "--set", "max_seq_length=128", "--set", "precision=fp32"])
    assert rc == 0
    summary = json.loads((tmp_path / "run" / A.SUMMARY).read_text())
    sweep = summary["lr_sweep"]
    config = (tmp_path / "run" / A.CONFIG).read_text()
    assert f"learning_rate: {sweep['choice']}" in config and "# learning_rate from the range test" in config
    assert "learning-rate sweep: " in capsys.readouterr().out
    assert summary["steps"] == 2


def test_cli_find_lr_with_json_is_one_clear_error(tmp_path, tiny_model_dir, capsys):
    cfg = train_config(tmp_path, tiny_model_dir)
    rc = main(["train", "--model", cfg.model, "--data", cfg.data, "--find-lr", "--json"])
    err = capsys.readouterr().err
    assert rc == 2 and "--find-lr runs in this process" in err and "Traceback" not in err
