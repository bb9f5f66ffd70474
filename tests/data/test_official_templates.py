"""The label rule against the official chat templates of the major model families.

Each template below is written out here, compact but faithful to the public one in what decides
labels: the generation prompt, how an assistant turn (its reasoning, tool calls) is rendered, what
ends it, and how history is re-rendered. The rule under test, for every template: each assistant turn
is trained exactly as the model produces it at inference -- the text that follows
render(messages[:i], generation prompt) within render(messages[:i+1]), through its end-of-turn
token(s) -- and a conversation is one example only where history renders unchanged.
"""

import json

import pytest
from transformers import AutoTokenizer

from sftlab.cli import main
from sftlab.core.loss import IGNORE
from sftlab.data.masking import Labeler
from sftlab.data.templates import ChatTemplate
from sftlab.data.turns import (
    NOTE_GEN_PROMPT,
    NOTE_NEXT_ROLE,
    NOTE_OPEN_THINK,
    SPLIT_HISTORY,
)
from sftlab.data.types import Conversation, Message

# Qwen3 (Qwen/Qwen3-8B tokenizer_config.json): reasoning only after the last user query, an empty
# <think> block on the last turn, enable_thinking=False closes the block in the generation prompt.
QWEN3 = r"""{%- if tools %}{{- '<|im_start|>system\n' }}{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
{{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
{%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}{%- endif %}{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}
{%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}
{%- for message in messages %}
{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
{%- elif message.role == "assistant" %}{%- set reasoning_content = '' %}
{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}
{%- else %}{%- if '</think>' in content %}
{%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}{%- endif %}
{%- if loop.index0 > ns.last_query_index %}
{%- if loop.last or (not loop.last and reasoning_content) %}
{{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
{%- else %}{{- '<|im_start|>' + message.role + '\n' + content }}{%- endif %}
{%- else %}{{- '<|im_start|>' + message.role + '\n' + content }}{%- endif %}
{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}
{%- if (loop.first and content) or (not loop.first) %}{{- '\n' }}{%- endif %}
{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\n</tool_call>' }}{%- endfor %}{%- endif %}
{{- '<|im_end|>\n' }}
{%- elif message.role == "tool" %}
{%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' }}{{- content }}{{- '\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}"""

# Qwen3-Thinking-2507: the generation prompt opens <think>; reasoning kept only after the last query.
QWEN3_THINKING_2507 = QWEN3.replace(
    r"""{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}""",
    r"""{{- '<think>\n' }}""")

# Qwen3-Instruct-2507: no thinking; plain ChatML turns.
QWEN3_INSTRUCT_2507 = r"""{%- for message in messages %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""

# GPT-OSS (harmony): the final turn ends <|return|> (and carries its analysis), history turns <|end|>.
GPT_OSS = r"""{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>' }}
{%- for message in messages %}
{%- if message.role == 'system' %}{{- '<|start|>developer<|message|># Instructions\n\n' + message.content + '<|end|>' }}
{%- elif message.role == 'user' %}{{- '<|start|>user<|message|>' + message.content + '<|end|>' }}
{%- elif message.role == 'assistant' %}
{%- if loop.last and not add_generation_prompt %}
{%- if message.thinking %}{{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' }}{%- endif %}
{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|return|>' }}
{%- else %}{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' }}{%- endif %}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"""

# Cohere2 (Command R7B): the model writes <|START_RESPONSE|>...<|END_RESPONSE|><|END_OF_TURN_TOKEN|>.
COHERE2 = r"""{{ bos_token }}{%- for message in messages %}
{%- if message.role == 'system' %}{{- '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + message.content + '<|END_OF_TURN_TOKEN|>' }}
{%- elif message.role == 'user' %}{{- '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + message.content + '<|END_OF_TURN_TOKEN|>' }}
{%- elif message.role == 'assistant' %}{{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>' + message.content + '<|END_RESPONSE|><|END_OF_TURN_TOKEN|>' }}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{%- endif %}"""

# Llama 3.1: trimmed turns, a dated system header, tools in the first user message, one call per turn
# as {"name", "parameters"}, results in the ipython role.
LLAMA31 = r"""{{- bos_token }}{%- if messages[0].role == 'system' %}{%- set system_message = messages[0].content | trim %}{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}{%- if tools is not none %}{{- 'Environment: ipython\n' }}{%- endif %}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n' }}{{- system_message }}{{- '<|eot_id|>' }}
{%- if tools is not none %}{%- set first_user_message = messages[0].content | trim %}{%- set messages = messages[1:] %}
{{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}{{- 'Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n' }}
{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n' }}
{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\n\n' }}{%- endfor %}{{- first_user_message + '<|eot_id|>' }}{%- endif %}
{%- for message in messages %}
{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}
{%- elif 'tool_calls' in message %}{%- if not message.tool_calls|length == 1 %}{{- raise_exception('This model only supports single tool-calls at once!') }}{%- endif %}
{%- set tool_call = message.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{{- '{"name": "' + tool_call.name + '", ' }}{{- '"parameters": ' }}{{- tool_call.arguments | tojson }}{{- '}' }}{{- '<|eot_id|>' }}
{%- elif message.role == 'tool' or message.role == 'ipython' %}{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' }}
{%- if message.content is mapping or message.content is iterable and message.content is not string %}{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}{{- '<|eot_id|>' }}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"""

# Mistral v3 (tool calling): [AVAILABLE_TOOLS] before the last user message, [TOOL_CALLS] with 9-char
# ids, [TOOL_RESULTS]; no generation prompt, each reply ends with </s>.
MISTRAL_TOOLS = r"""{%- if messages[0].role == 'system' %}{%- set system_message = messages[0].content %}{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}
{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}
{{- bos_token }}{%- for message in loop_messages %}
{%- if message.role == 'user' %}
{%- if tools is not none and (message == user_messages[-1]) %}{{- '[AVAILABLE_TOOLS] [' }}
{%- for tool in tools %}{{- tool | tojson }}{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}{{- '][/AVAILABLE_TOOLS]' }}{%- endif %}
{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\n\n' + message.content + '[/INST]' }}
{%- else %}{{- '[INST] ' + message.content + '[/INST]' }}{%- endif %}
{%- elif message.tool_calls is defined and message.tool_calls is not none %}{{- '[TOOL_CALLS] [' }}
{%- for tool_call in message.tool_calls %}{%- set out = tool_call.function | tojson %}{{- out[:-1] }}
{%- if not tool_call.id is defined or tool_call.id | length != 9 %}{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}
{{- ', "id": "' + tool_call.id + '"}' }}{%- if not loop.last %}{{- ', ' }}{%- else %}{{- ']' + eos_token }}{%- endif %}{%- endfor %}
{%- elif message.role == 'assistant' %}{{- ' ' + message.content | trim + eos_token }}
{%- elif message.role == 'tool' %}{%- set content = message.content %}
{{- '[TOOL_RESULTS] {"content": ' + content | tojson + ', "call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
{%- endif %}{%- endfor %}"""

# Hermes 2 Pro (tool_use): tools in the system turn, <tool_call> blocks, results in a `tool` turn.
HERMES = r"""{%- if tools %}{{- '<|im_start|>system\nYou are a function calling AI model. You are provided with function signatures within <tools></tools> XML tags. Here are the available tools: <tools> ' }}
{%- for tool in tools %}{{- tool | tojson }}{%- if not loop.last %}{{- ' ' }}{%- endif %}{%- endfor %}
{{- ' </tools>' }}{%- if messages[0].role == 'system' %}{{- '\n' + messages[0].content }}{%- endif %}{{- '<|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and message.tool_calls is not defined) %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}
{%- for tool_call in message.tool_calls %}{{- '\n<tool_call>\n' }}{%- set tool_call = tool_call.function %}
{{- '{"name": "' + tool_call.name + '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.previtem and loop.previtem.role != 'tool' %}{{- '<|im_start|>tool\n' }}{%- endif %}
{{- '<tool_response>\n' + message.content + '\n</tool_response>\n' }}
{%- if not loop.last and loop.nextitem.role != 'tool' %}{{- '<|im_end|>\n' }}{%- elif loop.last %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""

# Gemma (1/2/3): no system role (merged into the first user turn), `model` role, trimmed content.
GEMMA = r"""{{ bos_token }}{%- if messages[0].role == 'system' %}{%- set first_user_prefix = messages[0].content + '\n\n' %}{%- set loop_messages = messages[1:] %}{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}
{%- for message in loop_messages %}{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}
{%- if message.role == 'assistant' %}{%- set role = 'model' %}{%- else %}{%- set role = message.role %}{%- endif %}
{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}{{ message.content | trim }}{{ '<end_of_turn>\n' }}{%- endfor %}
{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{%- endif %}"""

# Phi-3: <|end|> ends each turn; a conversation rendered without the generation prompt ends with EOS.
PHI3 = r"""{{ bos_token }}{%- for message in messages %}{{ '<|' + message.role + '|>\n' + message.content + '<|end|>\n' }}{%- endfor %}
{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{%- else %}{{ eos_token }}{%- endif %}"""

# DeepSeek-V3 / R1: the reply follows <｜Assistant｜>; R1's generation prompt opens <think>, and every
# assistant turn is rendered without its reasoning.
DEEPSEEK_R1 = r"""{{ bos_token }}{%- set ns = namespace(system_prompt='') %}{%- for message in messages %}{%- if message.role == 'system' %}{%- set ns.system_prompt = message.content %}{%- endif %}{%- endfor %}{{ ns.system_prompt }}
{%- for message in messages %}{%- if message.role == 'user' %}{{ '<｜User｜>' + message.content }}
{%- elif message.role == 'assistant' %}{%- set content = message.content %}{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}
{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{%- endif %}"""
DEEPSEEK_V3 = DEEPSEEK_R1.replace(r"{{ '<｜Assistant｜><think>\n' }}", r"{{ '<｜Assistant｜>' }}")

# GLM-4: no end-of-turn token; a turn ends where the next role's token begins.
GLM4 = r"""[gMASK]<sop>{%- for message in messages %}{%- if message.role == 'system' %}<|system|>
{{ message.content }}{%- elif message.role == 'user' %}<|user|>
{{ message.content }}{%- elif message.role == 'assistant' %}<|assistant|>
{{ message.content }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"""

# NVIDIA Nemotron Nano 2 shape: <SPECIAL_1x> role markers, <SPECIAL_12> ends a turn, and history turns
# lose their thinking (only the last assistant turn keeps its <think>...</think>).
NEMOTRON = r"""{%- for message in messages -%}{%- if message.role == 'system' -%}<SPECIAL_10>System
{{ message.content }}
{% elif message.role == 'user' -%}<SPECIAL_11>User
{{ message.content }}
{% elif message.role == 'assistant' -%}{%- set content = message.content -%}
{%- if '</think>' in content and not loop.last -%}{%- set content = content.split('</think>')[-1].lstrip() -%}{%- endif -%}
<SPECIAL_11>Assistant
{{ content }}<SPECIAL_12>
{% endif -%}{%- endfor -%}{%- if add_generation_prompt -%}<SPECIAL_11>Assistant
{% endif -%}"""

SPECIALS = ["<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>", "<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|START_OF_TURN_TOKEN|>",
            "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|START_RESPONSE|>",
            "<|END_RESPONSE|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]", "<tool_call>", "</tool_call>", "<think>", "</think>", "<start_of_turn>",
            "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>", "<｜User｜>", "<｜Assistant｜>",
            "<｜end▁of▁sentence｜>", "[gMASK]", "<sop>"]

# name -> (source, expected rule for a 2-turn chat: "single" or "split")
TEMPLATES = {
    "qwen3": (QWEN3, "split"), "qwen3-thinking-2507": (QWEN3_THINKING_2507, "split"),
    "qwen3-instruct-2507": (QWEN3_INSTRUCT_2507, "single"), "gpt-oss": (GPT_OSS, "split"),
    "cohere2": (COHERE2, "single"), "llama3.1": (LLAMA31, "single"), "hermes": (HERMES, "single"),
    "gemma": (GEMMA, "single"), "phi3": (PHI3, "single"), "deepseek-v3": (DEEPSEEK_V3, "single"),
    "glm4": (GLM4, "single"), "nemotron": (NEMOTRON, "single"),
}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.add_special_tokens({"additional_special_tokens": SPECIALS}, replace_extra_special_tokens=False)
    return t


def tpl(name: str, tok, **kwargs) -> ChatTemplate:
    return ChatTemplate(name, TEMPLATES[name][0], None, {"bos_token": tok.bos_token, "eos_token": tok.eos_token},
                        kwargs or None)


def runs(tok, ex) -> list[str]:
    """The decoded trained spans of an example, in order."""
    out, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out + ([tok.decode(cur)] if cur else [])


CHAT = Conversation([Message("system", "Be brief."), Message("user", "Hi there"), Message("assistant", "Hello!"),
                     Message("user", "Capital of France?"), Message("assistant", "Paris.")])


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("skeletons", [True, False])
def test_each_turn_is_trained_as_produced_at_inference(tok, name, skeletons):
    """Per template: trained text == the per-turn render difference, through the end-of-turn tokens."""
    t = tpl(name, tok)
    examples, report = Labeler(tok, t, skeletons=skeletons).encode([CHAT])
    msgs = CHAT.messages
    turns = [i for i, m in enumerate(msgs) if m.role == "assistant"]
    expected = []
    for i in turns:
        prompt, upto = t.render(msgs[:i], add_generation_prompt=True), t.render(msgs[:i + 1])
        common = next((k for k, (a, b) in enumerate(zip(prompt, upto)) if a != b), min(len(prompt), len(upto)))
        expected.append(upto[common:])
    got = [r for ex in examples for r in runs(tok, ex)]
    assert len(got) == len(turns)
    for g, e in zip(got, expected):
        assert e.startswith(g) or g == e.rstrip() + tok.eos_token or name == "glm4", (g, e)
        assert e[len(g):].strip() in ("", tok.eos_token) or name == "glm4", (g, e)  # only EOS / white space left out
    rule = TEMPLATES[name][1]
    assert (report.n_split, report.n_single) == ((1, 0) if rule == "split" else (0, 1))
    assert len(examples) == (len(turns) if rule == "split" else 1)
    if rule == "split":
        assert SPLIT_HISTORY in report.rule_notes and "one example per assistant turn" in report.rule()


def test_exact_trained_text_per_family(tok):
    """The strings the model must learn to produce, written out by hand for the four hard families."""
    def trained(name, conv=CHAT, **kw):
        exs, _ = Labeler(tok, tpl(name, tok, **kw)).encode([conv])
        return [r for ex in exs for r in runs(tok, ex)]

    assert trained("qwen3") == ["<think>\n\n</think>\n\nHello!<|im_end|>", "<think>\n\n</think>\n\nParis.<|im_end|>"]
    assert trained("qwen3", enable_thinking=False) == ["Hello!<|im_end|>", "Paris.<|im_end|>"]
    assert trained("gpt-oss") == ["<|channel|>final<|message|>Hello!<|return|>", "<|channel|>final<|message|>Paris.<|return|>"]
    assert trained("cohere2") == ["<|START_RESPONSE|>Hello!<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
                                  "<|START_RESPONSE|>Paris.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"]
    assert trained("phi3") == ["Hello!<|end|>", "Paris.<|end|>"]  # the EOS after the last turn closes the document
    assert trained("gemma") == ["Hello!<end_of_turn>", "Paris.<end_of_turn>"]
    thinking = Conversation([Message("user", "2+2?"), Message("assistant", "4", reasoning="add them")])
    assert trained("gpt-oss", thinking) == ["<|channel|>analysis<|message|>add them<|end|><|start|>assistant"
                                            "<|channel|>final<|message|>4<|return|>"]
    assert trained("qwen3-thinking-2507", thinking) == ["add them\n</think>\n\n4<|im_end|>"]


def test_turn_ending_at_the_next_role_token_and_generation_prompt_rule_are_reported(tok):
    exs, report = Labeler(tok, tpl("glm4", tok)).encode([CHAT])
    assert runs(tok, exs[0]) == ["\nHello!<|user|>", "\nParis." + tok.eos_token]
    assert NOTE_NEXT_ROLE in report.rule_notes and NOTE_NEXT_ROLE in report.rule()
    TEMPLATES["deepseek-r1"] = (DEEPSEEK_R1, "single")
    try:
        exs, report = Labeler(tok, tpl("deepseek-r1", tok)).encode([CHAT])
    finally:
        del TEMPLATES["deepseek-r1"]
    # The prompt opens <think>\n, which the rendered turn does not: the model closes the (empty) block, then
    # replies. Trained from the prompt's end alone, it would learn to answer inside <think> and never close it.
    assert NOTE_GEN_PROMPT in report.rule_notes and NOTE_OPEN_THINK in report.rule_notes and report.n_split == 1
    for ex in exs:  # each turn in its inference context: the prompt that opens <think>
        context = tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE])
        assert context.endswith("<｜Assistant｜><think>\n")
    assert [r for ex in exs for r in runs(tok, ex)] == ["\n</think>\n\nHello!<｜end▁of▁sentence｜>",
                                                         "\n</think>\n\nParis.<｜end▁of▁sentence｜>"]


def test_deepseek_r1_raw_replies_train_under_r1s_own_template(tok, tmp_path):
    """R1's raw reply opens with its reasoning and no <think> (the generation prompt opened it). Read as the
    answer, R1's template (which keeps only what follows </think>) refused it as not rendered verbatim; read
    as reasoning, it trains inside the <think> R1's prompt opens (per_turn), or the answer alone (drop)."""
    (conv,) = _load(tmp_path, {"messages": [{"role": "user", "content": "2+2?"},
                                            {"role": "assistant", "content": "add them\n</think>\n\n4"}]})
    TEMPLATES["deepseek-r1"] = (DEEPSEEK_R1, "single")
    try:
        (dropped,), _ = Labeler(tok, tpl("deepseek-r1", tok), reasoning="drop").encode([conv])
        (kept,), _ = Labeler(tok, tpl("deepseek-r1", tok)).encode([conv])
    finally:
        del TEMPLATES["deepseek-r1"]
    assert runs(tok, dropped) == ["\n</think>\n\n4<｜end▁of▁sentence｜>"]  # the block R1's prompt opens, closed empty
    assert runs(tok, kept) == ["add them\n</think>\n\n4<｜end▁of▁sentence｜>"]


def _model_with_template(tmp_path, tiny_model_dir, source: str):
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.add_special_tokens({"additional_special_tokens": SPECIALS}, replace_extra_special_tokens=False)
    t.chat_template = source
    t.save_pretrained(tmp_path / "model")
    for f in tiny_model_dir.iterdir():
        if not (tmp_path / "model" / f.name).exists():
            (tmp_path / "model" / f.name).write_bytes(f.read_bytes())
    return str(tmp_path / "model")


def test_qwen3_dump_has_one_example_per_turn_with_its_reasoning(tmp_path, tiny_model_dir, capsys):
    """`prepare --dump` on a Qwen3 template that drops earlier reasoning: one example per assistant turn,
    in turn order, each training exactly that turn with its own reasoning in its inference context."""
    model = _model_with_template(tmp_path, tiny_model_dir, QWEN3)
    row = {"messages": [{"role": "user", "content": "What is 2+3?"},
                        {"role": "assistant", "content": "<think>\nTwo plus three.\n</think>\n\n5"},
                        {"role": "user", "content": "And times 4?"},
                        {"role": "assistant", "reasoning_content": "Five times four.", "content": "20"}]}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(row) + "\n" + json.dumps({"messages": row["messages"][:2]}) + "\n")
    assert main(["prepare", "--model", model, "--data", str(data), "--dump", str(tmp_path / "dump.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "2 chats" not in out and "1 chat split into one example per assistant turn" in out and SPLIT_HISTORY in out
    rows = [json.loads(line) for line in (tmp_path / "dump.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 0, 1]
    t = AutoTokenizer.from_pretrained(model)
    texts = [[t.decode([i for i, lab in zip(r["input_ids"], r["labels"]) if lab != IGNORE])] for r in rows]
    assert texts == [["<think>\nTwo plus three.\n</think>\n\n5<|im_end|>"],
                     ["<think>\nFive times four.\n</think>\n\n20<|im_end|>"],
                     ["<think>\nTwo plus three.\n</think>\n\n5<|im_end|>"]]
    # The second example's context is the inference prompt: turn 1 without its reasoning.
    context = t.decode([i for i, lab in zip(rows[1]["input_ids"], rows[1]["labels"]) if lab == IGNORE])
    assert "Two plus three" not in context and context.endswith("And times 4?<|im_end|>\n<|im_start|>assistant\n")


def _long_reasoning_chat(turns: int) -> Conversation:
    msgs = [Message("system", "You are careful. " * 20)]
    for i in range(turns):
        msgs += [Message("user", f"Question {i}: what is {i} + {i}? " * 5),
                 Message("assistant", f"The answer is {2 * i}.", reasoning=f"Adding {i} to itself gives {2 * i}. " * 8)]
    return Conversation(msgs)


def test_per_turn_examples_share_their_tokenized_history(tok, monkeypatch):
    """A chat split into one example per turn repeats its history in every example. The prompts are
    tokenized in chunks cut after special tokens, each distinct chunk once: the same ids as tokenizing
    each prompt whole, for a fraction of the characters."""
    from sftlab.data import masking

    monkeypatch.setattr(masking, "CHUNK_CHECK_FIRST", 1)  # count the chunking, not its sampled checks
    t = tpl("qwen3", tok)
    convs = [_long_reasoning_chat(8), _long_reasoning_chat(5)]
    seen = []
    real = Labeler._encode_plain
    monkeypatch.setattr(Labeler, "_encode_plain", lambda self, texts: seen.append(sum(map(len, texts))) or real(self, texts))
    shared = Labeler(tok, t, skeletons=False)
    got, report = shared.encode(convs)
    chars_shared = sum(seen)
    seen.clear()
    whole = Labeler(tok, t, skeletons=False)
    whole._share_prefix = False
    want, _ = whole.encode(convs)
    chars_whole = sum(seen)
    assert report.n_split == 2 and len(got) == 13
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in want]
    assert shared._share_prefix  # the sampled comparisons with whole prompts agreed
    assert chars_shared < chars_whole / 2  # most of what is left is the replies, each tokenized once anyway


def test_a_tokenizer_that_merges_across_a_special_token_gets_whole_prompts(tiny_model_dir):
    """If a special token eats the white space after it (rstrip), a chunk cut after it tokenizes
    differently from the whole prompt: the sampled comparison sees it and every prompt is tokenized whole."""
    from tokenizers import AddedToken

    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.add_special_tokens({"additional_special_tokens": SPECIALS + [AddedToken("<|im_end|>", rstrip=True, special=True)]},
                         replace_extra_special_tokens=False)
    q = ChatTemplate("qwen3", QWEN3, None, {"bos_token": t.bos_token, "eos_token": t.eos_token})
    lab = Labeler(t, q, skeletons=False)
    got, _ = lab.encode([_long_reasoning_chat(3)])
    assert not lab._share_prefix
    for ex in got:  # each prompt is tokenized as at inference: whole
        n = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)
        assert ex.input_ids[:n] == t(t.decode(ex.input_ids[:n]), add_special_tokens=False)["input_ids"]


# --- tool calling ------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _call(name, args, cid):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


OPENAI_TOOL_ROW = {"tools": [WEATHER, TIME], "messages": [
    {"role": "system", "content": "You help with weather."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", '{"city": "Paris"}', "call00001")]},
    {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
    {"role": "user", "content": "And the time?"},
    {"role": "assistant", "content": "", "tool_calls": [_call("get_time", {}, "call00002")]},
    {"role": "ipython", "tool_call_id": "call00002", "content": "14:05 CET"},
    {"role": "assistant", "content": "It is five past two."}]}
SHAREGPT_TOOL_ROW = {"tools": json.dumps([WEATHER["function"], TIME["function"]]), "conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"from": "observation", "value": '{"temp": 21}'},
    {"from": "gpt", "value": "It is 21 degrees in Paris."}]}
# Mistral needs 9-character call ids, and rendered tool results carry them.
DIALECTS = {"openai-hermes": (OPENAI_TOOL_ROW, HERMES), "sharegpt-hermes": (SHAREGPT_TOOL_ROW, HERMES),
            "openai-llama3.1-ipython": (OPENAI_TOOL_ROW, LLAMA31), "openai-mistral": (OPENAI_TOOL_ROW, MISTRAL_TOOLS),
            "openai-qwen3": (OPENAI_TOOL_ROW, QWEN3)}


def _load(tmp_path, row):
    from sftlab.data.formats import load_conversations

    p = tmp_path / "tools.jsonl"
    p.write_text(json.dumps(row) + "\n")
    return load_conversations(str(p))


def _per_turn_truth(t: ChatTemplate, conv: Conversation, eos: str) -> list[str]:
    """For each assistant message: render(messages[:i+1]) minus render(messages[:i], generation prompt),
    up to its first end-of-turn token (the tokens listed here), or plus EOS where it writes none."""
    msgs, out = conv.messages, []
    for i, m in enumerate(msgs):
        if m.role != "assistant":
            continue
        prompt, upto = t.render(msgs[:i], True, tools=conv.tools), t.render(msgs[:i + 1], tools=conv.tools)
        if not upto.startswith(prompt):  # Mistral: the system prompt sits in the last user message only
            assert prompt.endswith("[/INST]") and prompt.count("[/INST]") == upto[:upto.rfind("[/INST]") + 7].count("[/INST]")
            prompt = upto[:upto.rfind("[/INST]") + 7]
        rest = upto[len(prompt):]
        cut = min((rest.find(e) + len(e) for e in ("<|im_end|>", "<|eot_id|>", eos) if e in rest), default=None)
        out.append(rest[:cut] if cut is not None else rest.rstrip() + eos)
    return out


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
@pytest.mark.parametrize("skeletons", [True, False])
def test_tool_turns_train_exactly_the_per_turn_render_difference(tok, tmp_path, dialect, skeletons):
    row, source = DIALECTS[dialect]
    (conv,) = _load(tmp_path, row)
    t = ChatTemplate(dialect, source, None, {"bos_token": tok.bos_token, "eos_token": tok.eos_token})
    examples, report = Labeler(tok, t, skeletons=skeletons).encode([conv])
    got = [r for ex in examples for r in runs(tok, ex)]
    want = _per_turn_truth(t, conv, tok.eos_token)
    assert got == want
    # every tool call is in a trained span; no tool result, schema, system or user text is
    assert any('"get_weather"' in g for g in got)
    for ex in examples:
        untrained = tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE])
        trained = "".join(runs(tok, ex))
        for m in conv.messages:
            if m.role != "assistant":
                assert m.content not in trained
        assert "temp" not in trained and "Weather in a city" not in trained
        assert "temp" in untrained or "temp" not in tok.decode(ex.input_ids)
    if dialect == "openai-mistral":  # tools and system move to the last user message: one example per turn,
        assert report.n_split == 1 and len(examples) == len(want)  # each in its inference context
        # (the system prompt rides in the last message when that is the user's; missing from a full render)
        assert "You help with weather." in tok.decode(examples[0].input_ids)


def test_template_that_ignores_tool_calls_is_refused(tok, tmp_path):
    (conv,) = _load(tmp_path, OPENAI_TOOL_ROW)
    t = ChatTemplate("t", QWEN3_INSTRUCT_2507, None, {})
    with pytest.raises(Exception, match=r"tools.jsonl:1: the chat template 't' does not render the tool calls .*chatml-tools"):
        Labeler(tok, t).encode([conv])


def _reasoning_and_tool_data(tmp_path):
    rows = [OPENAI_TOOL_ROW,
            {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "<think>add</think>5"},
                          {"role": "user", "content": "times 4?"}, {"role": "assistant", "content": "20",
                                                                     "reasoning_content": "multiply"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    p = tmp_path / "mixed.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from sftlab.data.formats import load_conversations

    return load_conversations(str(p))


@pytest.mark.parametrize("name", ["qwen3", "hermes", "gpt-oss"])
def test_skeleton_packing_and_last_assistant_agree_with_the_exact_method(tok, tmp_path, name):
    from sftlab.data.packing import pack

    convs = _reasoning_and_tool_data(tmp_path)
    if name == "gpt-oss":
        convs = [c for c in convs if not c.tools]
    t = tpl(name, tok)
    for masking in ("all_assistant", "last_assistant"):
        exact, rep_exact = Labeler(tok, t, masking=masking, skeletons=False).encode(convs)
        fast, rep_fast = Labeler(tok, t, masking=masking).encode(convs)
        assert [(e.input_ids, e.labels, e.index) for e in fast] == [(e.input_ids, e.labels, e.index) for e in exact]
        assert (rep_fast.n_split, rep_fast.n_single) == (rep_exact.n_split, rep_exact.n_single)
        # packed rows carry the same labels (first label of each example masked by the packer)
        for row in pack(exact, 4096):
            pos = 0
            for k, n in zip(row.indices, row.seq_lens):
                ex = next(e for e in exact if e.index == k and e.input_ids == row.input_ids[pos:pos + n])
                assert row.labels[pos + 1:pos + n] == ex.labels[1:]
                pos += n
    # last_assistant trains exactly the last turn of what all_assistant trains
    every, _ = Labeler(tok, t).encode(convs)
    last, _ = Labeler(tok, t, masking="last_assistant").encode(convs)
    for k in range(len(convs)):
        assert [runs(tok, e) for e in last if e.index == k][-1][-1] == [r for e in every if e.index == k for r in runs(tok, e)][-1]


@pytest.mark.parametrize("mode", ["per_turn", "keep", "last", "drop"])
def test_reasoning_modes(tok, tmp_path, mode):
    (conv,) = _load(tmp_path, {"messages": [
        {"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "<think>add</think>5"},
        {"role": "user", "content": "times 4?"}, {"role": "assistant", "content": "20", "reasoning_content": "multiply"}]})
    kwargs = {"enable_thinking": False} if mode == "drop" else {}
    exs, report = Labeler(tok, tpl("qwen3", tok, **kwargs), reasoning=mode).encode([conv])
    got = [runs(tok, e) for e in exs]
    if mode == "per_turn":
        assert got == [["<think>\nadd\n</think>\n\n5<|im_end|>"], ["<think>\nmultiply\n</think>\n\n20<|im_end|>"]]
    elif mode in ("keep", "last"):  # one example, as the full render shows the turns (Qwen3 keeps the last's reasoning)
        assert got == [["5<|im_end|>", "<think>\nmultiply\n</think>\n\n20<|im_end|>"]] and report.n_single == 1
    else:
        assert got == [["5<|im_end|>"], ["20<|im_end|>"]]


def test_nemotron_drops_history_thinking_so_each_turn_is_its_own_example(tok):
    """Nemotron Nano 2 keeps <think> only in the last turn: with reasoning, one example per turn, each
    training its own thinking and answer through <SPECIAL_12>, in the context the model sees."""
    chat = Conversation([Message("user", "Hi there"), Message("assistant", "Hello!", reasoning="greet back"),
                         Message("user", "Capital of France?"), Message("assistant", "Paris.", reasoning="easy")])
    examples, report = Labeler(tok, tpl("nemotron", tok)).encode([chat])
    assert (report.n_split, report.n_single, len(examples)) == (1, 0, 2)
    first, second = (runs(tok, ex) for ex in examples)
    assert first == ["<think>\ngreet back\n</think>\n\nHello!<SPECIAL_12>"]
    assert second == ["<think>\neasy\n</think>\n\nParis.<SPECIAL_12>"]
    context = tok.decode([t for t, lab in zip(examples[1].input_ids, examples[1].labels) if lab == IGNORE])
    assert "greet back" not in context and "Hello!" in context  # history as rendered at inference: no thinking
