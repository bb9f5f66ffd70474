"""config.py is the one definition of allowed values, and plan/auto.py the one place `auto` is resolved."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sftlab
from sftlab import config as C
from sftlab.cli import build_parser, main
from sftlab.config import (
    Masking,
    Method,
    Truncation,
    choices,
    config_help,
    config_schema,
    load_config,
)
from sftlab.core.errors import SftlabError
from sftlab.data import masking
from sftlab.plan import TrainSetup, auto, recommend_config, shape_from_params
from sftlab.plan import setup as M

ALIASES = {name: getattr(C, name) for name in ("Method", "Masking", "Truncation", "Attention", "Precision",
                                                "Optimizer", "Scheduler", "Loss")}


def test_other_modules_read_the_allowed_values_from_config():
    assert M.METHODS == choices(Method) == C.field_choices("method")
    assert (masking.MASKING, masking.TRUNCATION) == (choices(Masking), choices(Truncation))
    assert M.ATTENTION == C.field_choices("attn_implementation") and M.OPTIMIZERS == C.field_choices("optimizer")


def test_no_module_repeats_a_list_of_allowed_values():
    """A tuple/list/set literal holding all of an alias's values, outside config.py, is a second copy."""
    sets = {name: set(choices(alias)) for name, alias in ALIASES.items()}
    copies = []
    for path in Path(sftlab.__file__).parent.rglob("*.py"):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and all(isinstance(e, ast.Constant) for e in node.elts):
                values = {e.value for e in node.elts}
                copies += [f"{path.name}:{node.lineno} {name}" for name, s in sets.items() if len(s) > 1 and s <= values]
    assert not copies


@pytest.mark.parametrize("key, value, message", [
    ("masking", "some", "config key 'masking': 'some' is not one of all_assistant, last_assistant, all"),
    ("method", "dpo", "config key 'method': 'dpo' is not one of full, lora, qlora, prefix"),
    ("learning_rate", "fast", "config key 'learning_rate': 'fast' must be a number or 'auto'"),
    ("batch_size", 2.5, "config key 'batch_size': 2.5 must be a number or 'auto'"),
    ("gradient_checkpointing", "maybe", "config key 'gradient_checkpointing': 'maybe' must be true, false or 'auto'"),
    ("max_seq_length", "long", "config key 'max_seq_length': 'long' is not a valid int"),
])
def test_a_value_outside_the_type_is_one_error_naming_the_key(key, value, message):
    with pytest.raises(SftlabError) as exc:
        load_config(None, {key: value})
    assert str(exc.value) == message


def test_values_are_coerced_to_the_declared_type():
    cfg = load_config(None, {"learning_rate": "auto", "epochs": "2", "gradient_checkpointing": "yes",
                             "batch_size": 8.0, "data": "null", "report_to": "tensorboard, wandb"})
    assert (cfg.learning_rate, cfg.epochs, cfg.gradient_checkpointing, cfg.batch_size) == ("auto", 2.0, True, 8)
    assert cfg.data is None and cfg.report_to == ["tensorboard", "wandb"]


@pytest.mark.parametrize("item, key, value", [
    ("system_prompt=Be brief. #1 rule: no chit-chat", "system_prompt", "Be brief. #1 rule: no chit-chat"),  # was "Be brief."
    ("system_prompt=You are terse. Answer: yes or no", "system_prompt", "You are terse. Answer: yes or no"),  # was a mapping
    ("system_prompt=no", "system_prompt", "no"),  # was "False"
    ("data=/data/my set #1.jsonl", "data", "/data/my set #1.jsonl"),  # was "/data/my set"
    ("run_name=007", "run_name", "007"),  # was "7"
    ("system_prompt='quoted: text'", "system_prompt", "quoted: text"),  # YAML quoting still works
    ("data=[a.jsonl, b.jsonl]", "data", ["a.jsonl", "b.jsonl"]),
    ("template=null", "template", None),
    ("learning_rate=2e-4", "learning_rate", 2e-4),
    ("packing=yes", "packing", True),
])
def test_set_keeps_the_text_of_text_keys(item, key, value):
    """--set parses YAML for numbers, booleans and lists, but a text key (a prompt, a path, a name) keeps
    what was typed: YAML cut a system prompt at ' #' without a word, or refused one with ': ' in it."""
    assert getattr(load_config(None, C.parse_set([item])), key) == value


def test_an_unquoted_yes_or_no_for_a_text_key_in_yaml_is_an_error(tmp_path, capsys):
    """YAML reads `system_prompt: no` as false: it trained with the system prompt "False"."""
    (tmp_path / "c.yaml").write_text("system_prompt: no\n")
    with pytest.raises(SftlabError, match="config key 'system_prompt': YAML reads an unquoted yes/no"):
        load_config(tmp_path / "c.yaml")
    assert main(["train", str(tmp_path / "c.yaml"), "--data", "x.jsonl", "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'quote it: system_prompt: "..."' in err


@pytest.mark.parametrize("item", ["epochs=.inf", "epochs=inf", "learning_rate=nan", "warmup_ratio=.NaN", "max_grad_norm=1e400"])
def test_a_number_that_is_not_finite_is_one_error(item, tmp_path, capsys):
    """`epochs: .inf` crashed the checklist with OverflowError and `learning_rate: nan` torch's optimizer,
    both with a traceback after loading the model and data."""
    key = item.split("=")[0]
    with pytest.raises(SftlabError, match=f"config key '{key}': .* is not a finite number"):
        load_config(None, C.parse_set([item]))
    assert main(["train", "--data", str(tmp_path / "x.jsonl"), "--set", item, "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a finite number" in err and "Traceback" not in err


@pytest.mark.parametrize("key, value, why", [
    ("eval_generate", -1, "must be >= 0 (0: loss only)"),  # generated for all eval examples but one
    ("ewc_samples", 0, "must be at least 1 (the Fisher is measured on them)"),  # a Fisher of no examples: no penalty at all
    ("ewc_samples", -1, "must be at least 1 (the Fisher is measured on them)"),  # all but one
    ("save_total_limit", -1, "must be >= 0 (0: keep every checkpoint)"),
    ("early_stopping_patience", -2, "must be >= 0 (0 disables)"),
    ("early_stopping_min_delta", -0.5, "must be >= 0"),
    ("max_grad_norm", -1.0, "must be >= 0 (0 disables clipping)"),
    ("seed", -1, "must be between 0 and 4294967295 (numpy's seed range)"),  # a ValueError traceback once training began
    ("seed", 2**32, "must be between 0 and 4294967295 (numpy's seed range)"),
])
def test_a_count_or_limit_out_of_range_is_one_error(key, value, why):
    """These ran as something else than asked, silently (in the comments)."""
    with pytest.raises(SftlabError) as exc:
        load_config(None, {key: value})
    assert str(exc.value) == f"config key '{key}': {value!r} {why}"
    assert getattr(load_config(None, {key: 0 if key != "ewc_samples" else 1}), key) in (0, 1)


def test_help_config_lists_allowed_values_from_the_types():
    assert "[full | lora | qlora | prefix] (default: 'lora')" in config_help()
    schema = config_schema()
    assert schema["masking"]["choices"] == list(choices(Masking))
    assert schema["learning_rate"]["type"] == "float | 'auto'" and schema["learning_rate"]["default"] == "auto"


def test_cli_flags_come_from_the_config_fields(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    flags = {a.dest: a for a in sub["train"]._actions}
    assert flags["method"].metavar == "{full,lora,qlora,prefix}" and flags["max_seq_length"].type is int
    assert flags["masking"].help.startswith(C.FIELDS["masking"].metadata["help"])
    assert main(["prepare", "--data", "x.jsonl", "--masking", "some"]) == 2
    err = capsys.readouterr().err
    assert "config key 'masking': 'some' is not one of" in err and err.count("\n") == 1


def test_one_learning_rate_table_by_method_and_size():
    assert [auto.lr_for_size(n, "full") for n in (135e6, 0.7e9, 7e9, 13e9, 70e9)] == [1e-4, 5e-5, 2e-5, 1e-5, 5e-6]
    assert [auto.lr_for_size(n, "lora") for n in (135e6, 0.7e9, 7e9, 33e9, 70e9)] == [2e-3, 5e-4, 2e-4, 1e-4, 5e-5]
    assert auto.lr_for_size(7e9, "qlora") == auto.lr_for_size(7e9, "lora") and auto.lr_for_size(7e9, "prefix") == 5e-3
    shape = shape_from_params("7B")
    for method in ("full", "lora"):  # `sftlab plan` recommends the rate `train` resolves
        rec = recommend_config(shape, TrainSetup(method=method, batch=1, seq_len=256, device="cuda"), 1e15)
        assert rec.learning_rate == auto.auto_learning_rate(shape.params, method, global_batch=1)


def test_one_and_zero_are_booleans_and_none_is_no_tracker(tmp_path):
    """`packing: 1` in YAML (an int) is true as `--set packing=1` is; `report_to: none` (transformers'
    spelling) is no tracker, not an unknown one."""
    f = tmp_path / "c.yaml"
    f.write_text("packing: 1\ngroup_by_length: 0\nreport_to: none\n")
    cfg = load_config(f, {})
    assert cfg.packing is True and cfg.group_by_length is False and cfg.report_to == []
    assert load_config(None, {"report_to": ["None"]}).report_to == []
    assert load_config(None, {"report_to": "tensorboard"}).report_to == ["tensorboard"]
    f.write_text("packing: 2\n")
    with pytest.raises(SftlabError, match="packing"):
        load_config(f, {})


def test_a_config_key_given_twice_is_one_error_naming_both_lines(tmp_path):
    """YAML keeps the last of two equal keys without a word: a config with max_seq_length twice (or a
    mixture source with two weights) would train on settings other than the user read."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max_seq_length: 512\nlearning_rate: 1e-4\nmax_seq_length: 64\n")
    with pytest.raises(SftlabError, match=r"run\.yaml:3: not valid YAML \(key 'max_seq_length' is given twice "
                                          r"\(first on line 1\)"):
        load_config(cfg)
    cfg.write_text("data:\n  - {path: a.jsonl, weight: 1, weight: 2}\n")
    with pytest.raises(SftlabError, match=r"run\.yaml:2: .*key 'weight' is given twice"):
        load_config(cfg)
    # YAML merge keys still override, as YAML means them to
    cfg.write_text("data:\n  - &src {path: a.jsonl, weight: 1}\n  - {<<: *src, path: b.jsonl}\n")
    assert load_config(cfg).data == [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl", "weight": 1}]
