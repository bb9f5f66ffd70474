"""The shipped demo data: regenerated identically, parseable, and no train/eval overlap."""

import json
from pathlib import Path

import sftlab
from sftlab.cli import main
from sftlab.config import load_config
from sftlab.data.formats import load_conversations
from sftlab.demo_data import demo_path


def test_every_split_loads_and_train_eval_do_not_overlap():
    splits = {s: load_conversations(str(demo_path(s))) for s in ("train", "eval", "general")}
    assert len(splits["train"]) == 300 and len(splits["eval"]) == 60 and len(splits["general"]) == 60
    prompts = {s: {c.messages[-2].content for c in convs} for s, convs in splits.items()}
    assert not prompts["train"] & prompts["eval"]
    for c in splits["train"] + splits["eval"]:
        json.loads(c.replies()[-1])  # every demo reply is the JSON answer


DEMO_YAML = Path(sftlab.__file__).parent / "demo_data" / "demo.yaml"
REPO = Path(sftlab.__file__).parents[2]  # the folder the README's commands run in


def test_the_demo_config_alone_names_the_demo_data_make_demo_passes(monkeypatch):
    """Run from the repo root, demo.yaml trains on the files `make demo` passes (python -m sftlab.demo)."""
    monkeypatch.chdir(REPO)
    cfg = load_config(DEMO_YAML)
    assert Path(cfg.data).resolve() == demo_path("train").resolve()
    assert Path(cfg.eval_data).resolve() == demo_path("eval").resolve()


def test_train_check_runs_on_the_demo_config_alone(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code = main(["train", str(DEMO_YAML), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"),
                 "--check", "--json"])
    checked = json.loads(capsys.readouterr().out)
    assert code == 0 and not [f for f in checked["findings"] if f["severity"] == "error"]
    # read from the repo root; the run's config names them from anywhere
    assert checked["resolved"]["data"] == str(REPO / "src/sftlab/demo_data/train.jsonl")
    assert checked["resolved"]["eval_data"] == str(REPO / "src/sftlab/demo_data/eval.jsonl")


def test_the_demo_config_elsewhere_says_where_relative_paths_start(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["train", str(DEMO_YAML), "--model", str(tiny_model_dir), "--check"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert ("data file 'src/sftlab/demo_data/train.jsonl' not found (check the path; a relative path starts at "
            f"the working folder, {tmp_path}, also in a config file)") in err


def test_every_data_file_of_the_package_is_in_its_package_data():
    # package-data listed demo_data/*.jsonl only: an installed wheel had no demo.yaml, which `sftlab.demo`
    # loads, nor tools.yaml (an editable install, as `make demo` makes, hid it)
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sftlab"]
    package = root / "src" / "sftlab"
    files = [p.relative_to(package).as_posix() for p in package.rglob("*")
             if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert files and not [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
