"""Shared fixtures. Nothing here touches the network: the hub is switched off for the whole run."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # set before transformers is imported anywhere
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Same ids as SmolLM2: <|endoftext|> = 0, <|im_start|> = 1, <|im_end|> = 2.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "Maria Lopez, 34, ordered 3 lamps from Berlin on 2024-05-03.",
    'Extract the fields as JSON: {"name": "Maria Lopez", "age": 34, "city": "Berlin"}',
    '{"item": "lamp", "quantity": 3, "date": "2024-05-03"}',
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n2 + 2 = 4.<|im_end|>\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "hello world, hello there; the end of the story.",
    "alpha beta gamma delta json 42 Paris hello",
    "tab\there\nnew line\n\nspaces  and   more spaces",
    "ünïcödé text, 日本語のテキスト, emoji 🙂 and symbols ### USER: ASSISTANT:",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 2023 2024 3.14",
    "The quick brown fox jumps over the lazy dog.",
]


def build_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE fast tokenizer (decode(encode(x)) == x for any text), trained in milliseconds."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets keep their leading space
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tk.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=512,
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_model(vocab_size: int, seed: int = 0):
    """A random 2-layer Llama (hidden 64, 4 heads, 2 kv heads, tied embeddings, like SmolLM2)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random LlamaForCausalLM + byte-level BPE tokenizer with a ChatML template.

    Special tokens as in SmolLM2: <|endoftext|> (0, pad and unk), <|im_start|> (1, bos), <|im_end|>
    (2, eos). Treat the folder as read-only; copy it to change it.
    """
    out = tmp_path_factory.mktemp("tiny_model")
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok))
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def make_lora_run(run: Path, tiny_model_dir: Path, seed: int = 1) -> Path:
    """A run folder as training leaves it: config.yaml + model/ (LoRA adapter that changes the logits,
    and the tokenizer carrying the ChatML template used in training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.config import Config
    from sftlab.data.templates import BUILTIN
    from sftlab.rundir import RunDir

    rd = RunDir(run)
    Config(model=str(tiny_model_dir), method="lora", template="chatml").save(rd.config_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = BUILTIN["chatml"][0]
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(rd.model_dir)
    tok.save_pretrained(rd.model_dir)
    return run
