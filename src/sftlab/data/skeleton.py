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
   make. One inspection is allowed, because Llama 3's templates make it: stripping white space
   (``| trim``). Its result is again a recording stand-in, and the skeleton then serves only
   conversations whose contents have no white space to strip, where stripping changes nothing.
2. The labels of the skeleton are found by the exact method itself, run on unique sentinel contents,
   and the skeleton is rejected if a sentinel does not come back verbatim (escaped, split, dropped).
3. The first conversation of each role sequence and a regular sample of the rest (1 in
   ``VERIFY_EVERY``) are also labelled by the exact method and compared; a single difference
   disables the skeletons for the whole template and every conversation is labelled exactly.
"""

from __future__ import annotations

import re
from typing import Callable

from sftlab.data.types import Conversation, Message
from sftlab.errors import SftlabError

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


def _probe_class(touched: list[str], stripped: list[str]) -> type:
    """A str subclass whose instances record (in ``touched``) every inspection of their content.

    Stripping white space (no argument) is recorded in ``stripped`` instead and returns a probe again,
    so that whatever the template does with the stripped value is recorded too.
    """

    def wrap(name: str):
        base = getattr(str, name)

        def method(self, *args, **kwargs):
            if name in _STRIPS and not kwargs and all(a is None for a in args):
                stripped.append(name)
                return probe(base(self))
            touched.append(name)
            return base(self, *args, **kwargs)

        method.__name__ = name
        return method

    namespace = {name: wrap(name) for name in dir(str)
                 if name not in _OPAQUE and callable(getattr(str, name))}
    namespace["__str__"] = lambda self: self  # str(content), as in `{{ content }}`, stays a probe
    probe = type("ContentProbe", (str,), namespace)
    return probe


class Skeletons:
    """Per role sequence: each label segment as a format string over the message contents."""

    def __init__(self, template, exact_segments: Callable[[Conversation], list[tuple[str, bool]]]):
        self.template = template
        self.exact = exact_segments
        # role sequence -> (segments as format strings, valid only for stripped contents) or None
        self.cache: dict[tuple[str, ...], tuple[list[tuple[str, bool]], bool] | None] = {}
        self.failed = False  # a verification found a difference: label everything exactly
        self.n_seen = 0
        self.verified: set[tuple[str, ...]] = set()  # role sequences whose first skeleton use was checked

    def segments(self, conv: Conversation) -> list[tuple[str, bool]]:
        if self.failed:
            return self.exact(conv)
        msgs = conv.messages
        key = tuple(m.role for m in msgs)
        if key not in self.cache:
            self.cache[key] = self._learn(key)
        learnt = self.cache[key]
        contents = [m.content for m in msgs]
        if learnt is None or any(_MARK in c or _END in c for c in contents):
            return self.exact(conv)
        skeleton, needs_stripped = learnt
        if needs_stripped and any(c != c.strip() for c in contents):
            return self.exact(conv)
        segs = [(fmt.format(*contents), trained) for fmt, trained in skeleton]
        self.n_seen += 1
        if key not in self.verified or self.n_seen % VERIFY_EVERY == 0:
            self.verified.add(key)
            exact = self.exact(conv)
            if exact != segs:
                self.failed = True
                return exact
        return segs

    def _learn(self, roles: tuple[str, ...]) -> tuple[list[tuple[str, bool]], bool] | None:
        touched: list[str] = []
        stripped: list[str] = []
        probe = _probe_class(touched, stripped)
        probes = [Message(r, probe(f"{_MARK}{k}{_END}")) for k, r in enumerate(roles)]
        try:
            self.template.render(probes)
            for i, m in enumerate(probes):
                if m.role == "assistant":
                    self.template.render(probes[:i], add_generation_prompt=True)
        except SftlabError:
            return None  # the exact method reports it, naming the conversation
        if touched:
            return None
        plain = Conversation([Message(r, f"{_MARK}{k}{_END}") for k, r in enumerate(roles)])
        try:
            segs = self.exact(plain)
        except SftlabError:
            return None
        out = []
        for text, trained in segs:
            rest = _SENTINEL.sub("", text)
            if _MARK in rest or _END in rest:
                return None
            fmt = _SENTINEL.sub(lambda m: "{" + m.group(1) + "}",
                                text.replace("{", "{{").replace("}", "}}"))
            out.append((fmt, trained))
        return out, bool(stripped)
