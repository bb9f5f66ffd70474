"""Try a model: an interactive terminal chat with streamed replies, and batch generation to JSONL.

Both take a run folder (its trained model and the exact template it was trained with), an export
folder (merged, full, or an adapter alone), or any model :func:`sftlab.models.load_model` opens.
Prompts are rendered with the chat template and its generation prompt, exactly as in training
(see :func:`sftlab.data.consistency.check_template_consistency`), and a reply ends at the end-of-turn token.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from sftlab.core.errors import SftlabError
from sftlab.core.io import write_jsonl
from sftlab.data.formats import load_conversations
from sftlab.data.templates import ChatTemplate, resolve_template
from sftlab.data.types import Conversation, Message
from sftlab.eval.generation import (
    GenerationSettings,
    generate,
    prompt_messages,
    reference_reply,
    stop_token_ids,
)
from sftlab.eval.run import load_target
from sftlab.models import load_model
from sftlab.rundir import RunDir

HELP = "/reset clears the history, /exit quits (Ctrl-D too); Ctrl-C stops a reply"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars or deprecation chatter from transformers/peft while loading for a terminal UI."""
    from transformers.utils import (
        logging as hf_logging,  # deferred: heavy library, imported on first use
    )

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    bnb = logging.getLogger("bitsandbytes")  # imported by peft; warns about optional CPU kernels
    level = bnb.level
    bnb.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        bnb.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load_adapter_export(folder: Path, template: str | None, device):
    """An exported adapter: its base model (named in adapter_config.json) + the adapter + its tokenizer."""
    from peft import PeftModel  # deferred: heavy library, imported on first use
    from transformers import (
        AutoTokenizer,  # deferred: heavy library, imported on first use
    )

    try:
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (json.JSONDecodeError, KeyError):
        raise SftlabError(f"{folder}/adapter_config.json: damaged or names no base model")
    tok = AutoTokenizer.from_pretrained(str(folder))  # as exported: pad token and chat template included
    model = PeftModel.from_pretrained(load_model(base, device=device, tokenizer=tok), str(folder))
    model.eval()
    return model, tok, resolve_template(template, tok)


def load_chat_model(model_or_run: str, *, template: str | None = None, device=None) -> tuple:
    """(model, tokenizer, ChatTemplate) for a run folder, an export folder or a model name/path."""

    p = Path(model_or_run)
    with _quiet():
        if p.is_dir() and (p / "adapter_config.json").exists() and not RunDir(p).config_path.exists():
            return _load_adapter_export(p, template, device)
        model, tok, tpl, _ = load_target(model_or_run, template=template, device=device)
    if tpl is None:
        raise SftlabError(f"'{model_or_run}' has no chat template", hint="pass --template (e.g. chatml)")
    return model, tok, tpl


class _StopFlag:
    """A stopping criterion that ends generation when the user presses Ctrl-C."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()


@dataclass
class ChatSession:
    """A multi-turn conversation with one model; :meth:`send` streams a reply and keeps the history."""

    model: object
    tokenizer: object
    template: ChatTemplate
    system_prompt: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy; > 0: sampling at this temperature
    top_p: float = 1.0
    history: list[Message] = field(default_factory=list)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise SftlabError(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise SftlabError("--temperature must be >= 0 and --top-p in (0, 1]")
        self.stop_ids = stop_token_ids(self.tokenizer, self.template)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.history = [Message("system", self.system_prompt)] if self.system_prompt else []

    def prompt(self, user_text: str) -> str:
        """The text the model sees for the next reply: the history, the user turn, the generation prompt."""
        return self.template.render(self.history + [Message("user", user_text)], add_generation_prompt=True)

    def send(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Generate the reply to ``user_text``, calling ``on_text`` with each decoded piece as it comes.

        The turn is added to the history only when the reply finishes; Ctrl-C (KeyboardInterrupt)
        stops generation and leaves the history unchanged.
        """
        import torch  # deferred: heavy library, imported on first use
        from transformers import (  # deferred: heavy library, imported on first use
            StoppingCriteriaList,
            TextIteratorStreamer,
        )

        tok = self.tokenizer
        ids = tok(self.prompt(user_text), add_special_tokens=False, return_tensors="pt")
        device = next(self.model.parameters()).device
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        stop = _StopFlag()
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0} \
            if self.temperature > 0 else {"do_sample": False}
        kwargs = dict(input_ids=ids["input_ids"].to(device), attention_mask=ids["attention_mask"].to(device),
                      max_new_tokens=self.max_new_tokens, eos_token_id=self.stop_ids,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else self.stop_ids[0],
                      streamer=streamer, stopping_criteria=StoppingCriteriaList([stop]), **sampling)
        failure: list[BaseException] = []

        def work():
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # re-raised in the caller's thread below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        pieces: list[str] = []
        try:
            for piece in streamer:
                pieces.append(piece)
                if on_text and piece:
                    on_text(piece)
        except KeyboardInterrupt:
            stop.event.set()
            thread.join()
            raise
        thread.join()
        if failure:
            raise failure[0]
        reply = "".join(pieces)
        self.history += [Message("user", user_text), Message("assistant", reply)]
        return reply


def run_chat(session: ChatSession, *, name: str = "model", read: Callable[[str], str] = input,
             out: TextIO | None = None) -> int:
    """The interactive loop: ``you> `` prompts, streamed ``assistant> `` replies, /reset and /exit.

    Returns the exit code (0 on /exit or end of input).
    """
    out = out or sys.stdout

    def write(s: str) -> None:
        out.write(s)
        out.flush()

    eot = session.tokenizer.convert_ids_to_tokens(session.stop_ids[0])
    write(f"chatting with {name} (template {session.template.name}, replies end at {eot}); {HELP}\n")
    if session.system_prompt:
        write(f"system: {session.system_prompt}\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            write("(history cleared)\n")
            continue
        if text.startswith("/"):
            write(f"unknown command {text.split()[0]}: {HELP}\n")
            continue
        write("assistant> ")
        try:
            session.send(text, on_text=write)
        except KeyboardInterrupt:
            write(" [stopped]")
        write("\n")

# --------------------------------------------------------------------------------------------
# Batch generation


@dataclass
class GenerateResult:
    rows: list[dict]  # one per prompt: index, source, prompt (messages), reply, finished, n_tokens, reference
    out: str | None
    seconds: float

    def summary(self) -> dict:
        done = sum(1 for r in self.rows if r["finished"])
        return {"n": len(self.rows), "finished": done, "cut_at_max_new_tokens": len(self.rows) - done,
                "out": self.out, "seconds": round(self.seconds, 2)}


def _conversations(prompts: list[str] | None, data: str | None, fmt: str | None,
                   system_prompt: str | None) -> list[Conversation]:
    if bool(prompts) == bool(data):
        raise SftlabError("give either --prompt (one or more) or --data FILE", hint="not both, not neither")
    if data:
        convs = load_conversations(data, fmt, system_prompt=system_prompt)
        if not convs:
            raise SftlabError(f"{data}: holds no conversations")
        return convs
    sys_msg = [Message("system", system_prompt)] if system_prompt else []
    return [Conversation(sys_msg + [Message("user", p)], source="--prompt", line=i) for i, p in enumerate(prompts, 1)]


def generate_jsonl(model_or_run: str, *, prompts: list[str] | None = None, data: str | None = None,
                   out: str | None = None, fmt: str | None = None, system_prompt: str | None = None,
                   template: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, batch_size: int = 8, device=None) -> GenerateResult:
    """Generate the next assistant reply for each prompt or data conversation; write JSONL to ``out``.

    A data conversation's prompt is its messages before its last assistant reply, which is kept as
    ``reference``. Greedy unless ``temperature`` > 0. Rows come back in input order.
    """

    convs = _conversations(prompts, data, fmt, system_prompt)
    if temperature < 0:
        raise SftlabError(f"--temperature {temperature} must be >= 0 (0 is greedy)")
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                  temperature=temperature or 1.0, top_p=top_p, seed=seed)
    model, tok, tpl = load_chat_model(model_or_run, template=template, device=device)
    started = time.perf_counter()
    gens = generate(model, tok, tpl, convs, settings, batch_size=batch_size)
    rows = [{"index": i, "source": c.where(),
             "prompt": [{"role": m.role, "content": m.content} for m in prompt_messages(c)],
             "reply": g.text, "finished": g.finished, "n_tokens": g.n_tokens, "reference": reference_reply(c)}
            for i, (c, g) in enumerate(zip(convs, gens))]
    if out:
        write_jsonl(out, rows)
    return GenerateResult(rows, out, time.perf_counter() - started)
