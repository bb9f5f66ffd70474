"""The special tokens a model needs right: a pad token that is not an end-of-turn token, the ids that stop
generation, and embeddings that cover a token the tokenizer had to add. Shared by loading (models.py)
and the one-time GGUF conversion (gguf_cache.py)."""

from __future__ import annotations

from typing import Any

# Tokens that chat templates use to end a turn. The pad token must never be one of them (see ensure_pad).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eom_id|>")
# Existing tokens that make a good pad, best first; a new "<pad>" is added only if none exists.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]", "<|endoftext|>", "<|end_of_text|>")


def ensure_pad(tok: Any) -> bool:
    """Give ``tok`` a pad token that is neither eos nor an end-of-turn token; True if one was added.

    Labels are computed by position (sftlab.data.masking), so pad == eos would not corrupt them there;
    but any code that masks ``input_ids == pad_token_id`` (common collators, attention masks rebuilt
    from ids) would then also hide the real end-of-turn token, and the model would never learn to stop.
    Keeping them distinct removes that trap. An existing spare token is preferred to adding one,
    because a new token needs a new (untrained) embedding row.
    """
    vocab = tok.get_vocab()
    forbidden = {t for t in (tok.eos_token, *END_OF_TURN) if t}
    current = tok.pad_token
    if current is not None and current not in forbidden:
        return False
    for candidate in (*PAD_CANDIDATES, tok.unk_token):
        if candidate and candidate in vocab and candidate not in forbidden:
            tok.pad_token = candidate
            return False
    tok.add_special_tokens({"pad_token": "<pad>"})
    return True


def stop_ids(tok: Any) -> int | list[int]:
    """eos plus any end-of-turn token the chat template uses (e.g. <|im_end|>), for generation."""
    ids: list[int] = [] if tok.eos_token_id is None else [tok.eos_token_id]
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    vocab = tok.get_vocab()
    for t in END_OF_TURN:
        if t in template and t in vocab and vocab[t] not in ids:
            ids.append(vocab[t])
    return ids[0] if len(ids) == 1 else ids


def match_tokenizer(model: Any, tok: Any) -> None:
    """Resize embeddings if the tokenizer grew (a new pad token), and record its pad id on the model."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        # Mean-initialised new rows; the pad row only ever sits under attention_mask == 0 and label -100.
        model.resize_token_embeddings(len(tok), mean_resizing=True)
    if tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tok.pad_token_id
