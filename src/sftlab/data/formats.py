"""Every input format -> one Conversation type.

Each converter is a small pure function ``dict -> Conversation`` that raises :class:`FormatError`
(with the name of the failed check) on a record it cannot convert. :func:`resolve_format` picks the
format from the fields of the records (the most common); ``--format`` overrides it.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Callable

from sftlab.core.errors import SftlabError
from sftlab.data.load import SURROGATE_FIX, Record, read_records, unpaired_surrogate
from sftlab.data.reasoning import assistant_message
from sftlab.data.roles import FormatError, validate_roles
from sftlab.data.types import Conversation, Message

_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
    "observation": "tool", "tool": "tool", "function_call": "assistant",
}
_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                 "tool": "tool", "function": "tool", "ipython": "tool"}
_TEXT_PARTS = ("text", "input_text", "output_text")  # content part types holding text (chat and responses APIs)


def _text(value, what: str) -> str:
    """Message content as a string; OpenAI-style content parts are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        other = next((p.get("type") for p in value if p.get("type", "text") not in _TEXT_PARTS), None)
        if other is not None:  # dropping it would leave the text around it to be trained on, e.g. an empty prompt
            raise FormatError(f"{what} has a part of type {str(other)!r}; sftlab trains text models only", "non_text",
                              "drop this example, or use text-only data: describe the image or audio in words")
        parts = [p.get("text") for p in value]
        if all(isinstance(t, str) for t in parts):
            return "".join(parts)
    if value is None:
        raise FormatError(f"{what} is missing", "fields")
    raise FormatError(f"{what} must be a string, got {type(value).__name__}", "fields")


def _weight(row: dict) -> float:
    w = row.get("weight", 1.0)
    if w is None or isinstance(w, str) and not w.strip():  # an empty CSV cell: no weight given
        return 1.0
    try:
        if isinstance(w, bool):  # float(True) is 1.0: `weight: true` would pass as a weight of 1
            raise TypeError
        w = float(w)
    except (TypeError, ValueError):
        raise FormatError(f"'weight' must be a number, got {w!r}", "fields")
    if not (w >= 0.0) or w == float("inf"):
        raise FormatError(f"'weight' must be a finite number >= 0, got {w!r}", "fields")
    return w


def _parse_json(text: str, what: str, check: str, fix: str):
    """``text`` parsed as JSON; a FormatError naming ``what`` and the fix when it is not JSON."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{what} is not valid JSON ({exc.msg} at column {exc.colno})", check, fix)
    except RecursionError:
        raise FormatError(f"{what} is nested too deeply to read", check, fix)
    problem = unpaired_surrogate(value, text)
    if problem:  # e.g. a CSV 'tools' cell or a JSON-string 'arguments' with a cut emoji
        raise FormatError(f"{what}: {problem}", "encoding", SURROGATE_FIX)
    return value


_ARGS_FIX = "write the arguments as a JSON object, e.g. {\"city\": \"Paris\"}"


def _arguments(value, where: str) -> dict:
    """A tool call's arguments as a dict: an object, a JSON-object string, or nothing (no arguments)."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return value
    got = type(value).__name__
    if isinstance(value, str):
        text, value = value, _parse_json(value, f"{where} 'arguments'", "tool_arguments", _ARGS_FIX)
        if isinstance(value, dict):
            return value
        kind = {type(None): "null", list: "array", str: "string", bool: "boolean"}.get(type(value), "number")
        got = f"the string {json.dumps(text[:40], ensure_ascii=False)} (a JSON {kind})"  # not "NoneType" for "null"
    raise FormatError(f"{where} 'arguments' must be an object or a JSON-object string, got {got}",
                      "tool_arguments", _ARGS_FIX)


def _tool_call(call, where: str) -> dict:
    """One call in OpenAI shape ``{"id"?, "type": "function", "function": {"name", "arguments": dict}}``;
    also accepts the flat ``{"name", "arguments"}`` shape (sharegpt function_call, many datasets)."""
    if not isinstance(call, dict):
        raise FormatError(f"{where} must be an object, got {type(call).__name__}", "tool_calls",
                          'write each call as {"type": "function", "function": {"name": ..., "arguments": {...}}}')
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise FormatError(f"{where} has no function name", "tool_arguments",
                          'give each call {"function": {"name": "...", "arguments": {...}}}')
    args = fn.get("arguments", fn.get("parameters"))
    out = {"type": "function", "function": {"name": fn["name"], "arguments": _arguments(args, where)}}
    if call.get("id") is not None:
        out["id"] = str(call["id"])
    return out


def _tool_calls(value, where: str) -> tuple[dict, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise FormatError(f"{where} 'tool_calls' must be a list of calls, got {type(value).__name__}", "tool_calls",
                          "wrap the call in a list: \"tool_calls\": [{...}]")
    return tuple(_tool_call(c, f"{where} tool call {k}") for k, c in enumerate(value, start=1)) or None


def _tools(row: dict) -> list[dict] | None:
    """The record's tool schemas (a list, or a JSON string of one), each as {"type": "function", "function": {...}};
    OpenAI's legacy ``functions`` list (beside legacy ``function_call``) is read as the tools offered."""
    tools = row.get("tools")
    if tools is None or tools == "" or tools == []:
        tools = row.get("functions")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        tools = _parse_json(tools, "'tools' (a string)", "tools",
                            "give 'tools' as a list of function schemas (or a JSON string of one)")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise FormatError("'tools' must be a list of function schemas", "tools",
                          'give \'tools\' as [{"type": "function", "function": {"name": ..., "parameters": {...}}}]')
    out = []
    for k, t in enumerate(tools, start=1):
        fn = t.get("function", t)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise FormatError(f"tool {k} in 'tools' has no function name", "tools",
                              'give each tool {"type": "function", "function": {"name": ..., "parameters": {...}}}')
        out.append(t if "function" in t else {"type": "function", "function": t})
    return out


def _message(m: dict, i: int, noun: str, role: str, text_key: str) -> Message:
    where = f"{noun} {i}"
    if role == "assistant":
        calls = _tool_calls(m.get("tool_calls"), where)
        if calls is None and isinstance(m.get("function_call"), dict):  # OpenAI's legacy single call
            calls = (_tool_call(m["function_call"], f"{where} function_call"),)
        raw = m.get(text_key)
        content = "" if raw is None and calls else _text(raw, f"{where} {text_key}")
        return assistant_message(content, where, m, calls)
    if "tool_calls" in m and m["tool_calls"]:
        raise FormatError(f"{where} is a {role} message with 'tool_calls'; only assistant messages make calls",
                          "tool_calls", "move the calls to the assistant message")
    content = m.get(text_key)
    if role == "tool":
        if isinstance(content, (dict, list)):  # a structured result: the template sees its JSON
            content = json.dumps(content, ensure_ascii=False)
        return Message("tool", _text(content, f"{where} {text_key}"), tool_call_id=_opt_str(m.get("tool_call_id")),
                       name=_opt_str(m.get("name")))
    return Message(role, _text(content, f"{where} {text_key}"))


def _opt_str(v) -> str | None:
    return None if v is None else str(v)


def _json_list(value, key: str):
    """A list given as JSON text (a CSV cell, as 'tools' may be) parsed; anything else as it is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        return _parse_json(value, f"'{key}' (a string)", "fields", f"give '{key}' as a JSON list of messages")
    return value


def _open_end(msgs: list[Message], open_end: bool) -> list[Message]:
    """Of a prompt read for generation (``open_end``), an empty last assistant message is the reply to
    generate (a placeholder): left out."""
    last = msgs[-1] if msgs else None
    if open_end and last and last.role == "assistant" and not last.content.strip() and not last.tool_calls \
            and not last.reasoning:
        return msgs[:-1]
    return msgs


def from_messages(row: dict, open_end: bool = False) -> Conversation:
    msgs = _json_list(row.get("messages"), "messages")
    if not isinstance(msgs, list):
        raise FormatError("'messages' must be a list of {role, content} objects")
    out = _turns(msgs, "message", "role", "content", _OPENAI_ROLES, "system, user, assistant or tool")
    out = _open_end(_with_system_field(row, out), open_end)
    validate_roles(out, open_end)
    return Conversation(out, weight=_weight(row), tools=_tools(row))


def _with_system_field(row: dict, msgs: list[Message]) -> list[Message]:
    """A record's top-level 'system' string (as sharegpt and alpaca rows carry it) as its first message."""
    system = row.get("system")
    if not isinstance(system, str) or not system.strip():
        return msgs
    if msgs and msgs[0].role == "system":
        if msgs[0].content != system:
            raise FormatError("the record has a 'system' field and a different system message",
                              fix="keep one of them")
        return msgs
    return [Message("system", system)] + msgs


def _turns(items: list, noun: str, role_key: str, text_key: str, roles: dict, allowed: str) -> list[Message]:
    """One Message per {role_key, text_key} object, roles mapped through ``roles``; clear errors by position."""
    out = []
    for i, m in enumerate(items, start=1):
        if not isinstance(m, dict) or role_key not in m:
            raise FormatError(f"{noun} {i} must be an object with '{role_key}' and '{text_key}'")
        role = roles.get(str(m[role_key]).lower())
        if role is None:
            what = "role" if role_key == "role" else "speaker"
            raise FormatError(f"{noun} {i} has unknown {what} '{m[role_key]}' (use {allowed})", "role_order")
        if role_key == "from" and str(m[role_key]).lower() == "function_call":
            out.append(_function_call_turn(m.get(text_key), i))
        else:
            out.append(_message(m, i, noun, role, text_key))
    return out


def _function_call_turn(value, i: int) -> Message:
    """sharegpt's ``function_call`` turn: its value is a JSON call ``{"name", "arguments"}`` or a list of them."""
    where = f"turn {i}"
    if isinstance(value, str):
        value = _parse_json(value, f"{where} (function_call)", "tool_calls",
                            'write the value as {"name": "...", "arguments": {...}}')
    calls = value if isinstance(value, list) else [value]
    return Message("assistant", "", tool_calls=tuple(_tool_call(c, f"{where} (function_call)") for c in calls))


def from_sharegpt(row: dict, open_end: bool = False) -> Conversation:
    turns = _json_list(row.get("conversations", row.get("conversation")), "conversations")
    if not isinstance(turns, list):
        raise FormatError("'conversations' must be a list of {from, value} objects")
    if turns and all(isinstance(t, dict) and "role" in t and "from" not in t for t in turns):
        return from_messages({**row, "messages": turns}, open_end)  # openai turns under sharegpt's key (many hub datasets)
    out = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        out.append(Message("system", row["system"]))
    out += _turns(turns, "turn", "from", "value", _SHAREGPT_ROLES, "human, gpt, system, function_call or observation")
    out = _open_end(out, open_end)
    validate_roles(out, open_end)
    return Conversation(out, weight=_weight(row), tools=_tools(row))


def from_alpaca(row: dict, open_end: bool = False) -> Conversation:
    instruction = _text(row.get("instruction"), "'instruction'")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise FormatError("'input' must be a string")
    output = "" if open_end and row.get("output") is None else _text(row.get("output"), "'output'")
    user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
    msgs = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        msgs.append(Message("system", row["system"]))
    msgs += _alpaca_history(row.get("history")) + [Message("user", user), assistant_message(output, "'output'", row)]  # a record-level reasoning field is the reply's
    msgs = _open_end(msgs, open_end)
    validate_roles(msgs, open_end)
    return Conversation(msgs, weight=_weight(row))


def _alpaca_history(history) -> list[Message]:
    """LLaMA-Factory's alpaca ``history``: the earlier turns, ``[[instruction, response], ...]``."""
    history = _json_list(history, "history")
    if history is None or history == []:
        return []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise FormatError("'history' must be a list of [instruction, response] pairs",
                          fix='write it as [["first question", "first answer"], ...], or leave it out')
    return [m for i, (ask, reply) in enumerate(history)
            for m in (Message("user", _text(ask, f"'history[{i}][0]'")),
                      assistant_message(_text(reply, f"'history[{i}][1]'"), f"'history[{i}][1]'"))]


def from_prompt_completion(row: dict, open_end: bool = False) -> Conversation:
    prompt, completion = row.get("prompt"), row.get("completion")
    if open_end and completion is None:  # a prompt to generate the completion of
        completion = [] if isinstance(prompt, list) else ""
    if isinstance(prompt, list) or isinstance(completion, list):
        # TRL's conversational prompt/completion: both are message lists.
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise FormatError("'prompt' and 'completion' must both be strings or both message lists")
        return from_messages({"messages": prompt + completion, "weight": row.get("weight"), "tools": row.get("tools"),
                              "system": row.get("system")}, open_end)
    msgs = [Message("user", _text(prompt, "'prompt'")), assistant_message(_text(completion, "'completion'"), "'completion'", row)]
    msgs = _open_end(_with_system_field(row, msgs), open_end)
    validate_roles(msgs, open_end)
    return Conversation(msgs, weight=_weight(row))


def from_text(row: dict, open_end: bool = False) -> Conversation:
    text = _text(row.get("text"), "'text'")
    if not text.strip():
        raise FormatError("'text' is empty", "empty_reply")
    return Conversation(text=text, weight=_weight(row))

CONVERTERS: dict[str, Callable[..., Conversation]] = {  # (row, open_end=False) -> Conversation
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "prompt_completion": from_prompt_completion,
    "text": from_text,
}
FORMAT_ALIASES = {"openai": "messages", "chatml": "messages", "prompt-completion": "prompt_completion",
                  "completion": "prompt_completion", "plain": "text", "vicuna": "sharegpt"}


def format_of_row(row: dict, open_end: bool = False) -> str | None:
    """The format a record's fields name; ``open_end`` (prompts for generation): also an instruction
    without output (alpaca) or a prompt without completion."""
    if "messages" in row:
        return "messages"
    if "conversations" in row or "conversation" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if open_end and ("instruction" in row or "prompt" in row):
        return "alpaca" if "instruction" in row else "prompt_completion"
    if "text" in row:
        return "text"
    return None


def resolve_format(name: str | None, records: list[Record], open_end: bool = False) -> str:
    """The format to use: ``name`` if given (validated), else the most common among the readable records
    (ties: the earlier), so one odd line does not make every other line "wrong". Prepare, mixtures and
    the doctor all read a file by this one rule."""
    if name and name != "auto":
        key = FORMAT_ALIASES.get(name, name).replace("-", "_")
        if key not in CONVERTERS:
            names = f"{', '.join(CONVERTERS)}, or auto"
            file_type = key.lstrip(".").lower() in ("jsonl", "json", "csv", "parquet")  # not a record format
            raise SftlabError(f"unknown format '{name}'", hint=f"'{name}' is a file type, read from the file name; the "
                              f"format is the records' fields: {names}" if file_type else f"use one of: {names}")
        return key
    readable = [r for r in records if r.data is not None]
    counts = Counter(f for r in readable if (f := format_of_row(r.data, open_end)))
    if counts:
        return counts.most_common(1)[0][0]
    if readable:
        r = readable[0]
        if format_of_row(r.data, open_end=True):  # a prompt or instruction alone: nothing to train on
            reply = "completion" if "prompt" in r.data else "output"
            raise SftlabError(f"{r.where()}: the records hold prompts without replies (no '{reply}' field)",
                              hint=f"training needs each reply: add '{reply}'; to have a model write them, "
                                   "use `sftlab generate MODEL --data FILE`")
        if r.header is not None:  # a CSV or Parquet file: its column names are what the user wrote and can change
            what = "CSV header" if r.source.lower().endswith(".csv") else "columns"
            raise SftlabError(
                f"{r.source}: cannot tell the data format from the {what} {','.join(r.header)!r}",
                hint="expected the columns messages, conversations, instruction+output (input optional), "
                     "prompt+completion or text (any case, spaces around ignored); rename them, or pass --format")
        raise SftlabError(
            f"{r.where()}: cannot tell the data format from fields {sorted(r.data)}",
            hint="expected messages, conversations, instruction/output, prompt/completion or text; or pass --format",
        )
    raise SftlabError(f"{records[0].source if records else 'data'}: no readable records to detect the format from")


def add_system_prompt(convs: list[Conversation], system_prompt: str | None) -> list[Conversation]:
    """The ``system_prompt`` rule of training, in place: a chat conversation that does not start with a
    system message gets ``system_prompt`` as its first message. Returns ``convs``."""
    if system_prompt:
        for c in convs:
            if not c.is_text and c.messages and c.messages[0].role != "system":
                c.messages.insert(0, Message("system", system_prompt))
    return convs


def mixed_formats(records: list[Record], key: str, open_end: bool = False) -> str | None:
    """"the file mixes formats: 1 record looks like alpaca, 3 like messages; first other at line 1" when
    some readable records look like another format than ``key``; None when none do."""
    seen = [(r, f) for r in records if r.data is not None and (f := format_of_row(r.data, open_end))]
    counts = Counter(f for _, f in seen)
    if len(counts) < 2:
        return None
    first = next(r for r, f in seen if f != key)
    one_file = len({r.source for r in records}) == 1
    what, at = ("file", f"line {first.line}") if one_file else ("data", first.where())
    parts = [f"{n} {'record looks' if n == 1 else 'records look'} like {f}" if k == 0 else f"{n} like {f}"
             for k, (f, n) in enumerate(counts.most_common())]
    return f"the {what} mixes formats: {', '.join(parts)}; first other at {at}"


def _mixed_error(r: Record, key: str, note: str, open_end: bool = False) -> FormatError:
    other = format_of_row(r.data, open_end)
    return FormatError(f"this record looks like '{other}' format, but the file is read as '{key}', its most common "
                       f"format; {note}", "mixed_formats",
                       f"convert such records to '{key}' format, or split the file by format and list the parts under "
                       "`data:`, each read in its own format")


def to_conversations(records: list[Record], fmt: str | None = None, *, system_prompt: str | None = None,
                     strict: bool = True, format_fix: str = "pass --format", open_end: bool = False,
                     ) -> tuple[list[Conversation], list[tuple[Record, FormatError]]]:
    """Convert records; returns (conversations, failures). With ``strict`` the first failure raises.
    A record of another format than the file's (auto-detected) fails naming the mix. ``format_fix``:
    how the user changes the format the file is read in (for the error's hint). ``open_end``: read
    prompts for generation (see :func:`format_of_row` and :func:`sftlab.data.roles.validate_roles`)."""
    key = resolve_format(fmt, records, open_end)
    note = mixed_formats(records, key, open_end) if not fmt or fmt == "auto" else None
    convert = CONVERTERS[key]
    convs: list[Conversation] = []
    failures: list[tuple[Record, FormatError]] = []
    for r in records:
        if r.data is None:
            failures.append((r, FormatError(r.error or "unreadable", "parse")))
            continue
        try:
            c = convert(r.data, open_end) if open_end else convert(r.data)
        except FormatError as exc:
            other = note and format_of_row(r.data, open_end)
            failures.append((r, _mixed_error(r, key, note, open_end) if other and other != key else exc))
            continue
        c.source, c.line = r.source, r.line
        convs.append(c)
    add_system_prompt(convs, system_prompt)
    if strict and failures:
        r, exc = failures[0]
        more = f" (and {len(failures) - 1} more; run `sftlab doctor` to list them)" if len(failures) > 1 else ""
        raise SftlabError(f"{r.where()}: {exc}{more}",
                          hint=exc.fix or f"this file is read as '{key}' format; fix the line or {format_fix}")
    return convs, failures


def load_conversations(path: str, fmt: str | None = None, *, system_prompt: str | None = None,
                       split: str = "train", open_end: bool = False) -> list[Conversation]:
    """Read a data file (any supported type and format) into conversations; bad lines raise SftlabError.
    ``split``: of a folder, "train" or "eval" (held-out data: its validation, else its test split).
    ``open_end``: prompts for generation may end before the reply (see :func:`to_conversations`)."""

    convs, _ = to_conversations(read_records(path, strict=True, split=split), fmt, system_prompt=system_prompt,
                                strict=True, open_end=open_end)
    return convs
