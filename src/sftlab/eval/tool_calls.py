"""Tool calls in generated text: parse the four common dialects, and check a call against the schemas.

Dialects, tried in this order:
    hermes       ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call
                 (Hermes, Qwen2.5/3, SmolLM3 and sftlab's own tool template)
    qwen3_coder  ``<tool_call><function=NAME><parameter=KEY>VALUE</parameter>...</function></tool_call>``
                 (Qwen3-Coder's XML form; several ``<function=...>`` are several calls). A value is raw
                 text, one newline after the opening and before the closing tag left out; it is typed by
                 the function's schema when the call is checked (:func:`call_arguments`)
    mistral      ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``, ``[TOOL_CALLS]name[ARGS]{...}``
                 or ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`` (v13 tokenizers; the id is not kept)
    json         the whole reply is ``{"name": ..., "parameters": {...}}`` (Llama 3.1/3.2, optionally after
                 ``<|python_tag|>``) or a list of such objects (Mistral with its special token stripped)

A call is valid when it parses, names a function the conversation's ``tools`` offer, and its
arguments fit that function's ``parameters`` schema (required names present, no unknown names,
basic JSON types and enums: :func:`sftlab.data.doctor_tools.argument_problems`, the rules the data
doctor applies to training data).
"""

from __future__ import annotations

import json
import math
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
_MISTRAL_ARGS = re.compile(r"\s*([A-Za-z0-9_.\-]+)(?:\[CALL_ID\]\s*[A-Za-z0-9_\-]*\s*)?\[ARGS\]", re.S)
_XML = "qwen3_coder"
_XML_FUNCTION = re.compile(r"<function=([^<>\n]*)>")
_XML_PARAMETER = re.compile(r"<parameter=([^<>\n]*)>")
_SPACE = re.compile(r"\s*")


@dataclass
class ParsedCalls:
    """What :func:`parse_tool_calls` found. ``calls``: ``{"name", "arguments"}`` dicts (arguments as
    written: usually a dict; for qwen3_coder a dict of each parameter's raw text, which
    :func:`call_arguments` types by the schema); ``dialect``: hermes/qwen3_coder/mistral/json, None when
    the text holds no call;
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


def _xml_value(body: str, pos: int, where: str) -> tuple[str | None, int, str | None]:
    """(raw text, position after </parameter>, None) of the value starting at ``pos``, or an error. Like
    Qwen3-Coder's parser, a value ends at the first </parameter>, <parameter= or </function>; only the
    first closes it. One newline right after the opening tag and one right before the closing are left out."""
    ends = [(k, t) for t in ("</parameter>", "<parameter=", "</function>") if (k := body.find(t, pos)) >= 0]
    end, tag = min(ends) if ends else (-1, "")
    if tag != "</parameter>":
        before = {"<parameter=": " before the next <parameter=", "</function>": " before </function>"}.get(tag, "")
        return None, pos, f"{where} is never closed (no </parameter>{before})"
    value = body[pos:end]
    value = value[1:] if value.startswith("\n") else value
    value = value[:-1] if value.endswith("\n") else value
    return value, end + len("</parameter>"), None


def _xml_calls(body: str) -> tuple[list[dict], str | None]:
    """The calls in one <tool_call> block of Qwen3-Coder's XML form, or why it does not parse."""
    calls, pos = [], 0
    while (pos := _SPACE.match(body, pos).end()) < len(body):
        fn = _XML_FUNCTION.match(body, pos)
        if not fn:
            return [], "text outside <function=...> inside a <tool_call> block"
        name, pos, args = fn.group(1).strip(), fn.end(), {}
        if not name:
            return [], "a <function=> has no name"
        while True:
            pos = _SPACE.match(body, pos).end()
            if body.startswith("</function>", pos):
                pos += len("</function>")
                break
            par = _XML_PARAMETER.match(body, pos)
            if not par:
                what = "is never closed (no </function>)" if pos == len(body) else \
                    "holds text outside its <parameter=...> tags"
                return [], f"<function={name}> {what}"
            key = par.group(1).strip()
            if not key or key in args:
                return [], f"<function={name}> has a <parameter={key}> {'twice' if key else 'without a name'}"
            args[key], pos, why = _xml_value(body, par.end(), f"<parameter={key}> in <function={name}>")
            if why:
                return [], why
        calls.append({"name": name, "arguments": args})
    return calls, None


def _hermes(text: str) -> ParsedCalls:
    blocks = list(_HERMES.finditer(text))
    content = _HERMES.sub("", text).strip()
    objs, forms = [], set()
    for b in blocks:
        xml = b.group(1).startswith("<function=")
        dialect = _XML if xml else "hermes"
        if not b.group(2):
            return ParsedCalls([], dialect, "a <tool_call> block is never closed", content)
        forms.add(dialect)
        if xml:
            calls, why = _xml_calls(b.group(1))
            if why:
                return ParsedCalls([], _XML, why, content)
            objs += calls
            continue
        try:
            obj, rest = _decode_first(b.group(1))
        except json.JSONDecodeError as exc:
            return ParsedCalls([], "hermes", f"a <tool_call> block is not JSON ({exc.msg})", content)
        if rest.strip():
            return ParsedCalls([], "hermes", "text after the JSON inside a <tool_call> block", content)
        objs += obj if isinstance(obj, list) else [obj]
    if len(forms) > 1:  # the raw XML texts could not be told from JSON arguments that are strings
        return ParsedCalls([], _XML, "the <tool_call> blocks mix JSON and <function=...> calls", content)
    return _from_objects(objs, _XML if _XML in forms else "hermes", content)


def _mistral(text: str) -> ParsedCalls:
    content, _, body = text.partition(_MISTRAL)
    body = body.strip()
    try:
        if body.startswith("["):  # v3: a JSON list of calls
            value, rest = _decode_first(body)
            if rest.strip() or not isinstance(value, list):
                return ParsedCalls([], "mistral", "[TOOL_CALLS] is not followed by one JSON list", content.strip())
            return _from_objects(value, "mistral", content.strip())
        objs = []  # v11+: name[ARGS]{...}; v13: name[CALL_ID]id[ARGS]{...}; repeated
        while body:
            m = _MISTRAL_ARGS.match(body)
            if not m:
                return ParsedCalls([], "mistral", "[TOOL_CALLS] is followed by neither a JSON list nor "
                                   "name[ARGS] (or name[CALL_ID]id[ARGS])", content.strip())
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


_NO_VALUE = object()


def _json_value(text: str) -> Any:
    """``text`` decoded as one JSON value (NaN and Infinity refused), or _NO_VALUE."""
    def refuse(name: str) -> Any:
        raise ValueError(name)

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError:  # JSONDecodeError is one
        return _NO_VALUE


def typed_value(raw: str, spec: Any) -> Any:
    """A Qwen3-Coder XML parameter's raw text as the value its property schema's ``type`` asks for, by the
    rules of Qwen3-Coder's own parser (vLLM's qwen3coder_tool_parser): ``null`` is None; string stays
    text; integer/number, object/array decode as JSON; boolean is true/false in any case; an unknown or
    missing type tries JSON, then keeps the text. Text that does not convert stays text, so the schema
    check then says the type is wrong (vLLM reads any boolean but "true"/"1" as false)."""
    if raw.strip().lower() == "null":
        return None
    want = spec.get("type") if isinstance(spec, dict) else None
    names = {n.lower() for n in (want if isinstance(want, list) else [want]) if isinstance(n, str)} - {"null"}
    if "string" in names:
        return raw
    if names == {"boolean"}:
        return {"true": True, "false": False}.get(raw.strip().lower(), raw)
    value = _json_value(raw.strip())
    if value is _NO_VALUE:
        return raw
    if names and names <= {"integer", "number"}:
        numeric = (isinstance(value, int) and not isinstance(value, bool)
                   or isinstance(value, float) and math.isfinite(value))
        return value if numeric else raw
    return value


def call_arguments(call: dict, dialect: str | None, schemas: dict[str, dict]) -> tuple[dict | None, str | None]:
    """(one parsed call's arguments as a dict, None) or (None, what is wrong): JSON arguments decoded
    (:func:`~sftlab.data.doctor_tools.parse_arguments`); a qwen3_coder call's raw texts typed by the
    ``properties`` of the function's schema in ``schemas`` (:func:`typed_value`)."""
    if dialect != _XML:
        return parse_arguments(call["arguments"])
    props = schemas.get(call["name"], {}).get("properties")
    props = props if isinstance(props, dict) else {}
    return {k: typed_value(v, props.get(k)) for k, v in call["arguments"].items()}, None


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
        args, why = call_arguments(c, parsed.dialect, schemas)
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
