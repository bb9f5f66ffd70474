"""One template render per role pattern, instead of one (or more) per conversation.

Rendering a sandboxed jinja template is the slowest step of labelling: the exact method in
``masking`` renders each conversation once in full and once more per assistant reply (the prefix
with the generation prompt). But most templates treat message content as opaque: they write it out
and never look at it. For such a template the rendered text, and so every label boundary, is a fixed
function of the *role sequence*, with each message's content pasted in. This module learns that
function once per role sequence ("skeleton") and then labels each conversation with string formatting.

Exactness is guarded three ways, and any doubt falls back to the exact method:

1. The skeleton is learnt by rendering stand-in contents that record every way the template could
   inspect them (comparison, length, truth value, ``in``, indexing, iteration, any string method or
   filter). A template that inspects content (``'<think>' in content``, ``{% if message.content %}``)
   is never handled here. Control flow that does not depend on content is the same for every
   conversation with the same roles, so one probe render sees every inspection a real render would
   make. Two kinds of inspection are allowed, because common templates make them (Llama 3 trims every
   message, Qwen3 asks ``'</think>' in content``): stripping white space, and yes/no questions with
   string arguments (``in``, ``startswith``, ``endswith``, ``==``). They are recorded with the probe's
   answers (a stripped probe is again a recording probe), and the skeleton serves only conversations
   whose contents give the same answers (no white space to strip, no ``</think>``), for which the
   template's control flow and output are the same as for the probe.
2. The labels of the skeleton are found by the exact method itself, run on unique sentinel contents,
   and the skeleton is rejected if a sentinel does not come back verbatim (escaped, split, dropped).
3. The first conversation of each role sequence and a regular sample of the rest (1 in
   ``VERIFY_EVERY``) are also labelled by the exact method and compared; a single difference
   disables the skeletons for the whole template and every conversation is labelled exactly.
"""

from __future__ import annotations

import re
from typing import Callable

from sftlab.core.errors import SftlabError
from sftlab.data.types import Conversation, Message


def _fields(conv: Conversation) -> list[str]:
    """The strings a skeleton pastes in, in order: each message's content, then its reasoning if any."""
    out = []
    for m in conv.messages:
        out.append(m.content)
        if m.reasoning is not None:
            out.append(m.reasoning)
    return out


def key_of(conv: Conversation) -> tuple:
    """What a skeleton is learnt for: each message's role and whether it has reasoning."""
    return tuple((m.role, m.reasoning is not None) for m in conv.messages)


def _plain(conv: Conversation) -> bool:
    """Only roles, contents and reasoning: no tools, tool calls or results (those are labelled exactly)."""
    return not conv.tools and all(m.role != "tool" and not m.tool_calls for m in conv.messages)

VERIFY_EVERY = 50
_MARK, _END = "\ue000", "\ue001"  # Unicode private-use characters around each sentinel
_SENTINEL = re.compile(_MARK + r"(\d+)" + _END)

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
    namespace["__new__"] = new
    namespace["__str__"] = lambda self: self  # str(content), as in `{{ content }}`, stays a probe
    probe = type("ContentProbe", (str,), namespace)
    return probe


def _same_answers(questions: tuple, contents: list[str]) -> bool:
    for k, name, args, answer in questions:
        c = contents[k]
        got = (c == getattr(str, name)(c, *args)) if name in _STRIPS else getattr(str, name)(c, *args)
        if got != answer:
            return False
    return True


class Skeletons:
    """Per role sequence: each label segment as a format string over the message contents."""

    def __init__(self, template, exact_examples: Callable[[Conversation], list]):
        self.template = template
        self.exact = exact_examples  # Conversation -> ConvLabels (a list of examples' segments)
        # (role, has reasoning) sequence -> (labels with format strings, the content questions they
        # assume) or None
        self.cache: dict[tuple, tuple[list, tuple] | None] = {}
        self.failed = False  # a verification found a difference: label everything exactly
        self.n_seen = 0
        self.verified: set[tuple[str, ...]] = set()  # role sequences whose first skeleton use was checked

    def segments(self, conv: Conversation) -> list:
        """The conversation's labels (as the exact method gives them: a ConvLabels)."""
        if self.failed or not _plain(conv):
            return self.exact(conv)
        key = key_of(conv)
        if any(r for _, r in key) and not self.template.renders_reasoning:
            return self.exact(conv)  # reasoning goes inline into the content: not a plain paste
        if key not in self.cache:
            self.cache[key] = self._learn(key)
        learnt = self.cache[key]
        contents = _fields(conv)
        if learnt is None or any(_MARK in c or _END in c for c in contents):
            return self.exact(conv)
        skeleton, questions = learnt
        if questions and not _same_answers(questions, contents):
            return self.exact(conv)
        segs = skeleton.__class__([[(fmt.format(*contents), trained) for fmt, trained in ex] for ex in skeleton],
                                  split=skeleton.split, notes=skeleton.notes)
        self.n_seen += 1
        if key not in self.verified or self.n_seen % VERIFY_EVERY == 0:
            self.verified.add(key)
            exact = self.exact(conv)
            if exact != segs or exact.split != segs.split:
                self.failed = True
                return exact
        return segs

    def _learn(self, key: tuple) -> tuple[list, tuple] | None:
        questions: list[tuple] = []
        touched: list[str] = []
        probe = _probe_class(questions, touched)
        probes, plain, k = [], [], 0
        for role, has_reasoning in key:
            r = k + 1 if has_reasoning else None
            probes.append(Message(role, probe(f"{_MARK}{k}{_END}", k),
                                  reasoning=None if r is None else probe(f"{_MARK}{r}{_END}", r)))
            plain.append(Message(role, f"{_MARK}{k}{_END}", reasoning=None if r is None else f"{_MARK}{r}{_END}"))
            k += 2 if has_reasoning else 1
        try:
            self.template.render(probes)
            for i, m in enumerate(probes):
                if m.role == "assistant":
                    self.template.render(probes[:i], add_generation_prompt=True)
                    if i + 1 < len(probes):  # the last turn's own render is the full one
                        self.template.render(probes[:i + 1])
        except SftlabError:
            return None  # the exact method reports it, naming the conversation
        if touched:
            return None
        try:
            labels = self.exact(Conversation(plain))
        except SftlabError:
            return None
        out = []
        for ex in labels:
            fmts = []
            for text, trained in ex:
                rest = _SENTINEL.sub("", text)
                if _MARK in rest or _END in rest:
                    return None
                fmt = _SENTINEL.sub(lambda m: "{" + m.group(1) + "}",
                                    text.replace("{", "{{").replace("}", "}}"))
                fmts.append((fmt, trained))
            out.append(fmts)
        return labels.__class__(out, split=labels.split, notes=labels.notes), tuple(dict.fromkeys(questions))
