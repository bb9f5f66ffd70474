"""`sftlab export`: adapter / merged / GGUF round trips, the template check, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_lora_run

from sftlab.cli import main
from sftlab.config import Config
from sftlab.core.errors import SftlabError
from sftlab.data.consistency import check_template_consistency
from sftlab.data.templates import BUILTIN, ChatTemplate
from sftlab.data.types import Conversation, Message
from sftlab.export import export_run, write_gguf
from sftlab.rundir import RunDir

CHATML = BUILTIN["chatml"][0]
MSGS = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And 3 + 3?"}]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir) -> Path:
    return make_lora_run(tmp_path_factory.mktemp("lora_run"), tiny_model_dir)


@pytest.fixture(scope="module")
def exports(lora_run, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("exports")
    adapter = export_run(lora_run, root / "adapter")
    merged = export_run(lora_run, root / "merged", merge=True, gguf=True, gguf_dtype="f32")
    return {"adapter": adapter, "merged": merged}


def _run_logits(run: Path) -> tuple[list[int], torch.Tensor]:
    model, tok, _ = RunDir(run).load_model(device="cpu", dtype="fp32")
    text = ChatTemplate("chatml", CHATML).render([Message(**m) for m in MSGS], add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return ids, model(input_ids=torch.tensor([ids])).logits[0]


# Runs in a fresh interpreter: plain transformers + peft, and it fails if sftlab gets imported.
_PLAIN_LOAD = textwrap.dedent("""
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, merged_dir, out = sys.argv[1:4]
    msgs = json.loads(sys.argv[4])
    res = {}
    for kind, d in (("adapter", adapter_dir), ("merged", merged_dir)):
        tok = AutoTokenizer.from_pretrained(d)
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        if kind == "adapter":
            base = json.load(open(d + "/adapter_config.json"))["base_model_name_or_path"]
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), d)
        else:
            model = AutoModelForCausalLM.from_pretrained(d)
        with torch.no_grad():
            logits = model(ids).logits[0].tolist()
        eos = json.load(open(d + "/generation_config.json"))["eos_token_id"]
        res[kind] = {"text": text, "ids": ids[0].tolist(), "logits": logits, "eos": eos}
    assert not [m for m in sys.modules if m == "sftlab" or m.startswith("sftlab.")]
    json.dump(res, open(out, "w"))
""")


def test_export_loads_back_with_plain_transformers_and_peft(exports, lora_run, tmp_path):
    out = tmp_path / "plain.json"
    subprocess.run([sys.executable, "-c", _PLAIN_LOAD, str(exports["adapter"].out), str(exports["merged"].out),
                    str(out), json.dumps(MSGS)], check=True, timeout=300)
    got = json.loads(out.read_text())
    ids, ref = _run_logits(lora_run)
    expected_text = ChatTemplate("chatml", CHATML).render([Message(**m) for m in MSGS], add_generation_prompt=True)
    for kind in ("adapter", "merged"):
        assert got[kind]["text"] == expected_text  # the exact training template travels with the export
        assert got[kind]["ids"] == ids
        assert 2 in np.atleast_1d(got[kind]["eos"])  # <|im_end|> stops generation
        np.testing.assert_allclose(np.array(got[kind]["logits"]), ref.numpy(), atol=1e-4)
    for res in exports.values():
        assert res.max_logit_diff is not None and res.max_logit_diff < 1e-4
        assert res.end_of_turn == "<|im_end|>" and res.template_problems == []
    cfg = json.loads((exports["merged"].out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHATML  # written into the tokenizer's config
    assert (exports["merged"].out / "model.safetensors").exists()
    assert (exports["adapter"].out / "adapter_model.safetensors").exists()
    assert not (exports["adapter"].out / "model.safetensors").exists()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_exports_are_readable_by_others(exports):
    import os

    umask = os.umask(0)
    os.umask(umask)
    for res in exports.values():
        paths = [res.out, *res.out.rglob("*")]
        assert {p.name: os.stat(p).st_mode & 0o777 for p in paths} == {
            p.name: (0o777 if p.is_dir() else 0o666) & ~umask for p in paths}
        assert any(p.suffix == ".safetensors" for p in paths)  # safetensors writes these 0600


def test_gguf_carries_template_and_tensors(exports):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = exports["merged"]
    reader = GGUFReader(str(res.gguf))
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML
    assert reader.fields["general.architecture"].contents() == "llama"
    tok = AutoTokenizer.from_pretrained(res.out)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and len(tokens) == len(tok)
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id

    merged = AutoModelForCausalLM.from_pretrained(res.out)
    cfg, sd = merged.config, merged.state_dict()
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    expected = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    for i in range(cfg.num_hidden_layers):
        for gg, hf in (("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                       ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                       ("ffn_norm", "post_attention_layernorm"), ("ffn_gate", "mlp.gate_proj"),
                       ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            expected[f"blk.{i}.{gg}.weight"] = f"model.layers.{i}.{hf}.weight"
    assert set(tensors) == set(expected)  # tied embeddings: no output.weight
    for gg, hf in expected.items():
        data = tensors[gg]
        if ".attn_q." in gg:
            data = _unpermute(data, cfg.num_attention_heads)
        elif ".attn_k." in gg:
            data = _unpermute(data, cfg.num_key_value_heads)
        np.testing.assert_array_equal(data, sd[hf].numpy(), err_msg=gg)

    # transformers reads GGUF too (undoing llama.cpp's q/k permutation): same logits as the merged export.
    back = AutoModelForCausalLM.from_pretrained(res.out, gguf_file=res.gguf.name)
    ids = torch.tensor([tok("hello world", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, merged(ids).logits, atol=1e-5, rtol=0)


def test_write_gguf_f16(tiny_model_dir, tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = write_gguf(model, tok, CHATML, tmp_path / "m.gguf", dtype="f16")
    types = {t.name: t.tensor_type for t in GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.F16
    assert types["output_norm.weight"] == GGMLQuantizationType.F32


def test_export_cli_json_and_force(lora_run, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", str(lora_run), "--out", str(out), "--no-verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "adapter" and report["stop_token_ids"] == [2] and "sftlab_export.json" in report["files"]
    assert main(["export", str(lora_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sftlab export: error:") and "already exists" in err and "--force" in err and "\n" not in err
    assert main(["export", str(lora_run), "--out", str(out), "--force", "--no-verify"]) == 0
    assert "exported lora run" in capsys.readouterr().out


def test_export_refuses_bad_input(lora_run, tiny_model_dir, tmp_path):
    empty = tmp_path / "no_model"
    empty.mkdir()
    Config(model=str(tiny_model_dir), method="lora").save(empty / "config.yaml")
    with pytest.raises(SftlabError, match="no model/ folder"):
        export_run(empty, tmp_path / "o1")

    full = tmp_path / "full_run"
    shutil.copytree(tiny_model_dir, full / "model")
    Config(model=str(tiny_model_dir), method="full").save(full / "config.yaml")
    with pytest.raises(SftlabError, match="nothing to merge"):
        export_run(full, tmp_path / "o2", merge=True)

    prefix = tmp_path / "prefix_run"
    (prefix / "model").mkdir(parents=True)
    Config(model=str(tiny_model_dir), method="prefix").save(prefix / "config.yaml")
    (prefix / "model" / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(SftlabError, match="nothing to merge"):
        export_run(prefix, tmp_path / "o3", merge=True)
    with pytest.raises(SftlabError, match="GGUF"):
        export_run(prefix, tmp_path / "o3", gguf=True)

    with pytest.raises(SftlabError, match="add --merge"):
        export_run(lora_run, tmp_path / "o4", gguf=True)
    with pytest.raises(SftlabError, match="would replace the run"):
        export_run(lora_run, lora_run / "model", force=True)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_template_consistency():
    for name in ("chatml", "llama3", "mistral", "alpaca", "vicuna"):
        tpl = ChatTemplate(name, BUILTIN[name][0], special={"bos_token": "<s>", "eos_token": "</s>"})
        assert check_template_consistency(tpl) == [], name
    assert check_template_consistency(CHATML) == []  # a jinja string works too

    # Training renders the assistant header with a space the generation prompt lacks.
    bad = CHATML.replace("<|im_start|>{{ m.role }}", "<|im_start|>{{ m.role }}{% if m.role == 'assistant' %} {% endif %}")
    conv = Conversation([Message("user", "hi"), Message("assistant", "hello")], source="data.jsonl", line=3)
    problems = check_template_consistency(bad, [conv])
    assert len(problems) == 1
    assert problems[0].startswith("data.jsonl:3, assistant turn 1:") and "differ at character 51" in problems[0]
    # the excerpts: 20 characters before the difference and 25 from it, of both texts
    assert "inference '|im_start|>assistant\\n' vs training '|im_start|>assistant \\nhello<|im_end|>\\n'" in problems[0]

    # Prefix holds but the reply does not follow it verbatim (an extra newline is trained before it).
    shifted = CHATML.replace("{{ m.content }}", "{% if m.role == 'assistant' %}{{ '\\n' }}{% endif %}{{ m.content }}")
    problems = check_template_consistency(shifted, [[Message("user", "hi"), Message("assistant", "hello")]])
    assert len(problems) == 1 and "does not follow the inference prompt verbatim" in problems[0]


# --- tools and template options ------------------------------------------------------------------

THINKING = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def test_template_options_become_the_exports_defaults():
    from conftest import build_tiny_tokenizer

    from sftlab.export import template_with_defaults

    tok = build_tiny_tokenizer()
    msgs = [{"role": "user", "content": "hi"}]

    def render(src, **kw):
        tok.chat_template = src
        return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **kw)

    baked = template_with_defaults(THINKING, {"enable_thinking": False, "names": ["a", "b"], "note": None})
    assert render(baked) == render(THINKING, enable_thinking=False) != render(THINKING)
    assert render(baked).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render(baked, enable_thinking=True) == render(THINKING, enable_thinking=True)  # still overridable
    assert template_with_defaults(THINKING, {}) == THINKING
    with pytest.raises(SftlabError, match="can not be a template option"):
        template_with_defaults(THINKING, {"messages": 1})


def test_export_renders_a_tool_conversation_exactly_as_training(tmp_path, tiny_model_dir):
    """A run trained with a tool template: plain transformers renders tools, calls and results as sftlab did."""
    from tool_data import HERMES, TOOLS, weather_conv
    from transformers import AutoTokenizer

    run = make_lora_run(tmp_path / "run", tiny_model_dir)
    rd = RunDir(run)
    cfg = rd.config()
    cfg.template = None  # the tokenizer's own: the Hermes template saved with it
    cfg.save(rd.config_path)
    tok = AutoTokenizer.from_pretrained(rd.model_dir)
    tok.chat_template = HERMES
    tok.save_pretrained(rd.model_dir)
    res = export_run(run, tmp_path / "out", verify=False)
    exported = AutoTokenizer.from_pretrained(str(res.out))
    train_tpl = RunDir(run).template(tok)
    for conv in (weather_conv(city="Zürich <it's> & \"co\""), weather_conv(answered=False)):
        msgs = [m.to_template() for m in conv.messages]
        ours = train_tpl.render(conv.messages, tools=TOOLS)
        theirs = exported.apply_chat_template(msgs, tools=TOOLS, tokenize=False)
        assert ours == theirs and "<tool_call>" in ours and "<tools>" in ours
        prompt = exported.apply_chat_template(msgs[:1], tools=TOOLS, tokenize=False, add_generation_prompt=True)
        assert prompt == train_tpl.render(conv.messages[:1], add_generation_prompt=True, tools=TOOLS)


def test_export_and_eval_use_the_runs_template_options(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from sftlab.eval.run import load_target

    run = make_lora_run(tmp_path / "run", tiny_model_dir)
    rd = RunDir(run)
    cfg = rd.config()
    cfg.template, cfg.chat_template_kwargs = None, {"enable_thinking": False}
    cfg.save(rd.config_path)
    tok = AutoTokenizer.from_pretrained(rd.model_dir)
    tok.chat_template = THINKING
    tok.save_pretrained(rd.model_dir)
    res = export_run(run, tmp_path / "out", verify=False)
    assert res.chat_template_kwargs == {"enable_thinking": False}
    exported = AutoTokenizer.from_pretrained(str(res.out))
    _, _, tpl, _ = load_target(str(run), device="cpu")
    msgs = [Message("user", "hi")]
    train_text = ChatTemplate("t", THINKING, kwargs={"enable_thinking": False}).render(msgs, add_generation_prompt=True)
    assert train_text.endswith("<think>\n\n</think>\n\n")
    assert tpl.render(msgs, add_generation_prompt=True) == train_text  # eval renders as training did
    assert exported.apply_chat_template([m.to_template() for m in msgs], add_generation_prompt=True,
                                        tokenize=False) == train_text
    assert '"enable_thinking": false' in (res.out / "README.md").read_text()


def test_adapter_export_of_the_default_model_loads_offline_from_its_adapter_config(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):
    """adapter_config.json named the hub id HuggingFaceTB/SmolLM2-135M-Instruct, which plain peft can not
    resolve offline (and whose unquantized weights are not the ones the adapter trained on). It names the
    exact base on this machine now; sftlab_export.json keeps the run's model name, from which sftlab loads
    the export where that folder is gone (another machine)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import sftlab.eval.exports as er
    import sftlab.export as ex
    import sftlab.rundir as rd
    from sftlab import models
    from sftlab.chat import load_chat_model
    from sftlab.export import format_export

    run = make_lora_run(tmp_path / "run", tiny_model_dir)
    cfg = RunDir(run).config()
    cfg.model = models.DEFAULT_MODEL
    cfg.save(RunDir(run).config_path)
    # the tiny model stands in for this machine's de-quantized copy of the default model's GGUF
    here = lambda name: str(tiny_model_dir) if name == models.DEFAULT_MODEL else name  # noqa: E731
    monkeypatch.setattr(ex, "resolve_model_path", lambda name, **kw: here(name))
    real = rd.load_model
    monkeypatch.setattr(rd, "load_model", lambda name, **kw: real(here(name), **kw))
    res = export_run(run, tmp_path / "exp")  # its check loads the export back on the exact base
    exact = str(tiny_model_dir.resolve())
    named = json.loads((res.out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == exact == res.base_model and res.base_source == models.DEFAULT_MODEL
    assert res.max_logit_diff is not None and res.max_logit_diff < 1e-3
    ids, want = _run_logits(run)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(named), str(res.out)).eval()
    with torch.no_grad():  # plain peft, from adapter_config alone, offline: the run's model
        assert torch.allclose(plain(input_ids=torch.tensor([ids])).logits[0], want, atol=1e-4)
    readme = (res.out / "README.md").read_text()
    assert f"from_pretrained({exact!r})" in readme and models.DEFAULT_MODEL_HUB_ID in readme and "--merge" in readme
    assert "the exact base the run trained on" in format_export(res)
    assert json.loads((res.out / "sftlab_export.json").read_text())["base_source"] == models.DEFAULT_MODEL
    # elsewhere the cached copy is not there: sftlab loads the base from the run's model name
    moved = tmp_path / "moved"
    shutil.copytree(res.out, moved)
    acfg = json.loads((moved / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(tmp_path / "gone" / "smollm2-135m-instruct.q4_1")
    (moved / "adapter_config.json").write_text(json.dumps(acfg))
    real_er = er.load_model
    monkeypatch.setattr(er, "load_model", lambda name, **kw: real_er(here(name), **kw))
    for folder in (res.out, moved):
        model, tok, _ = load_chat_model(str(folder), device="cpu")
        with torch.no_grad():
            assert torch.allclose(model(input_ids=torch.tensor([ids])).logits[0], want, atol=1e-4)


def _prefix_run(path: Path, tiny_model_dir: Path) -> Path:
    """A prefix-tuning run folder of the tiny model whose (scaled random) prefix changes its replies."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = CHATML
    torch.manual_seed(4)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.mul_(30)
    model.save_pretrained(path / "model")
    tok.save_pretrained(path / "model")
    Config(model=str(tiny_model_dir), method="prefix", template="chatml", output_dir=str(path)).save(path / "config.yaml")
    return path


def _greedy(model, ids, n: int) -> list[int]:
    out = ids
    with torch.no_grad():
        for _ in range(n):
            out = torch.cat([out, model(input_ids=out).logits[:, -1:].argmax(-1)], 1)
    return out[0, ids.shape[1]:].tolist()


def test_a_prefix_export_generates_with_its_prefix_or_is_refused(tmp_path, tiny_model_dir, capsys):
    """peft 0.21's generate() with transformers 5 drops the prefix (the model reads the new `cache`
    argument, peft injects the deprecated `past_key_values`): the export served the base model while
    its one-forward-pass check passed. Where plain peft generation ignores the prefix, export refuses
    in one line and writes nothing; where it uses it, the export generates what the prefix model says."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = _prefix_run(tmp_path / "run", tiny_model_dir)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run / "model")).eval()
    tok = AutoTokenizer.from_pretrained(run / "model")
    ids = tok(tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False), add_special_tokens=False,
              return_tensors="pt").input_ids
    with torch.no_grad():
        generated = plain.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    manual = _greedy(plain, ids, 6)
    with plain.disable_adapter():
        assert _greedy(plain, ids, 6) != manual  # the prefix changes the reply
    if generated.tolist() != manual:  # this peft/transformers pair's generate() ignores the prefix
        with pytest.raises(SftlabError, match="ignores this prefix adapter") as err:
            export_run(run, tmp_path / "exp")
        assert "\n" not in str(err.value) and "sftlab chat" in err.value.hint
        assert not (tmp_path / "exp").exists()
        assert main(["export", str(run), "--out", str(tmp_path / "exp")]) != 0
        assert "ignores this prefix adapter" in capsys.readouterr().err
    else:
        out = export_run(run, tmp_path / "exp").out
        back = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
        with torch.no_grad():
            assert back.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6,
                                 do_sample=False)[0, ids.shape[1]:].tolist() == manual


def test_an_export_renders_openai_string_arguments_as_training_did(tmp_path, tiny_model_dir):
    """OpenAI messages carry a call's arguments as a JSON string; training decodes them, but the export's
    chatml-tools template wrote them through tojson again: "arguments": "{\\"city\\": ...}" at inference."""
    from tool_data import TOOLS, call, weather_conv
    from transformers import AutoTokenizer

    run = make_lora_run(tmp_path / "run", tiny_model_dir, template="chatml-tools")
    res = export_run(run, tmp_path / "out", verify=False)
    exported = AutoTokenizer.from_pretrained(str(res.out))
    conv = weather_conv()
    msgs = [m.to_template() for m in conv.messages]
    msgs[1]["tool_calls"] = [call("get_weather", '{"city": "Paris", "unit": "celsius"}')]  # as the OpenAI API sends it
    ours = RunDir(run).template(exported).render(conv.messages, tools=TOOLS)
    assert '"arguments": {"city": "Paris", "unit": "celsius"}}' in ours
    assert exported.apply_chat_template(msgs, tools=TOOLS, tokenize=False) == ours


def test_adapter_export_of_a_hub_model_names_its_hub_id(tmp_path, tiny_model_dir):
    """Offline, sftlab finds a hub id in the hub cache: adapter_config.json named that snapshot folder (this
    machine's cache path) instead of the hub id, which plain transformers also finds in the cache offline."""
    hub = tmp_path / "hub"
    snap = hub / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snap)
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("abc123")
    run = make_lora_run(tmp_path / "run", tiny_model_dir)
    cfg = RunDir(run).config()
    cfg.model = "org/tiny"
    cfg.save(RunDir(run).config_path)
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "sftlab", "export", str(run), "--out", str(tmp_path / "exp"), "--json"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout)
    assert json.loads((tmp_path / "exp" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"
    assert res["base_model"] == "org/tiny" and res["base_weights"] == str(snap) and res["max_logit_diff"] < 1e-4
    plain = textwrap.dedent("""
        import json, sys
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        d = sys.argv[1]
        base = json.load(open(d + "/adapter_config.json"))["base_model_name_or_path"]
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), d)
        print("loaded", base)
    """)
    done = subprocess.run([sys.executable, "-c", plain, str(tmp_path / "exp")], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "loaded org/tiny" in done.stdout, done.stderr[-2000:]


def test_export_readme_says_how_to_use_tools_and_reasoning(tmp_path, tiny_model_dir):
    """The export's README said nothing of the tools a run trained with (its `tools=` hint showed only with
    template options) nor of the <think> block its replies open with."""
    from tool_data import TOOLS

    rows = [{"tools": TOOLS, "messages": [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": "", "reasoning_content": "look it up", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}]}]
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = make_lora_run(tmp_path / "run", tiny_model_dir, data=str(data), template="chatml-tools")
    res = export_run(run, tmp_path / "out", verify=False)
    readme = (res.out / "README.md").read_text()
    assert res.trained_on == ["tools", "reasoning"]
    assert "tools=[...]" in readme and "<think>...</think>" in readme
    plain = export_run(make_lora_run(tmp_path / "plain", tiny_model_dir), tmp_path / "out2", verify=False)
    assert "tools=" not in (plain.out / "README.md").read_text() and plain.trained_on == []
