"""Tool-calling test material shared by the doctor, eval, chat and export tests: a Hermes-shaped
chat template (ChatML turns, ``<tools>`` in the system turn, ``<tool_call>`` blocks, tool results
as ``<tool_response>`` user turns), two function schemas, and conversation builders."""

from __future__ import annotations

from sftlab.data.types import Conversation, Message

_NL = "{{ '\\n' }}"
HERMES = (
    "{% if tools %}<|im_start|>system" + _NL
    + "{% if messages[0].role == 'system' %}{{ messages[0].content }}" + _NL + _NL + "{% endif %}"
    "You may call these functions:" + _NL + "<tools>" + _NL
    + "{% for t in tools %}{{ t | tojson }}" + _NL + "{% endfor %}</tools><|im_end|>" + _NL
    + "{% elif messages[0].role == 'system' %}<|im_start|>system" + _NL + "{{ messages[0].content }}<|im_end|>" + _NL
    + "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>user" + _NL + "<tool_response>" + _NL + "{{ m.content }}" + _NL
    + "</tool_response><|im_end|>" + _NL
    + "{% elif m.role == 'assistant' %}<|im_start|>assistant" + _NL + "{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>" + _NL
    + "{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}" + _NL
    + "</tool_call>{% endfor %}<|im_end|>" + _NL
    + "{% elif m.role != 'system' %}<|im_start|>{{ m.role }}" + _NL + "{{ m.content }}<|im_end|>" + _NL
    + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant" + _NL + "{% endif %}"
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIMER = {"type": "function", "function": {
    "name": "set_timer", "description": "Start a timer",
    "parameters": {"type": "object", "properties": {"minutes": {"type": "integer"}, "label": {"type": "string"}},
                   "required": ["minutes"]}}}
TOOLS = [WEATHER, TIMER]


def call(name: str, arguments, id: str | None = "call_1") -> dict:
    c = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {**c, "id": id} if id else c


def tool_conv(*messages: Message, tools=TOOLS, line: int = 1) -> Conversation:
    return Conversation(list(messages), tools=tools, source="data.jsonl", line=line)


def weather_conv(arguments=None, *, answered: bool = True, line: int = 1, city: str = "Paris") -> Conversation:
    """user asks -> assistant calls get_weather -> tool result -> assistant answers (when ``answered``)."""
    args = {"city": city, "unit": "celsius"} if arguments is None else arguments
    msgs = [Message("user", f"Weather in {city}?"), Message("assistant", "", tool_calls=(call("get_weather", args),))]
    if answered:
        msgs += [Message("tool", '{"temp": 21}', tool_call_id="call_1", name="get_weather"),
                 Message("assistant", f"It is 21 degrees in {city}.")]
    return tool_conv(*msgs, line=line)
