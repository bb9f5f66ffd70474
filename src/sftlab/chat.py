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
from typing import TextIO

from sftlab.chat_tools import CALL_MARKERS, HoldCalls, ignores_tools, played_calls
from sftlab.core.errors import SftlabError
from sftlab.core.io import write_jsonl
from sftlab.data.doctor_tools import function_schemas
from sftlab.data.formats import load_conversations
from sftlab.data.templates import ChatTemplate
from sftlab.data.types import Conversation, Message
from sftlab.eval.exports import export_labeling
from sftlab.eval.generation import (
    GenerationSettings,
    decode_reply,
    generate,
    pass_prefix_to_generate,
    prompt_messages,
    reference_message,
    reference_reply,
    special_ids_of,
    special_think_ids,
    split_reply,
    stop_token_ids,
)
from sftlab.eval.run import load_target, prompts_as_trained
from sftlab.eval.tool_calls import (
    check_tool_calls,
    expected_calls,
    parse_tool_calls,
    same_calls,
)
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


def reply_streamer(tokenizer, streamer_class, keep: tuple[str, ...] = ()):
    """A ``streamer_class`` (transformers' TextIteratorStreamer) that streams a reply as :func:`decode_reply`
    decodes it: special tokens left out, but ``<think>``/``</think>`` kept where they are special (left out,
    the reasoning streamed into the answer with no tag between them), and the special tokens in ``keep``
    (a tool call's marker, so the hold-back sees where the call opens)."""
    kept = special_think_ids(tokenizer) | special_ids_of(tokenizer, keep)
    if not kept:
        return streamer_class(tokenizer, skip_prompt=True, skip_special_tokens=True)
    streamer = streamer_class(tokenizer, skip_prompt=True, skip_special_tokens=False)
    drop, put = set(tokenizer.all_special_ids) - kept, streamer.put

    def put_kept(value):
        value = value[0] if len(value.shape) > 1 and value.shape[0] == 1 else value
        put(value[[t not in drop for t in value.tolist()]] if value.dim() == 1 else value)

    streamer.put = put_kept
    return streamer


def default_system_prompt(model_or_run: str, system_prompt: str | None = None) -> str | None:
    """The system prompt to chat/generate with: ``system_prompt`` when given ("" means none), else a run
    folder's ``system_prompt`` (training put it first in each conversation without a system message).
    An export carries it as its template's default, so it needs none here."""
    if system_prompt is not None:
        return system_prompt or None
    run = RunDir(model_or_run)
    return run.config().system_prompt if run.config_path.is_file() else None


def run_reasoning(model_or_run: str) -> str:
    """A run folder's ``reasoning`` setting, or the one its export kept (``drop``/``last`` trained no reasoning
    before the last reply, so prompts hold none, as :func:`sftlab.eval.run.prompts_as_trained` makes eval's);
    else ``per_turn``."""
    run = RunDir(model_or_run)
    return run.config().reasoning if run.config_path.is_file() else export_labeling(model_or_run).get("reasoning", "per_turn")


def load_chat_model(model_or_run: str, *, template: str | None = None, device=None) -> tuple:
    """(model, tokenizer, ChatTemplate) for a run folder, an export folder or a model name/path."""

    with _quiet():
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
    tools: list[dict] | None = None  # function schemas offered to the model (rendered as the template's `tools`)
    reasoning: str = "per_turn"  # the run's setting: under drop/last earlier replies' reasoning is not shown again

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise SftlabError(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise SftlabError("--temperature must be >= 0 and --top-p in (0, 1]")
        self.stop_ids = stop_token_ids(self.tokenizer, self.template)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.call_error: str | None = None  # why the last reply's tool call did not parse (kept as text)
        self.call_warning: str | None = None  # why the last reply's calls do not fit the tools offered
        self.was_cut = False  # the last reply ran to max_new_tokens without its end-of-turn token
        self.history = [Message("system", self.system_prompt)] if self.system_prompt else []

    def prompt(self, user_text: str | None) -> str:
        """The text the model sees for the next reply: the history, the user turn (None: the model
        continues after tool results), the generation prompt; the tools when the session has them."""
        turn = [Message("user", user_text)] if user_text is not None else []
        # as training showed earlier replies: without their reasoning under reasoning drop/last
        shown = prompts_as_trained([Conversation(self.history + turn)], self.reasoning)[0].messages
        return self.template.render(shown, add_generation_prompt=True, tools=self.tools)

    @property
    def pending_calls(self) -> list[dict]:
        """The calls of the last reply that no tool result answers yet (OpenAI shape, arguments a dict)."""
        last = next((i for i in range(len(self.history) - 1, -1, -1) if self.history[i].role == "assistant"), None)
        if last is None or not self.history[last].tool_calls:
            return []
        answered = {m.tool_call_id for m in self.history[last + 1:] if m.role == "tool"}
        return [c for c in self.history[last].tool_calls if c["id"] not in answered]

    def add_tool_result(self, call: dict, result: str) -> None:
        """The user's answer to one pending call, as a ``tool`` message."""
        self.history.append(Message("tool", result, tool_call_id=call["id"], name=call["function"]["name"]))

    def send(self, user_text: str | None, on_text: Callable[[str], None] | None = None) -> str:
        """Generate the reply to ``user_text``, calling ``on_text`` with each decoded piece as it comes.

        ``None`` continues after tool results. The turn is added to the history only when the reply
        finishes; Ctrl-C (KeyboardInterrupt) stops generation and leaves the history unchanged. With
        tools, a reply that calls them is kept with its ``tool_calls`` (see :attr:`pending_calls`).
        """
        reply, raw = self._generate(self.prompt(user_text), on_text)
        # Reasoning (<think>...</think> first) is kept as the turn's reasoning, so the history renders it
        # as training did, and a call is looked for only in the answer after it.
        answer, reasoning = split_reply(reply)
        raw_answer = split_reply(raw)[0]
        calls = played_calls(raw_answer, self.tools) if self.tools else []
        parsed = parse_tool_calls(raw_answer) if self.tools else None
        self.call_error = parsed.error if parsed is not None and not calls else None
        # a call that parses but names no offered function or misfits its schema is still played, and said
        self.call_warning = check_tool_calls(raw_answer, self.tools).why if calls else None
        turn = [Message("user", user_text)] if user_text is not None else []
        if calls:
            n = sum(len(m.tool_calls or ()) for m in self.history)
            tool_calls = tuple({"id": f"call_{n + k + 1}", "type": "function", "function": c} for k, c in enumerate(calls))
            self.history += turn + [Message("assistant", parsed.content, tool_calls=tool_calls, reasoning=reasoning)]
        else:
            self.history += turn + [Message("assistant", answer, reasoning=reasoning)]
        return reply

    def _generate(self, prompt: str, on_text: Callable[[str], None] | None) -> tuple[str, str]:
        """(streamed reply, the same tokens decoded with special tokens kept) for a rendered prompt."""
        import torch  # deferred: heavy library, imported on first use
        from transformers import (  # deferred: heavy library, imported on first use
            StoppingCriteriaList,
            TextIteratorStreamer,
        )

        tok = self.tokenizer
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
        device = next(self.model.parameters()).device
        streamer = reply_streamer(tok, TextIteratorStreamer, keep=CALL_MARKERS if self.tools else ())
        stop = _StopFlag()
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0} \
            if self.temperature > 0 else {"do_sample": False}
        kwargs = dict(input_ids=ids["input_ids"].to(device), attention_mask=ids["attention_mask"].to(device),
                      max_new_tokens=self.max_new_tokens, eos_token_id=self.stop_ids,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else self.stop_ids[0],
                      streamer=streamer, stopping_criteria=StoppingCriteriaList([stop]), **sampling)
        failure: list[BaseException] = []
        output: list = []
        pass_prefix_to_generate(self.model)  # a prefix-tuning adapter's prefix, not the base model alone

        def work():
            try:
                with torch.no_grad():
                    output.append(self.model.generate(**kwargs))
            except BaseException as exc:  # re-raised in the caller's thread below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if on_text and piece:
                    on_text(piece)
        except KeyboardInterrupt:
            stop.event.set()
            thread.join()
            raise
        thread.join()
        if failure:
            raise failure[0]
        new = output[0][0, ids["input_ids"].shape[1]:].tolist() if output else []
        cut = next((k for k, t in enumerate(new) if t in self.stop_ids), len(new))
        self.was_cut = cut == len(new) and len(new) >= self.max_new_tokens  # no end of turn: --max-new-tokens ended it
        # the reply as text (special tokens dropped, <think> tags kept for split_reply) and with them all
        return decode_reply(tok, new[:cut]), tok.decode(new[:cut], skip_special_tokens=False)


def _end_reply(session: ChatSession, hold: HoldCalls, write: Callable[[str], None]) -> None:
    """After a streamed reply: its held text unless it made a call, whether it was cut, why a call-shaped
    text was not run."""
    hold.finish(bool(session.pending_calls), session.history[-1].content if session.pending_calls else "")
    if session.was_cut:  # else a reply cut short reads as the model's whole answer
        write(f" [cut at --max-new-tokens {session.max_new_tokens}]")
    if session.call_error:
        write(f"\n(not run as a tool call: {session.call_error})")


def _hold(session: ChatSession, write: Callable[[str], None]) -> HoldCalls:
    """The streamed text's filter: with tools, a call (in any dialect the parser reads) is held back for
    its formatted form; without, the text is streamed as it comes."""
    return HoldCalls(write, active=bool(session.tools))


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
    if session.tools:
        names = ", ".join(function_schemas(session.tools))
        write(f"tools: {names} (a tool call is shown with its arguments; type its result at 'tool result>')\n")
        if ignores_tools(session.template, session.tools):
            write(f"warning: template {session.template.name} ignores tools: the model never sees them "
                  "(pass --template with a template that renders tools)\n")
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
        hold = _hold(session, write)
        try:
            session.send(text, on_text=hold)
            _end_reply(session, hold, write)
            while session.pending_calls:  # the user plays the tools, then the model continues
                write("\n")
                if session.call_warning:
                    write(f"(warning: {session.call_warning}; sftlab eval counts such a call as invalid)\n")
                for call in session.pending_calls:
                    fn = call["function"]
                    write(f"tool call: {fn['name']}\n{json.dumps(fn['arguments'], indent=2, ensure_ascii=False)}\n")
                    result = read(f"tool result ({fn['name']})> ").strip()
                    if result in ("/exit", "/quit"):  # the commands work here too, not sent as the tool's result
                        return 0
                    if result == "/reset":
                        session.reset()
                        write("(history cleared)")
                        break
                    session.add_tool_result(call, result)
                else:
                    write("assistant> ")
                    hold = _hold(session, write)
                    session.send(None, on_text=hold)
                    _end_reply(session, hold, write)  # a broken call after a tool result is said too
                    continue
                break
        except KeyboardInterrupt:
            hold.finish(False)  # what the model wrote before the stop, a call's start included
            write(" [stopped]")
        except EOFError:
            write("\n")
            return 0
        write("\n")

# --------------------------------------------------------------------------------------------
# Batch generation


@dataclass
class GenerateResult:
    rows: list[dict]  # one per prompt: index, source, prompt (messages), reply, finished, n_tokens, reference
    # (+ answer and reasoning for a reply that reasons first; tool_calls: {valid, why, calls} for a
    # conversation that offers tools, + match where its reference reply is a call)
    out: str | None
    seconds: float

    def summary(self) -> dict:
        done = sum(1 for r in self.rows if r["finished"])
        return {"n": len(self.rows), "finished": done, "cut_at_max_new_tokens": len(self.rows) - done,
                "out": self.out, "seconds": round(self.seconds, 2)}


def _conversations(prompts: list[str] | None, data: str | None, fmt: str | None,
                   system_prompt: str | None, tools: list[dict] | None = None) -> list[Conversation]:
    if bool(prompts) == bool(data):
        raise SftlabError("give either --prompt (one or more) or --data FILE", hint="not both, not neither")
    if data and tools:
        raise SftlabError("--tools goes with --prompt: a --data file's conversations carry their own tools",
                          hint="drop --tools, or give the prompts with --prompt")
    if data:  # prompts may end before the reply (a user turn, a prompt or instruction alone): it is generated
        convs = load_conversations(data, fmt, system_prompt=system_prompt, open_end=True)
        if not convs:
            raise SftlabError(f"{data}: holds no conversations")
        text = next((c for c in convs if c.is_text), None)
        if text is not None:  # before the model loads
            raise SftlabError(f"{text.where()}: plain-text records have no prompt to generate a reply to",
                              hint="give chat data: messages, conversations, prompt (completion optional) or "
                                   "instruction (output optional)")
        return convs
    sys_msg = [Message("system", system_prompt)] if system_prompt else []
    return [Conversation(sys_msg + [Message("user", p)], source="--prompt", line=i, tools=tools)
            for i, p in enumerate(prompts, 1)]


def generate_jsonl(model_or_run: str, *, prompts: list[str] | None = None, data: str | None = None,
                   out: str | None = None, fmt: str | None = None, system_prompt: str | None = None,
                   template: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, batch_size: int = 8, device=None,
                   tools: list[dict] | None = None) -> GenerateResult:
    """Generate the next assistant reply for each prompt or data conversation; write JSONL to ``out``.

    A data conversation's prompt is its messages before its final assistant reply, which is kept as
    ``reference``; one that ends on a user turn or tool result (a prompt-only file: messages without
    the reply, a prompt without completion, an instruction without output) is the prompt whole, with
    ``reference`` None. ``system_prompt`` (default: a run's own, see :func:`default_system_prompt`) goes first
    in each conversation without a system message. ``tools`` (function schemas, :func:`load_tools`) are
    offered with each ``prompts`` text, as a data file's conversations offer theirs. Greedy unless
    ``temperature`` > 0. Rows come back in input order.
    """

    convs = _conversations(prompts, data, fmt, default_system_prompt(model_or_run, system_prompt), tools)
    convs = prompts_as_trained(convs, run_reasoning(model_or_run))  # earlier turns' reasoning as training showed it
    if temperature < 0:
        raise SftlabError(f"--temperature {temperature} must be >= 0 (0 is greedy)")
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                  temperature=temperature or 1.0, top_p=top_p, seed=seed)
    model, tok, tpl = load_chat_model(model_or_run, template=template, device=device)
    offers = next((c for c in convs if ignores_tools(tpl, c.tools)), None)
    if offers is not None:  # its replies would be judged on calls to tools the model never saw
        raise SftlabError(f"{'--tools' if tools else offers.where() + ': its tools'}: template {tpl.name} ignores "
                          "tools, so the model would never see them", hint="pass --template with a template that "
                          "renders tools (e.g. chatml-tools, or the model's own)")
    started = time.perf_counter()
    gens = generate(model, tok, tpl, convs, settings, batch_size=batch_size)
    rows = [{"index": i, "source": c.where(), "prompt": [m.to_template() for m in prompt_messages(c)],
             "reply": g.text, "finished": g.finished, "n_tokens": g.n_tokens, "reference": reference_reply(c)}
            for i, (c, g) in enumerate(zip(convs, gens))]
    for row, c, g in zip(rows, convs, gens):
        answer, reasoning = split_reply(g.text)
        if reasoning is not None:  # as eval's rows: the answer apart from the reasoning before it
            row.update(answer=answer, reasoning=reasoning)
        if c.tools:  # the reply's calls, parsed and checked against the conversation's tools
            tc = check_tool_calls(split_reply(g.raw or g.text)[0], c.tools)  # calls after any reasoning
            row["tool_calls"] = {"valid": tc.valid, "why": tc.why, "calls": tc.calls}
            ref = reference_message(c)
            if ref is not None and ref.tool_calls:  # as eval's rows: are they the reference's calls?
                row["tool_calls"]["match"] = tc.valid and same_calls(tc.calls, expected_calls(ref.tool_calls))
    if out:
        write_jsonl(out, rows)
    return GenerateResult(rows, out, time.perf_counter() - started)
