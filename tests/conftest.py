"""Shared fixtures. Nothing here touches the network: the hub is switched off for the whole run."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # set before transformers is imported anywhere
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from sftlab.config import Config, load_config  # noqa: E402
from sftlab.data.types import Conversation, Message  # noqa: E402

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




# --- shared builders: data, configs, run folders ---------------------------------------------


def random_text(rng: random.Random) -> str:
    pieces = ["hello", "World", " ", "  ", "\n", "\n\n", "ünïcödé", "日本語", "🙂", "{\"a\": 1}", "x", "42", ".",
              "tab\there", "Paris", "###", "USER:", "the end"]
    s = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
    return s if s.strip() else s + "ok"


def random_conversations(seed: int = 0, n: int = 25):
    """Chat conversations of random hard text (unicode, blank lines, look-alike markers), 1-3 turns."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.4:
            msgs.append(Message("system", random_text(rng)))
        for _ in range(rng.randint(1, 3)):
            msgs += [Message("user", random_text(rng)), Message("assistant", random_text(rng))]
        convs.append(Conversation(msgs))
    return convs


COHERE_LIKE = (
    "{% for m in messages %}<|START_OF_TURN_TOKEN|>{{ m.role }}: "
    "{% if m.role == 'assistant' %}{{ m.content }}<|END_RESPONSE|>{% else %}{{ m.content }}{% endif %}"
    "<|END_OF_TURN_TOKEN|>{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|>assistant: {% endif %}"
)


def chat_data(path: Path, n: int, offset: int = 0) -> str:
    """``n`` one-turn arithmetic chats (messages format) written to ``path``; returns the path."""
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(offset, offset + n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class PlainFusedCE:
    """What a fused linear cross entropy (liger's) computes, written plainly, counting its calls;
    ``scale`` != 1 makes it wrong on purpose."""

    def __init__(self, scale=1.0):
        self.calls, self.scale = 0, scale

    def __call__(self, h, weight, bias, target, label_smoothing):
        import torch.nn.functional as F

        self.calls += 1
        logits = F.linear(h, weight, bias).float()
        return self.scale * F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)


def train_config(tmp_path, tiny_model_dir, **kw):
    """A full fine-tune of the tiny model on 16 arithmetic chats, fp32, one epoch; ``kw`` overrides keys."""
    base = dict(model=str(tiny_model_dir), data=chat_data(tmp_path / "train.jsonl", 16), output_dir=str(tmp_path / "run"),
                method="full", epochs=1, batch_size=4, gradient_accumulation=1, learning_rate=1e-3,
                logging_steps=1, save_steps=100, eval_steps=100, warmup_ratio=0.0, gradient_checkpointing=False,
                lr_scheduler="constant", max_seq_length=128, precision="fp32")
    base.update(kw)
    return load_config(None, base)


def healthy_rows(steps: int = 100) -> tuple[list[dict], list[dict]]:
    """A run where everything goes right: train and eval loss fall together, nothing blows up."""
    train = []
    for s in range(10, steps + 1, 10):
        train.append({"split": "train", "step": s, "epoch": s / steps * 3, "loss": 3.0 - 1.8 * s / steps,
                      "learning_rate": 2e-4 * (1 - s / steps) + 1e-6, "grad_norm": 1.0 + 0.1 * (s % 20 == 0),
                      "tokens_per_second": 1500.0 + s, "trained_tokens_per_second": 500.0, "memory_mb": 900.0 + s / 10})
    evals = []
    for k, s in enumerate(range(20, steps + 1, 20)):
        evals.append({"split": "eval", "step": s, "epoch": s / steps * 3, "eval_loss": 2.6 - 0.25 * k,
                      "eval_perplexity": math.exp(2.6 - 0.25 * k), "general_loss": 2.0 + 0.01 * k,
                      "gen_nonempty_rate": 1.0, "gen_repetition_rate": 0.02, "gen_format_adherence": 0.9 + 0.02 * k})
    return train, evals


HEALTHY_SUMMARY = {
    "method": "lora", "base_model": "tiny", "template": "chatml", "steps": 100, "train_tokens": 50000,
    "trained_tokens": 20000, "time_s": 60.0, "tokens_per_second": 1500.0, "peak_memory_mb": 1000.0,
    "final_train_loss": 1.2, "final_eval_loss": 1.6, "best_eval_loss": 1.6, "stopped": "completed", "divergence": None,
    "prepare": {"n_input": 100, "n_kept": 100, "n_dropped_too_long": 0, "n_dropped_no_trained": 0, "n_truncated": 0,
                "n_turns_cut": 0, "eos_appended": False, "dropped": []},
    "pad_equals_eos": False, "eos_trained": True,
}


def make_run(path: Path, *, train=None, evals=None, summary=None, tokenizer_from: Path | None = None,
             lora_from: Path | None = None, seed: int = 1, **cfg) -> Path:
    """The one run-folder factory: a folder as `sftlab train` leaves it.

    Always config.yaml, metrics.jsonl (``train``/``evals`` rows, default a healthy run), summary.json
    (``summary``, default a healthy one; ``False``: none) and model/. ``tokenizer_from`` saves that
    tokenizer into model/ (diagnose needs no weights). ``lora_from`` (a model folder) makes it a real
    LoRA run of that base: an adapter that changes the logits (seeded) and the tokenizer carrying the
    ChatML template used in training.
    """
    h_train, h_evals = healthy_rows()
    path.mkdir(parents=True, exist_ok=True)
    base = {"model": str(lora_from) if lora_from else "tiny", "template": "chatml", "data": "train.jsonl",
            "learning_rate": 2e-4, "method": "lora", "max_seq_length": 256}
    Config(output_dir=str(path), **{**base, **cfg}).save(path / "config.yaml")
    rows = (h_train if train is None else train) + (h_evals if evals is None else evals)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not False:
        (path / "summary.json").write_text(json.dumps(copy.deepcopy(HEALTHY_SUMMARY) if summary is None else summary))
    (path / "model").mkdir(exist_ok=True)
    if lora_from is not None:
        _save_lora(path / "model", lora_from, seed)
    elif tokenizer_from is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path / "model")
    return path


def _save_lora(out: Path, base_dir: Path, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.data.templates import BUILTIN

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.chat_template = BUILTIN["chatml"][0]
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out)
    tok.save_pretrained(out)


def make_lora_run(run: Path, tiny_model_dir: Path, seed: int = 1, **kw) -> Path:
    """:func:`make_run` of a real LoRA run of ``tiny_model_dir``."""
    return make_run(run, lora_from=tiny_model_dir, seed=seed, **kw)
