"""sftlab.models: resolving names, loading tiny models, converting GGUF once, and the real default."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from sftlab import models
from sftlab.core import hub
from sftlab.core.errors import SftlabError


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SFTLAB_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------------------------------------------
# Resolving names


def test_cache_dir_honours_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "here"))
    assert models.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("SFTLAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / ".cache" / "sftlab"


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "missing.gguf", "no such model"])
def test_missing_path_is_one_line_error(name):
    with pytest.raises(SftlabError) as e:
        models.resolve_model_path(name)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"model '{name}' not found" in msg
    assert "a local HF folder, a .gguf file, or 'smollm2-135m-instruct'" in msg


def test_missing_path_under_existing_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SftlabError, match="model 'runs/typo' not found"):
        models.resolve_model_path("runs/typo")


def test_folder_without_config_json_is_rejected(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(SftlabError, match="without config.json.*weights.gguf"):
        models.resolve_model_path(str(tmp_path))


def test_hub_id_passes_through_and_fails_cleanly_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "hub_unreachable", lambda endpoint: None)  # as if the hub were reachable
    assert models.resolve_model_path("some-org/some-model") == "some-org/some-model"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SftlabError, match="model 'some-org/some-model' could not be loaded") as e:
        models.load_tokenizer("some-org/some-model")  # HF_HUB_OFFLINE=1 (conftest)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------
# Local HF folders


def test_tiny_model_loads_through_the_public_api(tiny_model_dir):
    assert models.resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    tok = models.load_tokenizer(str(tiny_model_dir))
    assert tok.is_fast
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    model = models.load_model(str(tiny_model_dir), tokenizer=tok)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config._attn_implementation == "sdpa"
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = tok.apply_chat_template([{"role": "user", "content": "hi 🙂"}], add_generation_prompt=True, return_dict=True,
                                  return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], model.config.vocab_size)
    cfg = models.model_config(str(tiny_model_dir))
    assert (cfg.vocab_size, cfg.num_hidden_layers, cfg.hidden_size) == (len(tok), 2, 64)


def _copy_with_tokenizer(src: Path, dst: Path, **token_changes) -> Path:
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    for attr, value in token_changes.items():
        setattr(tok, attr, value)
    tok.save_pretrained(dst)
    return dst


def test_pad_equal_to_eos_is_replaced_by_a_spare_token(tiny_model_dir, tmp_path):
    d = _copy_with_tokenizer(tiny_model_dir, tmp_path / "m", pad_token="<|im_end|>")
    tok = models.load_tokenizer(str(d))
    assert tok.pad_token == "<|endoftext|>"
    assert len(tok) == models.model_config(str(d)).vocab_size  # nothing added


def test_new_pad_token_is_added_and_embeddings_resized(tiny_model_dir, tmp_path):
    # eos is <|endoftext|>, the template ends turns with <|im_end|>: no spare token exists.
    d = _copy_with_tokenizer(tiny_model_dir, tmp_path / "m", eos_token="<|endoftext|>", pad_token=None, unk_token=None)
    tok = models.load_tokenizer(str(d))
    assert tok.pad_token == "<pad>" and tok.pad_token_id == len(tok) - 1
    model = models.load_model(str(d), tokenizer=tok)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert model.config.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id


def test_dtype_device_and_attention_choices(tiny_model_dir):
    m = models.load_model(str(tiny_model_dir), dtype="bf16", attn_implementation="eager")
    assert m.dtype == torch.bfloat16 and m.config._attn_implementation == "eager"
    with pytest.raises(SftlabError, match="unknown dtype 'fp7'"):
        models.load_model(str(tiny_model_dir), dtype="fp7")
    with pytest.raises(SftlabError, match="unknown attn_implementation"):
        models.load_model(str(tiny_model_dir), attn_implementation="fast")
    if not torch.cuda.is_available():
        with pytest.raises(SftlabError, match="no CUDA GPU"):
            models.load_model(str(tiny_model_dir), device="cuda")
        with pytest.raises(SftlabError, match="flash"):
            models.load_model(str(tiny_model_dir), attn_implementation="flash_attention_2")


# ---------------------------------------------------------------------------------------------------
# GGUF: a tiny GGUF written from the tiny model, converted back, must give the same logits.


def _permute(w, n_head: int):
    # llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers undoes it when loading).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(model_dir: Path, path: Path) -> None:
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    special = {a["content"] for a in tj["added_tokens"] if a["special"]}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)  # like SmolLM2's GGUF: pad == eos, which sftlab must undo
    w.add_add_bos_token(False)
    w.add_chat_template((model_dir / "chat_template.jinja").read_text())

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    _write_tiny_gguf(tiny_model_dir, path)
    return path


def test_model_config_of_gguf_reads_metadata_without_converting(tiny_gguf, tmp_cache):
    cfg = models.model_config(str(tiny_gguf))
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings) == (2, 64, True)
    assert not (tmp_cache / "models").exists()


def test_gguf_is_converted_once_and_matches_the_source(tiny_model_dir, tiny_gguf, tmp_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(models.resolve_model_path(str(tiny_gguf)))
    assert path.parent == tmp_cache / "models"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in path.iterdir()}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    stamp = (path / "sftlab_conversion.json").stat().st_mtime_ns
    assert models.resolve_model_path(str(tiny_gguf)) == str(path)  # cached: not converted again
    assert (path / "sftlab_conversion.json").stat().st_mtime_ns == stamp

    model = models.load_model(str(tiny_gguf))
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    x = torch.tensor([[1, 5, 70, 200, 2, 0, 383]])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, source(x).logits, rtol=1e-5, atol=1e-5)
    assert model.generation_config.eos_token_id == 2

    tok = models.load_tokenizer(str(tiny_gguf))
    ref = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert tok.chat_template == ref.chat_template
    text = "<|im_start|>user\nünïcödé 日本語 🙂 hello world\n<|im_end|>\n"
    assert tok(text).input_ids == ref(text).input_ids
    assert tok.decode(tok(text).input_ids) == text
    # tokenizer.ggml.pre = "smollm" splits every digit, as llama.cpp and the original SmolLM2 do
    # (transformers alone would not); the tiny source tokenizer has digit merges, so they differ here.
    assert tok.tokenize("in 2024") == ["in", "Ġ", "2", "0", "2", "4"]
    assert ref.tokenize("in 2024") != tok.tokenize("in 2024")


def test_gguf_conversion_says_one_line_and_shows_no_progress_bar(tiny_gguf, tmp_cache, capfd):
    """`sftlab eval x.gguf` printed transformers' "Converting and de-quantizing GGUF tensors" tqdm bar (a
    plain tqdm that disable_progress_bar does not reach) and weight-loading bars, and no line of sftlab's."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bar, before = gguf_utils.tqdm, hf_logging.is_progress_bar_enabled()
    for enabled in (True, False):  # as a library caller has them (on), and as the CLI sets them (off)
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        shutil.rmtree(tmp_cache, ignore_errors=True)
        capfd.readouterr()
        models.resolve_model_path(str(tiny_gguf))
        out, err = capfd.readouterr()
        assert out == "" and err == ("sftlab: converting tiny.gguf to safetensors once "
                                     "(about 20 s; later loads take about a second)\n")
        assert hf_logging.is_progress_bar_enabled() == enabled and gguf_utils.tqdm is bar  # restored
    models.resolve_model_path(str(tiny_gguf))  # converted: no line at all
    assert capfd.readouterr() == ("", "")
    (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def test_concurrent_conversions_share_one_folder(tiny_gguf, tmp_cache):
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(models.resolve_model_path(str(tiny_gguf))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    folders = [p for p in (tmp_cache / "models").iterdir() if p.is_dir()]
    assert [p.name for p in folders] == [Path(results[0]).name]


def test_broken_gguf_is_a_clean_error(tmp_path, tmp_cache):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(SftlabError, match="cannot read GGUF file .*bad.gguf"):
        models.resolve_model_path(str(bad))
    assert not [p for p in (tmp_cache / "models").iterdir() if p.is_dir()]  # no half-written folder


# ---------------------------------------------------------------------------------------------------
# The real default model (converted once into ~/.cache/sftlab, or $SFTLAB_CACHE)


@pytest.mark.slow
def test_default_model_converts_loads_and_stops_at_im_end():
    tok = models.load_tokenizer(models.DEFAULT_MODEL)
    model = models.load_model(models.DEFAULT_MODEL, tokenizer=tok, device="cpu")
    for cfg in (models.model_config(models.DEFAULT_MODEL), model.config):
        assert (cfg.vocab_size, cfg.num_hidden_layers, cfg.hidden_size) == (49152, 30, 576)
        assert cfg.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert "<|im_start|>" in tok.chat_template and "<|im_end|>" in tok.chat_template
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != im_end
    eos = model.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])

    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=64, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    assert new[-1] == im_end and len(new) < 64
    assert "Paris" in tok.decode(new)


def test_gguf_next_to_hf_files_is_read_from_the_gguf_alone(tiny_model_dir, tiny_gguf, tmp_path, tmp_cache):
    # `sftlab export --merge --gguf` writes the GGUF beside the HF files (tokenizer.json, config.json, ...).
    # transformers then built the tokenizer from the folder's tokenizer.json and lost the chat template
    # and eos: `sftlab chat OUT/model-f16.gguf` failed with "has no chat template" and would not stop.
    out = tmp_path / "export"
    shutil.copytree(tiny_model_dir, out)
    shutil.copy(tiny_gguf, out / "model-f16.gguf")
    from transformers import AutoTokenizer

    tok = models.load_tokenizer(str(out / "model-f16.gguf"))
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    assert tok.eos_token == "<|im_end|>"
    assert models.load_model(str(out / "model-f16.gguf")).generation_config.eos_token_id == 2


def test_a_model_without_sdpa_loads_by_default_and_refuses_sdpa_in_one_line(tmp_path):
    """Gemma 2 has no sdpa: load_model forced "sdpa" when no attention was asked, so every Gemma 2 failed to
    load, and an explicit sdpa was a ValueError traceback."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   sliding_window=4)).save_pretrained(str(tmp_path))
    model = models.load_model(str(tmp_path), device="cpu")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(SftlabError, match="does not support an attention implementation") as err:
        models.load_model(str(tmp_path), device="cpu", attn_implementation="sdpa")
    assert "\n" not in str(err.value) and "attn_implementation=auto" in err.value.hint
