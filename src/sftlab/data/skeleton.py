"""One template render per conversation shape, instead of one (or more) per conversation.

Rendering a sandboxed jinja template is the slowest step of labelling: the exact method in
``masking`` renders each conversation once in full and once more per assistant reply (the prefix
with the generation prompt). But most templates treat message content as opaque: they write it out
and never look at it. For such a template the rendered text, and so every label boundary, is a fixed
function of the conversation's *shape* with each field pasted in. This module learns that function
once per shape ("skeleton") and then renders each conversation with string formatting.

The shape (:func:`key_of`) is each message's role, whether it has reasoning, its tool calls (function
name, argument names, whether the call has an id) and whether a tool result names its call and
function; the tools offered; and which fields are empty. The fields pasted in are the contents,
reasoning, call ids, string argument values and a result's call id and name. Argument values that are
not strings (numbers, lists) are part of the shape. A field the template writes through ``tojson``
(tool-call arguments, Llama 3.1's tool results) is pasted JSON-escaped there: each stand-in holds a
quote, and where it comes back escaped the field is escaped.

Exactness is guarded three ways, and any doubt falls back to the exact method:

1. The skeleton is learnt by rendering stand-in fields that record every way the template could
   inspect them (comparison, length, truth value, ``in``, indexing, iteration, any string method or
   filter). A template that inspects a field (``content | length``, ``content.split(...)``) is never
   handled here. Control flow that does not depend on the fields is the same for every conversation
   of the shape, so one probe render sees every inspection a real render would make. Some inspection
   is allowed, because common templates make it (Llama 3 trims every message, Qwen3 asks
   ``'</think>' in content``, tool templates ask ``{% if content %}``): stripping white space, and
   yes/no questions (``in``, ``startswith``, ``endswith``, ``==`` with string arguments, the truth
   value). They are recorded with the probe's answers (a stripped probe is again a recording probe),
   and the skeleton serves only conversations whose fields give the same answers (no white space to
   strip, no ``</think>``), for which the template's control flow and output are the same as for the probe.
2. The skeleton holds the renders, not the labels: each render the exact method asks for (the
   conversation, each turn's inference prompt, the conversation through each turn) is made once on
   unique sentinel fields and kept as a format string; it is rejected if a sentinel does not come back
   verbatim or JSON-escaped (HTML-escaped, ASCII-escaped, split, dropped in part). The labels are then
   found by the exact method itself on the renders pasted with the real fields, so where the rule
   looks at the text (DeepSeek-R1's prompt ends ``<think>\n``, and a reply starting with a new line
   continues it; white space before a missing end-of-turn token) it sees the real text: a
   conversation's labels never depend on which conversation of its shape came first.
3. The first conversation of each shape and a regular sample of the rest (1 in ``VERIFY_EVERY``) are
   also labelled by the exact method and compared; a single difference disables the skeletons for the
   whole template and every conversation is labelled exactly.

Learning costs about three exact labellings, so where shapes hardly repeat (a number argument that
differs in every call) learning stops after ``LEARN_FREE`` shapes.
"""

from __future__ import annotations

import json
import re
from typing import Callable

from sftlab.core.errors import SftlabError
from sftlab.data.types import Conversation, Message


def _call_sig(call: dict) -> tuple:
    """A tool call's shape: whether it has an id, the function's name, and each argument's name with
    None for a string value (pasted in like content) or the value's JSON (anything else: part of the key)."""
    fn = call["function"]
    args = fn.get("arguments") or {}
    return ("id" in call, fn["name"], tuple((k, None if isinstance(v, str) else json.dumps(v)) for k, v in args.items()))


def _fields(conv: Conversation) -> list[str]:
    """The strings a skeleton pastes in, in order, per message: content, reasoning, each call's id and
    string arguments, the tool result's call id and name (each where present)."""
    out = []
    for m in conv.messages:
        out.append(m.content)
        if m.reasoning is not None:
            out.append(m.reasoning)
        for call in m.tool_calls or ():
            if "id" in call:
                out.append(call["id"])
            out += [v for v in (call["function"].get("arguments") or {}).values() if isinstance(v, str)]
        out += [x for x in (m.tool_call_id, m.name) if x is not None]
    return out


def key_of(conv: Conversation, fields: list[str] | None = None) -> tuple:
    """What a skeleton is learnt for: each message's role, whether it has reasoning, its tool calls'
    shapes (:func:`_call_sig`) and whether it names a call id and function; the tools offered; and which
    of its ``fields`` (:func:`_fields`, computed when not given) are empty."""
    msgs = tuple((m.role, m.reasoning is not None, tuple(_call_sig(c) for c in m.tool_calls or ()),
                  m.tool_call_id is not None, m.name is not None) for m in conv.messages)
    empty = tuple(k for k, f in enumerate(_fields(conv) if fields is None else fields) if f == "")
    return msgs, (json.dumps(conv.tools) if conv.tools else None), empty


def _stand_ins(key: tuple, make) -> tuple[list[Message], list[dict] | None]:
    """Messages of the shape ``key`` with ``make(k)`` in the place of field ``k`` (the order of ``_fields``)."""
    shapes, tools, empty = key
    k = 0

    def nxt():  # an empty field stays empty: templates ask whether there is content (`{% if content %}`)
        nonlocal k
        k += 1
        return "" if k - 1 in empty else make(k - 1)

    msgs = []
    for role, has_reasoning, calls, has_call_id, has_name in shapes:
        content = nxt()
        reasoning = nxt() if has_reasoning else None
        made = []
        for has_id, name, args in calls:
            call_id = nxt() if has_id else None
            arguments = {a: nxt() if value is None else json.loads(value) for a, value in args}
            made.append({"type": "function", "function": {"name": name, "arguments": arguments},
                         **({"id": call_id} if has_id else {})})
        call_id = nxt() if has_call_id else None
        name = nxt() if has_name else None
        msgs.append(Message(role, content, tool_calls=tuple(made) or None, reasoning=reasoning,
                            tool_call_id=call_id, name=name))
    return msgs, (json.loads(tools) if tools else None)


VERIFY_EVERY = 50
LEARN_FREE = 64  # shapes learnt before the learning budget applies (see Skeletons.segments)
_MARK, _END = "\ue000", "\ue001"  # Unicode private-use characters around each sentinel
# A sentinel holds a quote, so that a template that JSON-encodes a field (``tojson``) shows it: the
# quote comes back escaped (``\"``) and the field is pasted JSON-escaped there, verbatim elsewhere.
_SENTINEL = re.compile(_MARK + r'(\d+)(\\?)"' + _END)
_ESCAPED = re.compile(_MARK + r'\d+\\"' + _END)


def _sentinel(k: int) -> str:
    return f'{_MARK}{k}"{_END}'


# str methods that do not read the characters of the content, or only copy it into the output.
_OPAQUE = {
    "__new__", "__init__", "__str__", "__getattribute__", "__class__", "__init_subclass__",
    "__subclasshook__", "__reduce__", "__reduce_ex__", "__getnewargs__", "__sizeof__", "__dir__",
    "__setattr__", "__delattr__", "__doc__", "__add__", "__format__", "__rmod__", "__getstate__",
}


_STRIPS = ("strip", "lstrip", "rstrip")
# Yes/no questions about the content that can be asked again of a real content: the skeleton serves a
# conversation only if every question the template asked gets the same answer from its contents.
_QUESTIONS = ("__contains__", "startswith", "endswith", "__eq__", "__ne__")


def _replayable(args: tuple) -> bool:
    return all(isinstance(a, str) or (isinstance(a, tuple) and all(isinstance(x, str) for x in a)) for a in args)


def _probe_class(questions: list[tuple], touched: list[str]) -> type:
    """A str subclass standing in for message ``k``'s content; records how the template looks at it.

    - Stripping white space (no argument) is recorded as the question "is there none to strip?"
      and returns a probe again, so that what the template does with the stripped value is seen too.
    - A yes/no question with string arguments (``'</think>' in content``, ``startswith``, ``==``) is
      recorded with its answer, in ``questions`` as (k, method, args, answer).
    - Anything else (length, truth value, indexing, iteration, other methods) goes to ``touched``:
      no skeleton for that template and role sequence.
    """

    def wrap(name: str):
        base = getattr(str, name)

        def method(self, *args, **kwargs):
            if name in _STRIPS and not kwargs and _replayable(tuple(a for a in args if a is not None)):
                # "is there nothing to strip?" (the probe has none), asked again of real contents
                questions.append((self.k, name, tuple(a for a in args if a is not None), True))
                return probe(base(self, *args), self.k)
            result = base(self, *args, **kwargs)
            if name in _QUESTIONS and not kwargs and _replayable(args) and isinstance(result, bool):
                questions.append((self.k, name, args, result))
            else:
                touched.append(name)
            return result

        method.__name__ = name
        return method

    def new(cls, text: str, k: int):
        obj = str.__new__(cls, text)
        obj.k = k
        return obj

    namespace = {name: wrap(name) for name in dir(str)
                 if name not in _OPAQUE and callable(getattr(str, name))}
    def truth(self):  # `{% if content %}`: "is there any?", asked again of real contents
        questions.append((self.k, "__bool__", (), True))
        return True

    namespace["__bool__"] = truth
    namespace["__new__"] = new
    namespace["__str__"] = lambda self: self  # str(content), as in `{{ content }}`, stays a probe
    probe = type("ContentProbe", (str,), namespace)
    return probe


def _same_answers(questions: tuple, contents: list[str]) -> bool:
    for k, name, args, answer in questions:
        c = contents[k]
        if name == "__bool__":
            got = bool(c)
        else:
            got = (c == getattr(str, name)(c, *args)) if name in _STRIPS else getattr(str, name)(c, *args)
        if got != answer:
            return False
    return True


class Skeletons:
    """Per conversation shape (:func:`key_of`): each render of the label rule as a format string over the fields."""

    def __init__(self, template, exact_examples: Callable[[Conversation], list]):
        self.template = template
        self.exact = exact_examples  # Conversation -> ConvLabels (a list of examples' segments)
        # shape -> (each render the exact rule asks for, by (messages, generation prompt), as a format string;
        # the content questions they assume; whether a format pastes a field JSON-escaped) or None
        self.cache: dict[tuple, tuple[dict, tuple, bool] | None] = {}
        self.failed = False  # a verification found a difference: label everything exactly
        self.n_seen = 0
        self.n_reused = 0  # conversations served by a skeleton learnt for an earlier one (the learning budget)
        self.verified: set[tuple] = set()  # shapes whose first skeleton use was checked

    def segments(self, conv: Conversation) -> list:
        """The conversation's labels (as the exact method gives them: a ConvLabels)."""
        if self.failed:
            return self.exact(conv)
        contents = _fields(conv)
        key = key_of(conv, contents)
        if any(shape[1] for shape in key[0]) and not self.template.renders_reasoning:
            return self.exact(conv)  # reasoning goes inline into the content: not a plain paste
        if key not in self.cache:
            # Learning costs about three exact labellings: stop where shapes hardly repeat (every tool
            # call with its own numbers, say), after a first allowance.
            if len(self.cache) >= LEARN_FREE and self.n_reused < len(self.cache):
                return self.exact(conv)
            self.cache[key] = self._learn(key)
        learnt = self.cache[key]
        if learnt is None or any(_MARK in c or _END in c for c in contents):
            return self.exact(conv)
        renders, questions, escaped = learnt
        if questions and not _same_answers(questions, contents):
            return self.exact(conv)
        if escaped:  # field k JSON-escaped is field n + k
            contents = contents + [json.dumps(c, ensure_ascii=False)[1:-1] for c in contents]

        def render(messages, add_generation_prompt=False, tools=None):
            return renders[len(messages), add_generation_prompt].format(*contents)

        # The exact rule itself, on the renders pasted together: where it looks at the text (where the
        # inference prompt's end is found in the turn, white space before a missing end-of-turn token)
        # it sees the real fields, so the labels never depend on which conversation taught the skeleton.
        segs = self.exact(conv, render)
        self.n_seen += 1
        self.n_reused += key in self.verified
        if key not in self.verified or self.n_seen % VERIFY_EVERY == 0:
            self.verified.add(key)
            exact = self.exact(conv)
            if exact != segs or exact.split != segs.split:
                self.failed = True
                return exact
        return segs

    def _learn(self, key: tuple) -> tuple[dict, tuple, bool] | None:
        questions: list[tuple] = []
        touched: list[str] = []
        probe = _probe_class(questions, touched)
        probes, tools = _stand_ins(key, lambda k: probe(_sentinel(k), k))
        plain, _ = _stand_ins(key, _sentinel)
        n = len(_fields(Conversation(plain)))
        try:
            self.template.render(probes, tools=tools)
            for i, m in enumerate(probes):
                if m.role == "assistant":
                    self.template.render(probes[:i], add_generation_prompt=True, tools=tools)
                    if i + 1 < len(probes):  # the last turn's own render is the full one
                        self.template.render(probes[:i + 1], tools=tools)
        except SftlabError:
            return None  # the exact method reports it, naming the conversation
        if touched:
            return None
        # The renders the exact rule asks for (the full conversation; per assistant turn its inference
        # prompt and, but for the last, the conversation through it), each as a format string.
        calls = [(len(plain), False)]
        for i, m in enumerate(plain):
            if m.role == "assistant":
                calls += [(i, True)] + ([(i + 1, False)] if i + 1 < len(plain) else [])
        texts = {}
        try:
            for upto, gen in calls:
                texts[upto, gen] = self.template.render(plain[:upto], add_generation_prompt=gen, tools=tools)
            # the rule's own checks on the stand-ins (a reply not rendered verbatim: the exact method reports it)
            self.exact(Conversation(plain, tools=tools), lambda msgs, add_generation_prompt=False, tools=None:
                       texts[len(msgs), add_generation_prompt])
        except SftlabError:
            return None
        renders, escaped = {}, False
        for (upto, gen), text in texts.items():
            rest = _SENTINEL.sub("", text)
            if _MARK in rest or _END in rest or "\\ue000" in rest or "\\ue001" in rest:
                return None  # a sentinel came back cut, or escaped in a way the skeleton does not paste
            escaped = escaped or bool(_ESCAPED.search(text))
            renders[upto, gen] = _SENTINEL.sub(lambda m: "{" + str(int(m.group(1)) + (n if m.group(2) else 0)) + "}",
                                               text.replace("{", "{{").replace("}", "}}"))
        return renders, tuple(dict.fromkeys(questions)), escaped
