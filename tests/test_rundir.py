"""rundir.RunDir: the run folder's readers, the typed summary, and the one resolution of the training template."""

from __future__ import annotations

import json

import pytest

from sftlab.config import Config
from sftlab.core.errors import SftlabError
from sftlab.data.templates import BUILTIN
from sftlab.rundir import RunDir, Summary


def _run(tmp_path, template):
    run = RunDir(tmp_path / "run")
    run.model_dir.mkdir(parents=True, exist_ok=True)
    Config(model="tiny", template=template).save(run.config_path)
    return run


def test_partial_summary_reads_with_none_for_what_it_lacks(tmp_path):
    run = _run(tmp_path, None)
    run.summary_path.write_text(json.dumps({"method": "lora", "steps": 3, "unknown_key": 1}))
    s = run.summary()
    assert (s.method, s.steps, s.eos_trained, s.prepare, s.findings, s.eval) == ("lora", 3, None, {}, [], None)
    s.eval = {"kind": "single"}
    run.write_summary(s)
    back = json.loads(run.summary_path.read_text())
    assert back["eval"] == {"kind": "single"} and back["steps"] == 3 and "unknown_key" not in back
    assert run.is_run() and not RunDir(tmp_path).is_run()


@pytest.mark.parametrize("content, message", [(None, "no summary.json"), ("{oops", "damaged summary"),
                                              ("[1, 2]", "expected a JSON object")])
def test_bad_summary_is_one_clear_error(tmp_path, content, message):
    run = _run(tmp_path, None)
    if content is not None:
        run.summary_path.write_text(content)
    with pytest.raises(SftlabError, match=message):
        run.summary()


def test_metrics_split_into_sorted_curves(tmp_path):
    run = _run(tmp_path, None)
    rows = [{"split": "train", "step": 2, "loss": 1.0}, {"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.5}]
    run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    train, evals = run.curves()
    assert [r["step"] for r in train] == [1, 2] and evals == [rows[2]]
    run.metrics_path.write_text('{"step": 1}\n[1]\n')
    with pytest.raises(SftlabError, match="metrics.jsonl:2: metrics row is not a JSON object"):
        run.metrics()


def test_template_is_the_one_trained_with(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)  # saved with a ChatML template written differently
    builtin = _run(tmp_path / "a", "chatml").template(tok)
    assert builtin.source == BUILTIN["chatml"][0] and builtin.eot == "<|im_end|>"
    own = _run(tmp_path / "b", None).template(tok)
    assert own.name == "tokenizer" and own.source == tok.chat_template
    custom = _run(tmp_path / "c", str(tmp_path / "gone" / "my.jinja")).template(tok)  # the copy saved in model/
    assert custom.name == "my.jinja" and custom.source == tok.chat_template
    assert _run(tmp_path / "d", "chatml").template(tok, "alpaca").name == "alpaca"  # --template overrides
    tok.chat_template = None
    assert _run(tmp_path / "e", None).template(tok) is None  # plain text, no template anywhere


def test_saved_tokenizer_config_without_loading(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    run = _run(tmp_path, "chatml")
    assert run.saved_tokenizer_config() == (None, {k: "" for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run.model_dir)
    src, special = run.saved_tokenizer_config()
    assert "<|im_start|>" in src and special["eos_token"] == "<|im_end|>"


def test_summary_round_trips_every_field():
    s = Summary(method="lora", base_model="m", template="chatml", steps=1, epochs=1.0, examples=2, replay_examples=0,
                train_tokens=10, trained_tokens=5, time_s=1.0, tokens_per_second=10.0, trained_tokens_per_second=5.0,
                peak_memory_mb=1.0, final_train_loss=1.0, final_eval_loss=None, best_eval_loss=None, stopped="completed",
                divergence=None, prepare={"n_input": 2}, pad_equals_eos=False, eos_trained=False,
                gradient_checkpointing=False, packing=False, attention_batches=None)
    assert Summary.from_dict(s.to_dict()) == s and "eval" not in s.to_dict()
