"""GGUF export: a Llama model and its byte-level BPE tokenizer as a llama.cpp GGUF file with the chat template.

Written by hand (with gguf-py's writer and tensor-name map) because transformers only reads GGUF; this is
what llama.cpp's convert_hf_to_gguf.py does for a Llama with a byte-level BPE vocab. Used by
:func:`sftlab.export.export_run` (``gguf=True``); :func:`write_gguf` stays importable from :mod:`sftlab.export`.
"""

from __future__ import annotations

import json
from pathlib import Path

from sftlab.core.errors import SftlabError

GGUF_DTYPES = ("f16", "f32")


def _permute_qk(w, n_head: int):
    """llama.cpp's LlamaModel.permute: HF's rotate-half layout of q/k rows -> GGML's interleaved one."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_pre(tok_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer (regex split) of a byte-level BPE tokenizer."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    return "default"


def _gguf_vocab(writer, tokenizer, n_vocab: int, end_of_turn: str | None) -> None:
    import gguf  # deferred: heavy library, imported on first use

    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE" or (tok_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise SftlabError("GGUF export supports byte-level BPE tokenizers (GPT-2 style) only; this one is "
                          f"{model.get('type')}", hint="export with --merge and convert with llama.cpp's convert_hf_to_gguf.py")
    if len(tokenizer) > n_vocab:
        raise SftlabError(f"the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embedding rows")
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:  # embedding rows with no token (padded vocab), as llama.cpp names them
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_gguf_pre(tok_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = tokenizer("a")["input_ids"]
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(tid)
    eot = tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None
    if eot is not None and eot != tokenizer.eos_token_id:
        writer.add_eot_token_id(eot)
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(ids) and ids[-1] == tokenizer.eos_token_id and len(ids) > 1)


def write_gguf(model, tokenizer, chat_template: str, path: str | Path, *, dtype: str = "f16",
               name: str | None = None, end_of_turn: str | None = None) -> Path:
    """Write a Llama model (full weights) as a llama.cpp GGUF file carrying ``chat_template``.

    Tensors get llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm, output unless tied);
    q/k rows are permuted as llama.cpp expects. 2-D weights in ``dtype`` (f16/f32), norms in f32.
    """
    import gguf  # deferred: heavy library, imported on first use
    import numpy as np  # deferred: heavy library, imported on first use
    import torch  # deferred: heavy library, imported on first use

    cfg = model.config
    if cfg.model_type != "llama":
        raise SftlabError(f"GGUF export supports Llama-architecture models only, not '{cfg.model_type}'",
                          hint="export with --merge and convert with llama.cpp's convert_hf_to_gguf.py")
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise SftlabError(f"GGUF export does not support rope type '{rope_type}' yet",
                          hint="export with --merge and convert with llama.cpp's convert_hf_to_gguf.py")
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    n_vocab = model.get_input_embeddings().weight.shape[0]

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name or "sftlab-export")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0)))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    _gguf_vocab(writer, tokenizer, n_vocab, end_of_turn)
    writer.add_chat_template(chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for key, t in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise SftlabError(f"GGUF export: no llama.cpp name for tensor '{key}'")
        data = t.detach().to(torch.float32).cpu().numpy()
        if key.endswith("q_proj.weight"):
            data = _permute_qk(data, n_head)
        elif key.endswith("k_proj.weight"):
            data = _permute_qk(data, n_kv)
        data = data.astype(np.float16 if dtype == "f16" and data.ndim > 1 else np.float32)
        writer.add_tensor(new, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
