"""The label rule: which text of each assistant turn is trained, and in which example.

Each assistant turn ``i`` is trained exactly as the model produces it at inference: the text that
follows ``render(messages[:i], generation prompt)`` within ``render(messages[:i+1])``, through the
turn's end-of-turn token(s). A conversation is one example where history renders unchanged, else one
example per assistant turn in its exact inference prompt (see ``masking`` for the whole picture).
:class:`TurnRule` is mixed into ``masking.Labeler``, whose attributes it uses (``template``,
``masking``, ``reasoning``, ``eos``, ``_specials``, ``eos_appended``).
"""

from __future__ import annotations

import json

from sftlab.core.errors import SftlabError
from sftlab.data.types import Conversation, Message

# Why a conversation was split into one example per turn / how turns were cut (for the report).
SPLIT_HISTORY = "the template renders earlier turns differently from how the model produced them"
NOTE_GEN_PROMPT = ("the inference prompt is not a prefix of the rendered turn: one example per turn, the turn "
                   "trained from where the prompt's end is found in it")
NOTE_NEXT_ROLE = "a turn renders no end-of-turn token: the next role's token is trained as its end"
NOTE_WHOLE = "reasoning: keep|last or masking: all: each chat one example, its turns as its full render shows them"
NOTE_OPEN_THINK = ("the inference prompt opens a <think> block the rendered turn does not show: the turn's reasoning "
                   "(empty when it has none) and </think> are trained before its reply, as the model writes them")


def reasoning_lost_warning(n: int, reasoning: str, masking: str) -> tuple[str, str] | None:
    """(warning, fix) when ``n`` assistant turns lose their reasoning in training: ``reasoning: keep|last``
    (or ``masking: all``) train one example per chat from its full render, and a template that drops a
    turn's reasoning there (Qwen3 before the last user message, DeepSeek-R1, GPT-OSS) trains that turn
    without it. None when no turn does."""
    if not n:
        return None
    why = f"reasoning: {reasoning}" if reasoning in ("keep", "last") else f"masking: {masking}"
    text = (f"{n} assistant turn{'s' * (n != 1)} with reasoning {'are' if n != 1 else 'is'} trained without it: "
            f"{why} trains each chat as one example from its full render, and the chat template drops that reasoning there")
    fix = ("set reasoning: per_turn to train each turn with its reasoning in its own inference context"
           + (" (with masking: all_assistant)" if masking == "all" else ""))
    return text, fix


class ConvLabels(list):
    """A conversation's examples (each a list of (text, trained) pieces), with how they were cut:
    ``split`` (one example per assistant turn), ``notes`` (the report's reasons) and ``reasoning_lost``
    (assistant turns with reasoning trained without it: one example from a full render that drops it)."""

    def __init__(self, examples=(), split: bool = False, notes: tuple[str, ...] = (), reasoning_lost: int = 0):
        super().__init__(examples)
        self.split = split
        self.notes = notes
        self.reasoning_lost = reasoning_lost


class TurnRule:
    """The exact label rule, by rendering each turn's inference prompt and the turn itself."""

    _notes: list[str]

    def _note(self, why: str) -> None:
        if why not in self._notes:
            self._notes.append(why)

    def _examples_exact(self, conv: Conversation, render=None) -> ConvLabels:
        """The label rule (module docstring), by rendering each turn's inference prompt and the turn.

        ``render`` stands in for ``template.render`` (the skeleton's renders, pasted from format strings):
        every decision below that looks at the text is then made on the real text.
        """
        self._notes = []
        render = render or self.template.render
        msgs, tools = conv.messages, conv.tools
        full = render(msgs, tools=tools)
        assistant_idx = [i for i, m in enumerate(msgs) if m.role == "assistant"]
        prompts = [render(msgs[:i], add_generation_prompt=True, tools=tools) for i in assistant_idx]
        whole = self.masking == "all" or self.reasoning in ("keep", "last")
        turns = []  # (rendered through this turn, trained start and end, end token found, prompt is its prefix)
        replies = []  # each turn's trained text in its own example (where the prompt is not its prefix)
        for n, (i, prompt) in enumerate(zip(assistant_idx, prompts)):
            rendered = full if i == len(msgs) - 1 else render(msgs[:i + 1], tools=tools)
            self._check_thinking_closed(conv, msgs[i], prompt, n + 1, whole)
            start, exact = _align(prompt, rendered)
            lead = ""
            if not exact and not whole:  # (one example from the full render: its spans are found there)
                self._note(NOTE_GEN_PROMPT)
                start, lead = self._thinking_opened(msgs[i], prompt, rendered, start)
            end, has_end = self._turn_end(rendered, start)
            self._check_turn(conv, msgs[i], lead + rendered[start:end], n + 1, whole)
            turns.append((rendered, start, end, has_end, exact))
            replies.append(lead + rendered[start:end])
        for m in msgs:
            # a template may JSON-encode a result (Mistral's `content | tojson`): look for either form
            if m.role == "tool" and m.content.strip() and m.content.strip() not in full and \
                    json.dumps(m.content.strip(), ensure_ascii=False)[1:-1] not in full:
                raise SftlabError(f"{conv.where()}: the chat template '{self.template.name}' does not render tool results",
                                  hint="use a template with a tool role, e.g. --template chatml-tools")
        last = self.masking == "last_assistant"
        lost = 0
        if whole:
            self._note(NOTE_WHOLE)
            spans = self._spans_in_full(conv, full, prompts, turns)
            # trained turns whose reasoning the full render drops (Qwen3 before the last query, DeepSeek-R1, GPT-OSS)
            lost = sum(1 for n, ((b, e, _), i) in enumerate(zip(spans, assistant_idx))
                       if (msgs[i].reasoning or "").strip() and msgs[i].reasoning.strip() not in full[b:e]
                       and (not last or n == len(spans) - 1))
        elif all(exact and full.startswith(r[:e]) for r, _, e, _, exact in turns):
            spans = [(s, e, h) for _, s, e, h, _ in turns]
        else:
            if not all(full.startswith(r[:e]) for r, _, e, _, _ in turns):
                self._note(SPLIT_HISTORY)
            out = ConvLabels()
            for n, ((_, _, _, has_end, _), prompt, text) in enumerate(zip(turns, prompts, replies)):
                if last and n < len(turns) - 1:
                    continue
                # the context is the inference prompt itself (the rendered prefix where they agree)
                reply = text + ("" if has_end else self._eos_or_fail(conv))
                out.append([(prompt, False), (reply, True)] if prompt else [(reply, True)])
            out.split, out.notes = True, tuple(self._notes)
            return out
        segs = self._cut(conv, full, spans, last)
        return ConvLabels([segs], split=False, notes=tuple(self._notes), reasoning_lost=lost)

    def _cut(self, conv, full: str, spans, last: bool) -> list[tuple[str, bool]]:
        """One example: ``full`` cut at the trained spans (start, end, end token found)."""
        segs: list[tuple[str, bool]] = []
        cursor = 0
        for n, (start, end, has_end) in enumerate(spans):
            reply = full[start:end]
            if not has_end:
                nxt = self._special_at(full, end)
                if nxt is not None:  # the turn ends at the next role's token (GLM-style)
                    self._note(NOTE_NEXT_ROLE)
                    end += len(nxt)
                    reply += nxt
                else:
                    reply += self._eos_or_fail(conv)
            if cursor < start:
                segs.append((full[cursor:start], False))
            segs.append((reply, self.masking == "all" or not last or n == len(spans) - 1))
            cursor = end
        if cursor < len(full):
            segs.append((full[cursor:], False))
        if self.masking == "all":
            segs = [(t, True) for t, _ in segs]
        return segs

    def _spans_in_full(self, conv, full: str, prompts: list[str], turns) -> list[tuple[int, int, bool]]:
        """Each turn's trained span within the full render (``reasoning: keep|last``, ``masking: all``)."""
        spans = []
        cursor = 0
        starts = [_align(p, full)[0] for p in prompts] + [len(full)]
        for n, (rendered, start, end, has_end, _) in enumerate(turns):
            begin = max(cursor, min(starts[n], start))
            if full[:end] == rendered[:end] and end >= begin:
                spans.append((begin, end, has_end))
                cursor = end
                continue
            # History renders this turn differently: train it as the full render shows it, through the
            # token that ends it in its own render (Qwen3's <|im_end|>, after any tool calls), else up to the
            # first special token after its text (GPT-OSS ends history turns <|end|>, not <|return|>); in
            # either case before the next turn starts.
            limit = max(starts[n + 1], begin)
            content = conv.messages[[i for i, m in enumerate(conv.messages) if m.role == "assistant"][n]].content.strip()
            at = full.find(content, begin, limit) if content else -1
            pos = at + len(content) if at >= 0 else begin
            last_tok = next((s for s in self._specials if rendered[:end].endswith(s)), None) if has_end else None
            found = full.find(last_tok, pos, limit) if last_tok else -1
            stop = last_tok if found >= 0 else None
            pos = found if found >= 0 else pos
            while pos < limit and stop is None:
                stop = self._special_at(full, pos)
                pos += 1 if stop is None else 0
            if stop is None:
                raise SftlabError(f"{conv.where()}: cannot find where assistant turn {n + 1} ends in the full render",
                                  hint="use reasoning: per_turn (one example per turn)")
            spans.append((begin, pos + len(stop), True))
            cursor = pos + len(stop)
        return spans

    def _check_thinking_closed(self, conv: Conversation, m: Message, prompt: str, nth: int, whole: bool) -> None:
        """A turn with reasoning whose inference prompt already closes the thinking block (Qwen3 under
        ``enable_thinking: false`` ends it ``<think>\n\n</think>\n\n``): the model never writes reasoning
        there, and training it after the closed block would teach it to."""
        if m.reasoning and m.reasoning.strip() and not whole and prompt.rstrip().endswith("</think>"):
            raise SftlabError(f"{conv.where()}: assistant turn {nth} has reasoning, but the chat template '{self.template.name}' "
                              "closes the thinking block in the inference prompt (enable_thinking: false?), so the model "
                              "never writes reasoning there",
                              hint="set reasoning: drop to train the answers without it, or remove enable_thinking: false "
                                   "from chat_template_kwargs")

    def _thinking_opened(self, m: Message, prompt: str, rendered: str, start: int) -> tuple[int, str]:
        """(where the turn starts in ``rendered``, text the model writes before it) where the inference prompt
        ends inside a ``<think>`` block that the rendered turn does not show (DeepSeek-R1: the prompt ends
        ``<think>\n`` and every turn is rendered without its reasoning). The model continues the open block:
        its reasoning (empty when it has none), ``</think>``, then the reply as rendered; trained otherwise
        from the prompt's end, it would learn to answer inside the thinking block and never close it."""
        if not prompt.rstrip().endswith("<think>"):
            return start, ""
        p = prompt.rindex("<think>")
        head, _ = _align(prompt[:p], rendered)
        end, _ = self._turn_end(rendered, head)
        if "<think>" in rendered[head:end] or "</think>" in rendered[head:end]:
            return start, ""  # the turn renders a thinking block of its own: trained as rendered
        self._note(NOTE_OPEN_THINK)
        block = f"<think>\n{m.reasoning or ''}\n</think>\n\n"  # as inline reasoning is written (templates.py)
        lead = block[len(prompt) - p:] if block.startswith(prompt[p:]) else f"{m.reasoning or ''}\n</think>\n\n"
        if m.reasoning is not None and not self.template.renders_reasoning and rendered.startswith("\n\n", head):
            head += 2  # what the template left of the inline block it cut at </think>
        return head, lead

    def _turn_end(self, rendered: str, start: int) -> tuple[int, bool]:
        """(end of the trained span, whether it ends in a special token).

        The turn's end-of-turn tokens are the first unbroken run of special tokens in the text's tail
        of special tokens and white space: Cohere2's ``<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`` is one
        run; Phi-3's ``<|end|>\n<|endoftext|>`` ends the turn at ``<|end|>`` (the EOS after it closes
        the document, not the turn). Without such a tail the span is the text, white space trimmed.
        """
        body = rendered[start:]
        text = body.rstrip()
        while True:  # strip the tail of special tokens and white space from the end
            tok = next((s for s in self._specials if text.endswith(s)), None)
            if tok is None:
                break
            text = text[: -len(tok)].rstrip()
        tail = body[len(text):]
        if not tail.strip():
            return start + len(body.rstrip()), False
        p = run = len(text) + len(tail) - len(tail.lstrip())
        while (tok := self._special_at(body, p)) is not None:
            p += len(tok)
        doc_end = getattr(self, "_doc_end", None)
        if doc_end and p - len(doc_end) > run and body.startswith(doc_end, p - len(doc_end)) and not body[p:].strip():
            p -= len(doc_end)  # Phi-4-mini's EOS after the last turn closes the document, not the turn
        return start + p, True

    def _document_end(self) -> str | None:
        """The special tokens a template writes after the last turn only, glued to its end-of-turn token
        (Phi-4-mini ends a conversation ``<|end|><|endoftext|>``, a turn that more follows ``<|end|>``): they
        close the document, and the model stops at the turn's own end. Probed once on two renders."""
        self._doc_end = None
        probe = "\ue002reply\ue002"
        try:
            alone = self.template.render([Message("user", "hi"), Message("assistant", probe)])
            more = self.template.render([Message("user", "hi"), Message("assistant", probe), Message("user", "hi")])
        except SftlabError:
            return None
        at = alone.find(probe) + len(probe)
        if at < len(probe) or more.find(probe) + len(probe) != at:
            return None
        end, has_end = self._turn_end(alone, at)
        p = at  # the special tokens both renders write after the reply
        while p < end and (tok := self._special_at(alone, p)) is not None and more.startswith(tok, p):
            p += len(tok)
        extra = alone[p:end]
        if has_end and at < p < end and self._special_at(alone, p) is not None:
            return extra
        return None

    def _check_turn(self, conv: Conversation, m: Message, trained: str, nth: int, whole: bool) -> None:
        if m.reasoning and m.reasoning.strip() not in trained and not whole:
            raise SftlabError(f"{conv.where()}: the chat template '{self.template.name}' drops the reasoning of assistant "
                              f"turn {nth} even where it is the turn the model produces",
                              hint="set reasoning: drop to train answers without it, or use a template that renders it")
        content = m.content.strip()
        if content and content not in trained:
            raise SftlabError(f"{conv.where()}: the chat template '{self.template.name}' does not render assistant reply {nth} verbatim",
                              hint="use a template that keeps message content as is, e.g. --template chatml")
        names = [call["function"]["name"] for call in m.tool_calls or ()]
        for name in dict.fromkeys(names):
            if name not in trained:
                raise SftlabError(f"{conv.where()}: the chat template '{self.template.name}' does not render the tool calls "
                                  f"of assistant turn {nth}", hint="use a template that renders tools, e.g. --template chatml-tools")
            if trained.count(name) < names.count(name):  # GPT-OSS's renders only a turn's first call
                raise SftlabError(f"{conv.where()}: the chat template '{self.template.name}' renders {trained.count(name)} of "
                                  f"the {names.count(name)} calls to '{name}' in assistant turn {nth}: the others would be lost",
                                  hint="give each call its own assistant message, or use a template that renders them all, "
                                       "e.g. --template chatml-tools")

    def _eos_or_fail(self, conv: Conversation) -> str:
        if not self.eos:
            raise SftlabError(f"{conv.where()}: the template writes no end-of-turn token and the tokenizer has no EOS",
                              hint="use a template with an end-of-turn token, e.g. --template chatml")
        self.eos_appended = True
        return self.eos

    def _special_at(self, full: str, pos: int) -> str | None:
        for s in self._specials:
            if full.startswith(s, pos):
                return s
        return None


def _common(a: str, b: str) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on prefix equality: C-speed slices instead of a Python loop
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _align(prompt: str, rendered: str) -> tuple[int, bool]:
    """Where the turn starts in ``rendered`` (the conversation through the turn), and whether the
    inference ``prompt`` is exactly its prefix. Otherwise (Mistral v3 moves the system prompt into the
    last user message; DeepSeek-R1's prompt opens ``<think>``) the turn starts after the longest tail
    of the prompt that ``rendered`` continues with from where the two first differ."""
    if rendered.startswith(prompt):
        return len(prompt), True
    c = _common(prompt, rendered)
    for k in range(c, len(prompt)):
        if rendered.startswith(prompt[k:], c):
            return c + len(prompt) - k, False
    return c, False
