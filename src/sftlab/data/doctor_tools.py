"""The data doctor's checks for tool-calling and reasoning data, and the JSON-schema subset they share
with evaluation (:mod:`sftlab.eval.tool_calls` scores generated calls with the same rules).

Per conversation: tool-call arguments that are not a JSON object, calls to a function the record's
``tools`` do not offer, argument names its schema does not list (and required ones missing), values
of the wrong JSON type, tool results with no call before them (or a ``tool_call_id`` no call has),
calls never answered before the conversation moves on; unclosed ``<think>`` blocks and reasoning in
user or system turns; reasoning read from a reply with a ``</think>`` and no ``<think>`` (info). Once per
data set, given a template: does it render ``tools`` and ``tool_calls`` at all (a template that drops
them trains replies the model can not reproduce)?
"""

from __future__ import annotations

import json
from typing import Any

from sftlab.core.errors import SftlabError
from sftlab.core.findings import Finding
from sftlab.data.doctor_checks import CHECKS
from sftlab.data.reasoning import THINK_OPEN, THINK_TAG, think_tag_problem
from sftlab.data.roles import answered_call, orphan_reason
from sftlab.data.types import Conversation, Message

TOOL_TEMPLATE_FIX = "train with a template that renders tools: --set template=chatml-tools (or the model's own tool template)"
_FIXES = {
    "tool_arguments": "write the call's arguments as a JSON object, e.g. {\"city\": \"Paris\"}",
    "tool_unknown_function": "add the function's schema to the record's \"tools\" list, or fix the name",
    "tool_schema": "make the arguments match the function's \"parameters\" schema (or fix the schema)",
    "tool_orphan_result": "put the assistant turn with the matching tool_calls right before the tool result",
    "tool_unanswered": "add a \"tool\" message with the call's result right after the assistant's call",
    "tool_result_order": "put the tool results in the order of the calls they answer",
    "reasoning_unclosed": "close the reasoning with </think> before the reply (or remove the stray tag)",
    "reasoning_in_user": "move the <think> block into the assistant turn (as reasoning_content or inline)",
    "reasoning_unopened": "nothing to do for DeepSeek-R1-style data (its prompt opens <think>); "
                          "otherwise add the missing <think> before the reasoning",
}


def _add(findings: list[Finding], check: str, conv: Conversation, message: str, fix: str | None = None) -> None:
    findings.append(Finding(check, CHECKS[check][0], message, where=conv.where(), fixes=[fix or _FIXES[check]],
                            data={"file": conv.source, "line": conv.line}))


# --- the JSON-schema subset ---------------------------------------------------------------------------

def function_schemas(tools: list[dict] | None) -> dict[str, dict]:
    """Function name -> its ``parameters`` schema ({} when it has none).

    Takes OpenAI's ``{"type": "function", "function": {"name", "parameters"}}`` and the bare
    ``{"name", "parameters"}`` shape; entries without a name are skipped.
    """
    out: dict[str, dict] = {}
    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            out[fn["name"]] = params if isinstance(params, dict) else {}
    return out


def call_parts(call: Any) -> tuple[str | None, Any]:
    """(name, arguments) of one call: OpenAI ``{"function": {"name", "arguments"}}`` or a bare
    ``{"name", "arguments"|"parameters"}``. Arguments come back as given (a dict, a JSON string, ...)."""
    if not isinstance(call, dict):
        return None, None
    fn = call.get("function", call)
    if not isinstance(fn, dict):
        return None, None
    args = fn.get("arguments", fn.get("parameters"))
    name = fn.get("name")
    return (name if isinstance(name, str) else None), args


def message_text(conv: Conversation, reasoning: str = "per_turn") -> str:
    """The text every template renders of a chat, without the template: contents, tool calls (name and
    arguments) and the reasoning training keeps at least (``keep``: all of it; ``per_turn`` and ``last``:
    the last assistant turn's, which its longest example holds; ``drop``: none). A lower bound of its length."""
    last = max((i for i, m in enumerate(conv.messages) if m.role == "assistant"), default=-1)
    parts = []
    for i, m in enumerate(conv.messages):
        if m.reasoning and (reasoning == "keep" or reasoning != "drop" and i == last):
            parts.append(m.reasoning)
        parts.append(m.content)
        for call in m.tool_calls or ():
            name, args = call_parts(call)
            parts.append(f"{name or ''} {args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}")
    return "\n".join(parts)


def parse_arguments(args: Any) -> tuple[dict | None, str | None]:
    """(arguments as a dict, None) or (None, what is wrong). A JSON string is decoded; None means {}."""
    if args is None:
        return {}, None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as exc:
            return None, f"arguments are not valid JSON ({exc.msg} at character {exc.pos})"
    if not isinstance(args, dict):
        return None, f"arguments are a JSON {_json_type(args)}, not an object"
    return args, None


_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list,),
          "object": (dict,), "null": (type(None),)}


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    for name in ("number", "string", "array", "object", "null"):
        if isinstance(v, _TYPES[name]):
            return name
    return type(v).__name__


def type_ok(value: Any, schema: dict) -> bool:
    """Does ``value`` have the schema's JSON ``type`` (a name or a list of names) and one of its ``enum``?

    Booleans are not numbers; an integer is a number; a float with no fraction counts as an integer.
    Unknown or missing types accept anything.
    """
    if "enum" in schema and isinstance(schema["enum"], list) and not any(_json_equal(value, e) for e in schema["enum"]):
        return False
    want = schema.get("type")
    names = want if isinstance(want, list) else [want] if isinstance(want, str) else []
    if not names or any(n not in _TYPES for n in names):
        return True
    got = _json_type(value)
    return any(got == n or (n == "number" and got == "integer")
               or (n == "integer" and got == "number" and float(value).is_integer()) for n in names)


def _json_equal(a: Any, b: Any) -> bool:
    """Equal as JSON values: 1 == 1.0, but true is not 1 (Python's True == 1), also inside arrays and objects."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_json_equal, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return a == b


def argument_problems(args: dict, schema: dict) -> list[str]:
    """What is wrong with ``args`` for a ``parameters`` schema: unknown names (when the schema lists
    ``properties`` and does not allow others with ``additionalProperties``), missing ``required`` ones,
    values of the wrong type. Empty when they fit."""
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else None
    out = []
    extra = schema.get("additionalProperties")  # true or a schema: names beyond `properties` are allowed
    if props is not None and not (extra is True or isinstance(extra, dict)):
        unknown = [k for k in args if k not in props]
        if unknown:
            out.append(f"unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                       f"(the schema has: {', '.join(props) or 'none'})")
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    missing = [k for k in required if k not in args]
    if missing:
        out.append(f"missing required argument{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    for k, v in args.items():
        spec = (props or {}).get(k)
        if isinstance(spec, dict) and not type_ok(v, spec):
            want = spec.get("type") if "enum" not in spec else f"one of {spec['enum']}"
            out.append(f"argument {k!r} is {json.dumps(v)[:40]} but the schema wants {want}")
    return out


# --- per-conversation checks --------------------------------------------------------------------------

def tool_checks(conv: Conversation, findings: list[Finding]) -> None:
    """The tool-call checks on one conversation (see the module docstring); one finding per problem kind."""
    if conv.is_text:
        return
    schemas = function_schemas(conv.tools)
    seen: set[str] = set()

    def once(check: str, msg: str, fix: str | None = None) -> None:
        if check not in seen:
            seen.add(check)
            _add(findings, check, conv, msg, fix)

    open_calls: list[tuple[int, str | None, str | None]] = []  # (message number, id, name) not yet answered
    for i, m in enumerate(conv.messages, start=1):
        if m.role == "assistant":
            _unanswered(open_calls, i, m.role, once)
            open_calls = []
            for call in m.tool_calls or ():
                name, raw = call_parts(call)
                open_calls.append((i, call.get("id") if isinstance(call, dict) else None, name))
                _check_call(i, name, raw, conv.tools, schemas, once)
        elif m.role == "tool":
            match = answered_call(open_calls, m)  # prepare's rule (validate_roles), so both judge alike
            if match is None:
                once("tool_orphan_result", f"message {i} (tool): a tool result, but {orphan_reason(open_calls, m)}")
            else:
                # results are rendered in the order given, mostly without ids: of one function, only order tells them apart
                same = [c for c in open_calls[:open_calls.index(match)] if c[2] == match[2]]
                if same:
                    once("tool_result_order", f"message {i} (tool): answers call {_call_name(match)} of message {match[0]} "
                         f"before call {_call_name(same[0])}; a template that does not render tool_call_id "
                         "(chatml-tools, most) shows the results in this order, pairing them with the wrong calls")
                open_calls.remove(match)
        elif m.role == "user":
            _unanswered(open_calls, i, m.role, once)
            open_calls = []


def _call_name(call: tuple[int, str | None, str | None]) -> str:
    return f"{call[1]!r} ({call[2]})" if call[1] else repr(call[2])


def _check_call(i: int, name: str | None, raw: Any, tools: list[dict] | None, schemas: dict, once) -> None:
    label = f"message {i} (assistant): call {name!r}" if name else f"message {i} (assistant): a tool call"
    if name is None:
        once("tool_arguments", f"{label} has no function name", "give each call a \"function\": {\"name\", \"arguments\"}")
        return
    args, why = parse_arguments(raw)
    if why:
        once("tool_arguments", f"{label}: {why}")
    if tools is None:
        once("tool_unknown_function", f"{label}, but the record offers no tools",
             "list the function schemas in the record's \"tools\" field")
        return
    if name not in schemas:
        once("tool_unknown_function", f"{label}: not one of the record's tools ({', '.join(schemas) or 'none'})")
        return
    problems = argument_problems(args, schemas[name]) if args is not None else []
    if problems:
        once("tool_schema", f"{label}: {'; '.join(problems)}")


def _unanswered(open_calls: list, i: int, role: str, once) -> None:
    if open_calls:
        j, _, name = open_calls[0]
        more = f" (and {len(open_calls) - 1} more)" if len(open_calls) > 1 else ""
        once("tool_unanswered", f"message {j} (assistant): call {name!r}{more} gets no tool result before "
             f"the {role} turn at message {i}")


def reasoning_checks(conv: Conversation, findings: list[Finding]) -> tuple[int, int]:
    """Unclosed ``<think>`` and reasoning outside assistant turns; returns (assistant turns, with reasoning)."""
    if conv.is_text:
        return 0, 0
    n_assistant = n_reasoning = 0
    for i, m in enumerate(conv.messages, start=1):
        tags = THINK_TAG.findall(m.content)
        if m.role == "assistant":
            n_assistant += 1
            n_reasoning += bool(m.reasoning and m.reasoning.strip()) or THINK_OPEN in tags
            bad = think_tag_problem(m.content)  # prepare's rule (reasoning.split_reasoning): read data never has one
            if bad:
                _add(findings, "reasoning_unclosed", conv, f"message {i} (assistant): {bad}")
                break
            if m.reasoning_unopened:  # prepare read it so (reasoning.split_reasoning): said, not refused
                _add(findings, "reasoning_unopened", conv, f"message {i} (assistant): the text before its </think> is "
                     "read as reasoning; no <think> opens it (a DeepSeek-R1 reply, whose prompt opens the block?)")
        elif tags and m.role in ("user", "system"):
            _add(findings, "reasoning_in_user", conv, f"message {i} ({m.role}): holds {'/'.join(sorted(set(tags)))} tags")
            break
    return n_assistant, n_reasoning


# --- the template -------------------------------------------------------------------------------------

def template_tool_check(convs: list[Conversation], tpl, findings: list[Finding]) -> None:
    """One finding when the template renders the first tool-offering / tool-calling conversation
    without its function names or call arguments (it ignores ``tools`` / ``tool_calls``)."""
    if tpl is None:
        return
    # a conversation the template refuses is a "template" finding already (the token checks): the first one it renders
    with_tools = calling = text = None
    for c in (c for c in convs if c.tools and function_schemas(c.tools)):
        msgs = [m for m in c.messages if m.role in ("system", "user")][:2] or [Message("user", "hi")]
        try:
            bare, full = tpl.render(msgs, add_generation_prompt=True), tpl.render(msgs, add_generation_prompt=True, tools=c.tools)
        except SftlabError:
            continue
        with_tools = c
        break
    if with_tools is not None:
        names = list(function_schemas(with_tools.tools))
        if full == bare or not all(n in full for n in names):
            _add(findings, "template_tools", with_tools, f"template '{tpl.name}' ignores the record's tools: "
                 f"rendered with and without them, the text {'is the same' if full == bare else 'lacks ' + names[0]}",
                 TOOL_TEMPLATE_FIX)
    for c in (c for c in convs if any(m.tool_calls for m in c.messages)):
        k = next(i for i, m in enumerate(c.messages) if m.tool_calls)
        try:
            text = tpl.render(c.messages[:k + 1], tools=c.tools)
        except SftlabError:
            continue
        calling = c
        break
    if calling is not None:
        missing = []
        for call in calling.messages[k].tool_calls:
            name, raw = call_parts(call)
            args, _ = parse_arguments(raw)
            missing += [s for s in [name, *[_leaf(v) for v in (args or {}).values()]] if s and s not in text]
        if missing:
            _add(findings, "template_tools", calling, f"template '{tpl.name}' ignores tool_calls: message {k + 1}'s "
                 f"call renders without {missing[0]!r}, so its call would be trained as an empty reply",
                 TOOL_TEMPLATE_FIX)


def _leaf(v: Any) -> str | None:
    """A string a rendered call must contain for an argument value (None for nested values)."""
    if isinstance(v, str):
        return v if v.isprintable() and '"' not in v and "\\" not in v else None
    if isinstance(v, bool) or v is None or isinstance(v, (dict, list)):
        return None
    return str(v)
