"""Chat templates: the tokenizer's own (jinja, rendered in a sandbox) and named built-ins.

Every template, built-in or not, is a jinja string rendered with the same sandboxed environment
Hugging Face uses (trim_blocks, lstrip_blocks), so the exact template used in training can be
written into an exported tokenizer and reproduced at inference by plain transformers.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from sftlab.core.errors import SftlabError
from sftlab.data.types import Message

_NL = "{{ '\\n' }}"

# Named templates. `eot` is the end-of-turn string each assistant reply ends with: it is trained
# with the reply so the model learns to stop. eos_token/bos_token come from the tokenizer.
BUILTIN: dict[str, tuple[str, str | None]] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m.role }}" + _NL + "{{ m.content }}<|im_end|>" + _NL + "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant" + _NL + "{% endif %}",
        "<|im_end|>",
    ),
    "llama3": (
        "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>" + _NL + _NL +
        "{{ m.content }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>" + _NL + _NL + "{% endif %}",
        "<|eot_id|>",
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages if m.role != 'system' %}"
        "{% if m.role == 'user' %}[INST] {% if loop.first and messages[0].role == 'system' %}{{ messages[0].content }}"
        + _NL + _NL + "{% endif %}{{ m.content }} [/INST]"
        "{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}",
        None,  # eos_token
    ),
    "alpaca": (
        "{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}"
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "{% endif %}" + _NL + _NL +
        "{% for m in messages if m.role != 'system' %}{% if m.role == 'user' %}### Instruction:" + _NL + "{{ m.content }}" + _NL + _NL +
        "{% else %}### Response:" + _NL + "{{ m.content }}{{ eos_token }}" + _NL + _NL + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Response:" + _NL + "{% endif %}",
        None,
    ),
    "vicuna": (
        "{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}"
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions.{% endif %} "
        "{% for m in messages if m.role != 'system' %}{% if m.role == 'user' %}USER: {{ m.content }} "
        "{% else %}ASSISTANT: {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT: {% endif %}",
        None,
    ),
}
# Hermes/Qwen2.5-style tools on ChatML, for models whose own template does not render tools: the
# schemas go into the system turn inside <tools>, each call is a <tool_call>{json}</tool_call> line in
# the assistant turn, and results come back in a user turn as <tool_response> blocks (consecutive
# results share one turn, as Qwen2.5 renders them). Reasoning is written as <think>...</think>. Arguments
# given as a JSON string (OpenAI's wire format) are written as they are, as Qwen3's template does: training
# passes them decoded, but an export's user may pass OpenAI messages to apply_chat_template.
_TOOLS_SYSTEM = (
    "{% if tools %}<|im_start|>system" + _NL +
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}" + _NL + _NL + "{% endif %}"
    "# Tools" + _NL + _NL + "You may call one or more functions to assist with the user query." + _NL + _NL +
    "You are provided with function signatures within <tools></tools> XML tags:" + _NL + "<tools>"
    "{% for t in tools %}" + _NL + "{{ t | tojson }}{% endfor %}" + _NL + "</tools>" + _NL + _NL +
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:" + _NL + "<tool_call>" + _NL + '{"name": <function-name>, "arguments": <args-json-object>}' + _NL +
    "</tool_call><|im_end|>" + _NL +
    "{% elif messages[0].role == 'system' %}<|im_start|>system" + _NL + "{{ messages[0].content }}<|im_end|>" + _NL +
    "{% endif %}"
)
BUILTIN["chatml-tools"] = (
    _TOOLS_SYSTEM +
    "{% for m in messages %}{% if m.role == 'user' %}<|im_start|>user" + _NL + "{{ m.content }}<|im_end|>" + _NL +
    "{% elif m.role == 'assistant' %}<|im_start|>assistant" + _NL +
    "{% if m.reasoning_content %}<think>" + _NL + "{{ m.reasoning_content }}" + _NL + "</think>" + _NL + _NL + "{% endif %}"
    "{{ m.content }}{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "{% if (loop.first and m.content) or not loop.first %}" + _NL + "{% endif %}<tool_call>" + _NL +
    '{"name": "{{ c.function.name }}", "arguments": '
    "{% if c.function.arguments is string %}{{ c.function.arguments }}{% else %}{{ c.function.arguments | tojson }}{% endif %}"
    '}' + _NL + "</tool_call>"
    "{% endfor %}{% endif %}<|im_end|>" + _NL +
    "{% elif m.role == 'tool' %}{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}" +
    _NL + "<tool_response>" + _NL + "{{ m.content }}" + _NL + "</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>" + _NL + "{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant" + _NL + "{% endif %}",
    "<|im_end|>",
)
BUILTIN["sharegpt"] = BUILTIN["vicuna"]
# Built-ins that render tool calls and results (the others have no tool role).
TOOL_TEMPLATES = {"chatml-tools"}


def _raise(message: str):
    raise TemplateError(message)


# Limits on one render: user templates run in the sandbox, which blocks attribute escapes but not
# resource exhaustion (`'a' * 10**9`, nested loops). No chat template needs more than these.
MAX_RENDER_CHARS = 32_000_000  # characters of rendered text (and of any one string or list built)
MAX_RENDER_SECONDS = 10.0  # wall-clock seconds per render
_deadline = threading.local()  # the deadline of the render in progress on this thread


class RenderLimit(Exception):
    """A render passed :data:`MAX_RENDER_CHARS` or :data:`MAX_RENDER_SECONDS`."""


class TemplateRefused(SftlabError):
    """The template failed to render these messages (its ``raise_exception``, or an error inside it):
    ``reason`` is its message. :meth:`at` names the conversation and a fix."""

    def __init__(self, name: str, reason: str):
        self.template_name, self.reason = name, reason
        super().__init__(f"chat template '{name}' failed to render: {reason}")

    def at(self, conv) -> SftlabError:
        """The same failure as one line naming ``conv`` (a Conversation) and how to fix it."""
        return SftlabError(f"{conv.where()}: {self}", hint=self.fix(conv.messages))

    def fix(self, messages: list[Message]) -> str:
        """A fix guessed from the reason and the messages the template refused."""
        why, roles = self.reason.lower(), {m.role for m in messages}
        if "system" in why and "system" in roles:
            return ("the template refuses system messages: drop them, fold them into the first user message, "
                    "or use another template, e.g. --template chatml")
        if "(not \"dict\") to str" in why and any(m.tool_calls for m in messages):
            return ("the template joins tool-call arguments as a string; sftlab passes them as a dict, the Hugging Face "
                    "convention that vLLM follows too: use a template that writes them with tojson, e.g. --template chatml-tools")
        if "tool" in why or "function" in why or "tool" in roles or any(m.tool_calls for m in messages):
            return ("the template refuses these tool calls or results: use the model's tool-calling template "
                    "or --template chatml-tools")
        return ("the template refuses this conversation: change it to what the template accepts, or use another "
                "template, e.g. --template chatml")


def _check_deadline() -> None:
    end = getattr(_deadline, "at", None)
    if end is not None and time.monotonic() > end:
        raise RenderLimit(f"took longer than {MAX_RENDER_SECONDS:g} s")


def _check_size(value, what: str = "a value"):
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_RENDER_CHARS:
        raise RenderLimit(f"{what} {value} is over the limit of {MAX_RENDER_CHARS:,}")
    return value


class _BoundedRange:
    """jinja's sandboxed range (at most 100,000 items) that checks the render's deadline as it is
    iterated: nested loops that print nothing would otherwise run unchecked."""

    def __init__(self, *args):
        self._r = safe_range(*args)

    def __len__(self):
        return len(self._r)

    def __getitem__(self, i):
        return self._r[i]

    def __contains__(self, x):
        return x in self._r

    def __iter__(self):
        for i, x in enumerate(self._r):
            if i % 1024 == 0:
                _check_deadline()
            yield x

    def __reversed__(self):
        return iter(_BoundedRange.__new_from(self._r[::-1]))

    @staticmethod
    def __new_from(r: range) -> "_BoundedRange":
        out = _BoundedRange.__new__(_BoundedRange)
        out._r = r
        return out


def _bounded_filter(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a in (*args, *kwargs.values()):
            _check_size(a, "a filter argument")
        return fn(*args, **kwargs)

    return wrapper


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox with bounded repetition (`*`, `**`, `%`) and bounded integer arguments to calls."""

    intercepted_binops = frozenset(["*", "**", "%"])

    def call_binop(self, context, operator, left, right):
        _check_deadline()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _check_size(len(seq) * n, "a repeated string or list of length")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(right) > 64 and abs(left) > 1:
                raise RenderLimit(f"{left} ** {right} is too large")
        elif operator == "%" and isinstance(left, str):
            for width in re.findall(r"%[-#0 +]*(\d+)|%[-#0 +]*\d*\.(\d+)", left):
                _check_size(int(width[0] or width[1]), "a format width")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        _check_deadline()
        for a in (*args, *kwargs.values()):
            _check_size(a, "a call argument")
        return super().call(__context, __obj, *args, **kwargs)


@lru_cache(maxsize=1)
def _env() -> ImmutableSandboxedEnvironment:
    # The same environment transformers uses for chat templates: sandboxed, immutable, with
    # loop controls and `raise_exception`; user templates cannot touch Python objects. On top of it,
    # bounded: see _BoundedSandbox, _BoundedRange and bounded_render.
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = _BoundedRange
    # A string is iterable; answered without iterating it, so a skeleton's content probe (which records
    # iteration as reading the content) is not "read" by Llama 3.1's `content is iterable`.
    env.tests["iterable"] = lambda x, _iterable=env.tests["iterable"]: isinstance(x, str) or _iterable(x)
    env.filters["tojson"] = _tojson  # transformers' tojson: keys in their given order, non-ASCII kept
    env.filters = {k: _bounded_filter(f) for k, f in env.filters.items()}
    return env


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def bounded_render(compiled, name: str, **context) -> str:
    """Render ``compiled`` (a template of :func:`_env`) within :data:`MAX_RENDER_CHARS` characters and
    :data:`MAX_RENDER_SECONDS`; any failure is one SftlabError naming template ``name``."""
    _deadline.at = time.monotonic() + MAX_RENDER_SECONDS
    parts, size = [], 0
    try:
        for chunk in compiled.generate(**context):
            size += str.__len__(chunk)  # not len(): a chunk may be a str subclass that watches its methods
            if size > MAX_RENDER_CHARS:
                raise RenderLimit(f"rendered more than {MAX_RENDER_CHARS:,} characters")
            _check_deadline()
            parts.append(chunk)
    except RenderLimit as exc:
        raise SftlabError(f"chat template '{name}' stopped: it {exc}" if str(exc).startswith(("took", "rendered"))
                          else f"chat template '{name}' stopped: {exc}",
                          hint="a chat template should only lay out the messages; fix the template") from None
    except TemplateError as exc:
        raise TemplateRefused(name, str(exc)) from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
        # An error inside the template's own expressions (DeepSeek-R1 concatenates a tool call's
        # arguments as a string: `'...' + arguments` on a dict): the template refuses these messages.
        raise TemplateRefused(name, f"{type(exc).__name__}: {exc}") from None
    except (OverflowError, MemoryError, RecursionError) as exc:
        raise SftlabError(f"chat template '{name}' failed to render: {type(exc).__name__}: {exc}",
                          hint="a chat template should only lay out the messages; fix the template") from None
    finally:
        _deadline.at = None
    return "".join(parts)


@dataclass
class ChatTemplate:
    """A jinja chat template plus the tokens it needs.

    ``eot`` is the end-of-turn string after each assistant reply when known (built-ins); for the
    tokenizer's own template it is detected from the rendered text (see masking).
    """

    name: str
    source: str
    eot: str | None = None
    special: dict[str, str] | None = None  # bos_token, eos_token, ... passed to the template
    kwargs: dict | None = None  # chat_template_kwargs (e.g. enable_thinking), passed to every render

    def __post_init__(self):
        try:
            self._compiled = _env().from_string(self.source)
        except TemplateError as exc:
            raise SftlabError(f"chat template '{self.name}' does not compile: {exc}")
        self._renders_reasoning: bool | None = None

    def render(self, messages: list[Message], add_generation_prompt: bool = False, *,
               tools: list[dict] | None = None) -> str:
        """The text of ``messages`` (HF message dicts via ``Message.to_template``), with ``tools`` offered.

        Reasoning goes to the template as ``reasoning_content`` (and ``thinking``, GPT-OSS's name);
        a template that renders neither gets it inline, ``<think>\n{reasoning}\n</think>\n\n`` before
        the answer, as reasoning models write it.
        """
        inline = any(m.reasoning is not None for m in messages) and not self.renders_reasoning
        msgs = [_for_template(m, inline) for m in messages]
        # As transformers' apply_chat_template: `tools` and `documents` always defined (None when
        # absent), so `{% if tools is not none %}` (Llama 3.1) reads the same.
        ctx = {"tools": tools or None, "documents": None}
        ctx.update(self.kwargs or {})
        ctx.update(self.special or {})
        return bounded_render(self._compiled, self.name, messages=msgs, add_generation_prompt=add_generation_prompt,
                              **ctx)

    @property
    def renders_reasoning(self) -> bool:
        """Does the template write a message's ``reasoning_content``/``thinking`` (probed once)?"""
        if self._renders_reasoning is None:
            self._renders_reasoning = True  # while probing, pass reasoning as fields
            probe = "\ue003reasoning\ue003"
            try:
                text = self.render([Message("user", "hi"), Message("assistant", "ok", reasoning=probe)])
                self._renders_reasoning = probe in text
            except SftlabError:
                self._renders_reasoning = False
        return self._renders_reasoning


def _for_template(m: Message, inline_reasoning: bool) -> dict:
    d = m.to_template()
    if m.reasoning is not None:
        if inline_reasoning:
            d.pop("reasoning_content", None)
            d["content"] = f"<think>\n{m.reasoning}\n</think>\n\n{m.content}"
        else:
            d["thinking"] = m.reasoning
    return d


def _special_map(tokenizer) -> dict[str, str]:
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        val = getattr(tokenizer, key, None) if tokenizer is not None else None
        out[key] = val if isinstance(val, str) else ""
    return out


def template_names() -> list[str]:
    return sorted(BUILTIN)


def resolve_template(name: str | None, tokenizer, kwargs: dict | None = None) -> ChatTemplate:
    """``None``/"auto"/"tokenizer": the tokenizer's own template; a built-in name; or a .jinja file.

    ``kwargs`` (config ``chat_template_kwargs``, e.g. ``{"enable_thinking": False}``) go to every render.
    """
    tpl = _resolve(name, tokenizer)
    tpl.kwargs = dict(kwargs) if kwargs else None
    return tpl


def _resolve(name: str | None, tokenizer) -> ChatTemplate:
    special = _special_map(tokenizer)
    if name in (None, "", "auto", "tokenizer", "model"):
        src = getattr(tokenizer, "chat_template", None)
        if isinstance(src, dict):  # several named templates: take the default one
            src = src.get("default") or next(iter(src.values()), None)
        if not src:
            raise SftlabError("the model's tokenizer has no chat template",
                              hint=f"pass --template with one of: {', '.join(template_names())}")
        return ChatTemplate("tokenizer", src, None, special)
    if name in BUILTIN:
        src, eot = BUILTIN[name]
        if eot is None:
            if not special["eos_token"]:
                raise SftlabError(f"template '{name}' ends each reply with the EOS token, but the tokenizer has none",
                                  hint="use --template chatml")
            eot = special["eos_token"]
        return ChatTemplate(name, src, eot, special)
    path = Path(name)
    if path.suffix in (".jinja", ".j2", ".txt") or path.exists():
        if not path.exists():
            raise SftlabError(f"template file '{name}' not found")
        return ChatTemplate(path.name, path.read_text(encoding="utf-8"), None, special)
    raise SftlabError(f"unknown template '{name}'",
                      hint=f"use one of: {', '.join(template_names())}, 'tokenizer', or a .jinja file")


def missing_tokens(template: ChatTemplate, tokenizer) -> list[str]:
    """Special tokens a template writes that the tokenizer does not know as single tokens: ``<|...|>`` (any
    case: Cohere2's ``<|START_RESPONSE|>``) and DeepSeek's full-width ``<｜...｜>`` (``<｜Assistant｜>``,
    ``<｜end▁of▁sentence｜>``), which were left to be split into text: a reply's end then was no token."""
    wanted = set(re.findall(r"<\|[A-Za-z_]+\|>|<｜[^｜<>\s]+｜>", template.source))
    vocab = tokenizer.get_vocab()
    return sorted(t for t in wanted if t not in vocab)
