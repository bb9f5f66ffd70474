"""Tool calls in generated text: parse the three common dialects, and check a call against the schemas.

Dialects, tried in this order:
    hermes   ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call
             (Hermes, Qwen2.5/3, SmolLM3 and sftlab's own tool template)
    mistral  ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` or ``[TOOL_CALLS]name[ARGS]{...}``
    json     the whole reply is ``{"name": ..., "parameters": {...}}`` (Llama 3.1/3.2, optionally after
             ``<|python_tag|>``) or a list of such objects (Mistral with its special token stripped)

A call is valid when it parses, names a function the conversation's ``tools`` offer, and its
arguments fit that function's ``parameters`` schema (required names present, no unknown names,
basic JSON types and enums: :func:`sftlab.data.doctor_tools.argument_problems`, the rules the data
doctor applies to training data).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from sftlab.data.doctor_tools import (
    argument_problems,
    call_parts,
    function_schemas,
    parse_arguments,
)

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(</tool_call>|$)", re.S)
_MISTRAL = "[TOOL_CALLS]"
_MISTRAL_ARGS = re.compile(r"\s*([A-Za-z0-9_.\-]+)\[ARGS\]", re.S)


@dataclass
class ParsedCalls:
    """What :func:`parse_tool_calls` found. ``calls``: ``{"name", "arguments"}`` dicts (arguments as
    written: usually a dict); ``dialect``: hermes/mistral/json, None when the text holds no call;
    ``error``: why a call-shaped text does not parse; ``content``: the text outside the calls."""

    calls: list[dict] = field(default_factory=list)
    dialect: str | None = None
    error: str | None = None
    content: str = ""


def _decode_first(text: str) -> tuple[Any, str]:
    """The first JSON value at the start of ``text`` (spaces skipped) and what follows it."""
    text = text.lstrip()
    value, end = json.JSONDecoder().raw_decode(text)
    return value, text[end:]


def _as_call(obj: Any) -> dict | None:
    name, args = call_parts(obj)
    if name is None:
        return None
    return {"name": name, "arguments": args}


def _from_objects(objs: list, dialect: str, content: str) -> ParsedCalls:
    calls = [_as_call(o) for o in objs]
    if not calls or any(c is None for c in calls):
        return ParsedCalls([], dialect, "a call lacks a \"name\"", content)
    return ParsedCalls(calls, dialect, None, content)  # type: ignore[arg-type]


def _hermes(text: str) -> ParsedCalls:
    blocks = list(_HERMES.finditer(text))
    content = _HERMES.sub("", text).strip()
    objs = []
    for b in blocks:
        if not b.group(2):
            return ParsedCalls([], "hermes", "a <tool_call> block is never closed", content)
        try:
            obj, rest = _decode_first(b.group(1))
        except json.JSONDecodeError as exc:
            return ParsedCalls([], "hermes", f"a <tool_call> block is not JSON ({exc.msg})", content)
        if rest.strip():
            return ParsedCalls([], "hermes", "text after the JSON inside a <tool_call> block", content)
        objs += obj if isinstance(obj, list) else [obj]
    return _from_objects(objs, "hermes", content)


def _mistral(text: str) -> ParsedCalls:
    content, _, body = text.partition(_MISTRAL)
    body = body.strip()
    try:
        if body.startswith("["):  # v3: a JSON list of calls
            value, rest = _decode_first(body)
            if rest.strip() or not isinstance(value, list):
                return ParsedCalls([], "mistral", "[TOOL_CALLS] is not followed by one JSON list", content.strip())
            return _from_objects(value, "mistral", content.strip())
        objs = []  # v11+: name[ARGS]{...}, repeated
        while body:
            m = _MISTRAL_ARGS.match(body)
            if not m:
                return ParsedCalls([], "mistral", "[TOOL_CALLS] is followed by neither a JSON list nor name[ARGS]",
                                   content.strip())
            args, body = _decode_first(body[m.end():])
            objs.append({"name": m.group(1), "arguments": args})
            body = body.strip().removeprefix(_MISTRAL).strip()
        return _from_objects(objs, "mistral", content.strip())
    except json.JSONDecodeError as exc:
        return ParsedCalls([], "mistral", f"the [TOOL_CALLS] arguments are not JSON ({exc.msg})", content.strip())


def _call_shaped(o: Any) -> bool:
    """A JSON object that reads as a call, not as a JSON answer that happens to have a "name"."""
    return isinstance(o, dict) and (isinstance(o.get("function"), dict)
                                    or ("name" in o and ("parameters" in o or "arguments" in o)))


def parse_tool_calls(text: str) -> ParsedCalls:
    """The tool calls in a generated reply (see the module docstring). Plain text gives no calls."""
    if "<tool_call>" in text:
        return _hermes(text)
    if _MISTRAL in text:
        return _mistral(text)
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if body[:1] in ("{", "["):
        try:
            value, rest = _decode_first(body)
        except json.JSONDecodeError:
            value, rest = None, "x"
        objs = value if isinstance(value, list) else [value]
        if not rest.strip() and objs and all(map(_call_shaped, objs)):
            return _from_objects(objs, "json", "")
    return ParsedCalls([], None, None, text.strip())


@dataclass
class ToolCallCheck:
    """One reply checked against the tools: ``valid`` with the parsed ``calls``, or ``why`` not."""

    valid: bool
    why: str | None
    calls: list[dict]
    dialect: str | None


def check_tool_calls(text: str, tools: list[dict] | None) -> ToolCallCheck:
    """Does ``text`` hold at least one call, every call parsing, naming a known function, with fitting arguments?"""
    parsed = parse_tool_calls(text)
    if parsed.error:
        return ToolCallCheck(False, parsed.error, [], parsed.dialect)
    if not parsed.calls:
        return ToolCallCheck(False, "no tool call in the reply", [], None)
    schemas = function_schemas(tools)
    calls = []
    for c in parsed.calls:
        args, why = parse_arguments(c["arguments"])
        if why:
            return ToolCallCheck(False, f"call {c['name']!r}: {why}", calls, parsed.dialect)
        calls.append({"name": c["name"], "arguments": args})
        if c["name"] not in schemas:
            return ToolCallCheck(False, f"call {c['name']!r}: not one of the tools ({', '.join(schemas) or 'none'})",
                                 calls, parsed.dialect)
        problems = argument_problems(args, schemas[c["name"]])
        if problems:
            return ToolCallCheck(False, f"call {c['name']!r}: {'; '.join(problems)}", calls, parsed.dialect)
    return ToolCallCheck(True, None, calls, parsed.dialect)


def expected_calls(tool_calls) -> list[dict]:
    """A reference message's ``tool_calls`` as ``{"name", "arguments": dict}`` (arguments decoded)."""
    out = []
    for c in tool_calls or ():
        name, raw = call_parts(c)
        args, _ = parse_arguments(raw)
        out.append({"name": name, "arguments": args if args is not None else raw})
    return out


def _canon(v: Any) -> Any:
    """JSON values compared as JSON does: 34 == 34.0, but True is not 1."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return (type(v).__name__, v)
    if isinstance(v, (int, float)):
        return ("number", float(v))
    if isinstance(v, dict):
        return ("object", tuple(sorted((k, _canon(x)) for k, x in v.items())))
    if isinstance(v, list):
        return ("array", tuple(_canon(x) for x in v))
    return ("other", repr(v))


def same_calls(got: list[dict], want: list[dict]) -> bool:
    """The same calls (names and argument values), in any order."""
    key = lambda c: repr(_canon({"name": c["name"], "arguments": c["arguments"]}))  # noqa: E731
    return sorted(map(key, got)) == sorted(map(key, want))
