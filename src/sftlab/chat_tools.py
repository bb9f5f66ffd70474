"""Tool calls in chat: the streamed reply's hold-back (a call is shown once, formatted, in whatever dialect
the model writes it), the calls of a reply as chat plays them, and the ``--tools`` file (chat, generate)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sftlab.core.errors import SftlabError
from sftlab.data.doctor_tools import function_schemas
from sftlab.data.templates import ChatTemplate
from sftlab.data.types import Message
from sftlab.eval.generation import split_reply
from sftlab.eval.tool_calls import call_arguments, parse_tool_calls


def ignores_tools(template: ChatTemplate, tools: list[dict] | None) -> bool:
    """Does ``template`` render a prompt the same with ``tools`` as without (the model never sees them)?"""
    probe = [Message("user", "hi")]
    return bool(tools) and template.render(probe, True, tools=tools) == template.render(probe, True)


# Where a call starts, in every dialect parse_tool_calls reads (eval/tool_calls.py), whatever the template's own:
# a model may write another one (its base model's), and chat plays such a call too. A reply whose answer is
# bare JSON is the json dialect's call.
CALL_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")


def _may_be_call(answer: str) -> bool:
    """Could ``answer`` (a reply's text after any reasoning, so far) still turn out to be a bare-JSON call?
    True while its JSON value is incomplete; False once it holds text after the value or the value is
    not call-shaped, so a JSON answer is streamed from there."""
    body = answer.lstrip()
    if body[:1] not in ("{", "["):
        return False
    try:
        _, end = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError:
        return True  # not complete yet (or never valid JSON: shown when the reply ends)
    return not body[end:].strip() and parse_tool_calls(body).dialect == "json"


class HoldCalls:
    """Streams a reply's text to ``write`` but holds it back from where a tool call may open, in any
    dialect the parser reads, whatever the template's own: a marker (:data:`CALL_MARKERS`) anywhere in the
    answer, or an answer that starts as JSON, held while it may still be a call. So a call is shown once,
    formatted, not also raw. A marker's first characters at the end of the text wait for the next piece;
    text inside reasoning (``<think>`` not yet closed) is streamed; so is all text when not ``active`` (no
    tools: no call is played). :meth:`finish` writes what was held when no call was made."""

    def __init__(self, write: Callable[[str], None], active: bool = True):
        self.write, self.active = write, active
        self.text, self.shown, self.held = "", 0, False

    def __call__(self, piece: str) -> None:
        self.text += piece
        if not self.active:  # no tools offered: no call is played, the text streams as it comes
            return self._show(len(self.text))
        if self.held:
            return
        text, start = self.text, 0
        if "</think>" in text:  # the answer follows the reasoning (whose <think> the prompt may have opened)
            start = text.find("</think>") + len("</think>")
        elif text.lstrip().startswith("<think>"):
            return self._show(len(text))
        if _may_be_call(text[start:]):
            return self._show(start)  # held until the JSON is complete (a call) or shows it is not one
        found = [k for o in CALL_MARKERS if (k := text.find(o, start)) >= 0]
        if found:
            self._show(min(found))
            self.held = True
            return
        wait = max((n for o in CALL_MARKERS for n in range(1, len(o)) if text.endswith(o[:n])), default=0)
        self._show(len(text) - wait)

    def _show(self, upto: int) -> None:
        if upto > self.shown:
            self.write(self.text[self.shown:upto])
            self.shown = upto

    def finish(self, called: bool, content: str = "") -> None:
        """The reply ended: its held text is shown unless it was the call (shown formatted instead); then
        ``content`` (the reply's text outside its calls) as far as it was not shown before the call, so text
        the model wrote after a call is not hidden."""
        if not called:
            return self._show(len(self.text))
        before = split_reply(self.text[:self.shown])[0].strip()
        after = content.strip()[len(before):].strip() if content.strip().startswith(before) else ""
        if after:
            self.write(("" if self.text[:self.shown].endswith(("\n", " ")) or not before else " ") + after)


def played_calls(raw: str, tools: list[dict] | None) -> list[dict]:
    """The calls in a reply as ``{"name", "arguments": dict}``; [] for none or a call that does not parse.
    ``tools`` type the raw values of Qwen3-Coder's XML calls, as eval's check does."""
    parsed = parse_tool_calls(raw)
    schemas = function_schemas(tools)
    calls = []
    for c in parsed.calls:
        args, why = call_arguments(c, parsed.dialect, schemas)
        if why:
            return []
        calls.append({"name": c["name"], "arguments": args})
    return calls


def load_tools(path: str | Path) -> list[dict]:
    """Function schemas from a JSON file: a list, or an object with a "tools" list (OpenAI shape or bare
    ``{"name", "parameters"}``, returned in OpenAI shape as training reads them). Mistakes are one
    SftlabError line naming the file (and line)."""
    p = Path(path)
    if not p.is_file():
        raise SftlabError(f"tools file '{path}' not found", hint="pass a JSON file with a list of function schemas")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SftlabError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})", hint="fix the JSON syntax there")
    except UnicodeDecodeError:
        raise SftlabError(f"{path}: not UTF-8 text", hint="re-encode the file as UTF-8")
    tools = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(tools, list) or not tools:
        raise SftlabError(f"{path}: expected a JSON list of function schemas (or {{\"tools\": [...]}})",
                          hint='e.g. [{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}]')
    for i, t in enumerate(tools, start=1):
        if len(function_schemas([t])) != 1:
            raise SftlabError(f"{path}: tool {i} has no function name",
                              hint='write it as {"type": "function", "function": {"name": ..., "parameters": {...}}}')
        params = t.get("function", t).get("parameters")
        if params is not None and not isinstance(params, dict):
            raise SftlabError(f"{path}: tool {i} ({function_schemas([t]).popitem()[0]}): \"parameters\" is not a JSON object",
                              hint="give a JSON schema object, e.g. {\"type\": \"object\", \"properties\": {...}}")
    # in OpenAI's shape, as training data's tools are read: the template renders the same schemas as in training
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]
