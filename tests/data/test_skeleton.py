"""One render per role sequence gives exactly the labels of the per-conversation method, or is not used."""

import pytest
from conftest import random_conversations
from transformers import AutoTokenizer

from sftlab.data import skeleton
from sftlab.data.masking import Labeler
from sftlab.data.templates import ChatTemplate, resolve_template, template_names
from sftlab.data.types import Conversation, Message

# Content-inspecting constructs that need the exact method for every conversation.
INSPECTING = {
    "length": "{{ m.content }}{% if m.content | length > 40 %} (long){% endif %}",
    "replace": "{{ m.content | replace('\\n', ' ') }}",
    "split": "{{ m.content.split(' ')[0] }}{{ m.content }}",
    "tojson": "{{ m.content | tojson }}",
}

# Stripping and yes/no questions are allowed: the skeleton serves the contents that answer them as
# the probe did (nothing to strip, no 'URGENT', not equal to 'x', ...), the exact method the others.
QUESTIONS = {
    "trim": "{{ m.content | trim }}",
    "strip-method": "{{ m.content.strip() }}",
    "rstrip-chars": "{% if m.role == 'user' %}{{ m.content.rstrip('e') }}{% else %}{{ m.content }}{% endif %}",
    "in": "{% if 'URGENT' in m.content %}(!) {% endif %}{{ m.content }}",
    "equals": "{% if m.content == 'x' %}[x] {% endif %}{{ m.content }}",
    "truth": "{% if m.content %}{{ m.content }}{% else %}(none){% endif %}",
    "startswith": "{% if m.content.startswith('hello') %}(hi) {% endif %}{{ m.content }}",
    "trim-then-look": "{% if (m.content | trim).endswith('end') %}(end) {% endif %}{{ m.content | trim }}",
    "qwen3-like": "{% if m.role == 'assistant' and '</think>' in m.content %}{{ m.content.split('</think>')[-1] }}"
                  "{% else %}{{ m.content }}{% endif %}",
}

# Constructs that only copy content into the output: the skeleton is used, with the same labels.
OPAQUE = {
    "is-string": "{% if m.content is string %}{{ m.content }}{% endif %}",
    "concat": "{{ '[' + m.content + ']' }}",
    "tilde": "{{ m.content ~ '' }}",
    "string": "{{ m.content | string }}",
    "set": "{% set c = m['content'] %}{{ c }}",
    "format": "{{ '%s' % m.content }}",
}

# Shaped like Llama 3.1's template: the system message trimmed and moved, every turn trimmed.
LLAMA31_LIKE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = \"\" %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Today Date: 26 Jul 2024\\n\\n' }}{{- system_message }}"
    "{{- '<|eot_id|>' }}{%- for message in messages %}{%- if not (message.role == 'tool' or 'tool_calls' in message) %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _tpl(body: str) -> ChatTemplate:
    return ChatTemplate("t", "{% for m in messages %}<|im_start|>{{ m.role }}\n" + body + "<|im_end|>\n{% endfor %}"
                             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "<|im_end|>")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _convs():
    convs = random_conversations(seed=3, n=120)
    # Braces (the skeleton is a format string), whitespace-only edges, the sentinel characters.
    convs.append(Conversation([Message("user", "{0} {} {{x}}"), Message("assistant", " }{ ")]))
    convs.append(Conversation([Message("user", "a\ue000b"), Message("assistant", "c\ue0011\ue001")]))
    return convs


def _exact(tok, tpl, convs, **kw):
    return Labeler(tok, tpl, skeletons=False, **kw).encode(convs)[0]


@pytest.mark.parametrize("masking", ["all_assistant", "last_assistant", "all"])
@pytest.mark.parametrize("template", ["tokenizer"] + template_names())
def test_skeleton_labels_equal_exact_labels(tok, template, masking):
    tpl = resolve_template(template, tok)
    convs = _convs()
    fast = Labeler(tok, tpl, masking=masking)
    got = fast.encode(convs)[0]
    want = _exact(tok, tpl, convs, masking=masking)
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in want]
    # ... and the skeletons were really used: learnt for every role sequence, never rejected.
    assert not fast._skeletons.failed
    assert fast._skeletons.cache and all(v is not None and not v[1] for v in fast._skeletons.cache.values())


def test_renders_once_per_role_sequence_not_per_conversation(tok, monkeypatch):
    tpl = resolve_template("chatml", tok)
    calls = []
    real = ChatTemplate.render
    monkeypatch.setattr(ChatTemplate, "render", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    convs = [Conversation([Message("user", f"question {i}"), Message("assistant", f"answer {i}")]) for i in range(1000)]
    examples, _ = Labeler(tok, tpl).encode(convs)
    assert len(examples) == 1000
    # the labeler's probe of the document's end (2 renders), learning (2 probe + 2 exact renders) + the exact
    # check of the first and of 1 in VERIFY_EVERY
    assert len(calls) <= 2 + 4 + 2 * (1 + 1000 // skeleton.VERIFY_EVERY)
    assert len(calls) < 2000 / 10


@pytest.mark.parametrize("name", sorted(INSPECTING))
def test_template_that_inspects_content_is_labelled_exactly(tok, name):
    tpl = _tpl(INSPECTING[name])
    convs = [Conversation([Message("user", "  q  "), Message("assistant", "x")]),
             Conversation([Message("user", "q"), Message("assistant", "<think>hm</think>answer")]),
             Conversation([Message("user", "q"), Message("assistant", "plain answer")])]
    fast = Labeler(tok, tpl)
    try:
        want = _exact(tok, tpl, convs)
    except Exception as exc:  # some of these do not render replies verbatim: the same error either way
        with pytest.raises(type(exc)):
            fast.encode(convs)
        return
    got = fast.encode(convs)[0]
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in want]
    assert list(fast._skeletons.cache.values()) == [None]  # the probe saw the inspection


@pytest.mark.parametrize("name", sorted(QUESTIONS) + ["llama31-like"])
def test_template_that_asks_about_content_uses_the_skeleton_where_the_answers_match(tok, name):
    tpl = ChatTemplate("l", LLAMA31_LIKE, "<|eot_id|>", {"bos_token": "<|im_start|>"}) if name == "llama31-like" \
        else _tpl(QUESTIONS[name])
    convs = _convs() + [Conversation([Message("user", u), Message("assistant", a)]) for u, a in
                        [("x", "URGENT: hello"), ("hello there", "x"), ("the end", "URGENT the end")]]
    fast = Labeler(tok, tpl)
    got = fast.encode(convs)[0]
    want = _exact(tok, tpl, convs)
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in want]
    learnt = [v for v in fast._skeletons.cache.values()]
    assert learnt and all(v is not None and v[1] for v in learnt) and not fast._skeletons.failed
    served = sum(skeleton._same_answers(fast._skeletons.cache[skeleton.key_of(c)][1],
                                         skeleton._fields(c)) for c in convs)
    # both paths were taken (empty contents are part of the shape: a truth question is always answered)
    assert 0 < served and (served < len(convs) or name in ("qwen3-like", "truth"))


@pytest.mark.parametrize("name", sorted(OPAQUE))
def test_template_that_copies_content_uses_the_skeleton(tok, name):
    tpl = _tpl(OPAQUE[name])
    convs = _convs()
    fast = Labeler(tok, tpl)
    got = fast.encode(convs)[0]
    want = _exact(tok, tpl, convs)
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in want]
    assert all(v is not None and not v[1] for v in fast._skeletons.cache.values()) and not fast._skeletons.failed


def test_a_sampled_difference_relabels_everything_exactly(tok, monkeypatch):
    # Blind the probe to `in`, so a template that marks urgent replies gets a (wrong) skeleton; the
    # exact check of a sampled conversation must catch it and relabel all conversations exactly.
    monkeypatch.setattr(skeleton, "_OPAQUE", skeleton._OPAQUE | {"__contains__"})
    monkeypatch.setattr(skeleton, "VERIFY_EVERY", 5)
    tpl = _tpl("{% if 'URGENT' in m.content %}(!) {% endif %}{{ m.content }}")
    convs = [Conversation([Message("user", f"q{i}"), Message("assistant", f"URGENT a{i}")]) for i in range(12)]
    convs[0] = Conversation([Message("user", "q"), Message("assistant", "calm")])  # the first one passes
    fast = Labeler(tok, tpl)
    got = fast.encode(convs)[0]
    assert fast._skeletons.failed
    want = _exact(tok, tpl, convs)
    assert sum("(!)" in tok.decode(e.input_ids) for e in want) == 11
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in want]


def test_template_errors_still_name_the_conversation(tok):
    tpl = _tpl("{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m.content }}")
    conv = Conversation([Message("system", "s"), Message("user", "q"), Message("assistant", "a")], source="d.jsonl", line=4)
    with pytest.raises(Exception, match="no system role"):
        Labeler(tok, tpl).encode([conv])


def _tool_convs(n: int = 60, seed: int = 5, reply_with_call: str | None = None) -> list[Conversation]:
    """Tool-calling chats of a few shapes, with contents and string arguments that JSON must escape
    (quotes, backslashes, new lines, braces, non-ASCII) and a number argument (part of the shape)."""
    import random

    from tool_data import TOOLS, call

    rng = random.Random(seed)
    words = ['Paris', 'say "hi"', "back\\slash", "two\nlines", "{braces}", "Zürich 東京", "tab\there", "O'Hare"]
    out = []
    for i in range(n):
        city, other = rng.choice(words), rng.choice(words)
        msgs = [Message("user", f"Weather in {city}? ({i})"),
                Message("assistant", rng.choice(["", "Let me check."]) if reply_with_call is None else reply_with_call,
                        tool_calls=(call("get_weather", {"city": city, "unit": "celsius"}, id=f"call{i % 7:05d}"),)),
                Message("tool", f'{{"temp": {i}, "note": "{other}"}}', tool_call_id=f"call{i % 7:05d}", name="get_weather"),
                Message("assistant", f"It is {i} degrees in {city}.")]
        if i % 3 == 0:
            msgs += [Message("user", f"Timer for {other}?"),
                     Message("assistant", "", tool_calls=(call("set_timer", {"minutes": 5, "label": other}, id=None),)),
                     Message("tool", "started"), Message("assistant", f'Timer "{other}" started.')]
        out.append(Conversation(msgs, tools=TOOLS, source="tools.jsonl", line=i + 1))
    return out


def _official(name: str):
    import test_official_templates as off

    return {"qwen3": off.QWEN3, "llama3.1": off.LLAMA31, "mistral": off.MISTRAL_TOOLS}[name], off.SPECIALS


@pytest.mark.parametrize("name", ["hermes-test", "chatml-tools", "qwen3", "llama3.1", "mistral"])
def test_skeleton_serves_tool_conversations_with_the_exact_labels(tok, name):
    """Tool calls, tool results and schemas go through the skeleton too: call ids and string arguments
    are pasted in (JSON-escaped where the template writes them with tojson), other argument values and
    the tools offered are part of the shape. Labels equal the exact method's; where the template
    inspects a field (Mistral checks the call id's length) the exact method labels everything."""
    from tool_data import HERMES

    t = tok
    if name == "hermes-test":
        tpl = ChatTemplate("hermes", HERMES, "<|im_end|>")
    elif name == "chatml-tools":
        tpl = resolve_template("chatml-tools", tok)
    else:
        source, specials = _official(name)
        t = AutoTokenizer.from_pretrained(tok.name_or_path)
        t.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
        tpl = ChatTemplate(name, source, None, {"bos_token": t.bos_token, "eos_token": t.eos_token})
    convs = _tool_convs(reply_with_call="" if name in ("llama3.1", "mistral") else None)
    if name == "mistral":  # its template wants 9-character call ids
        convs = [Conversation([Message(m.role, m.content, tool_calls=tuple({**c, "id": "abcdefghi"} for c in m.tool_calls)
                                       if m.tool_calls else None, tool_call_id="abcdefghi" if m.role == "tool" else None)
                               for m in c.messages], tools=c.tools) for c in convs]
    for masking in ("all_assistant", "last_assistant"):
        fast = Labeler(t, tpl, masking=masking)
        got = fast.encode(convs)[0]
        want = _exact(t, tpl, convs, masking=masking)
        assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in want]
        assert not fast._skeletons.failed
        if name == "mistral":
            assert all(v is None for v in fast._skeletons.cache.values())
        else:
            # a handful of shapes (which call, whether it has an id), each learnt once and then served
            assert 0 < len(fast._skeletons.cache) <= 4 and all(v is not None for v in fast._skeletons.cache.values())
            assert fast._skeletons.n_seen == len(convs)
            if name in ("hermes-test", "chatml-tools", "qwen3"):  # arguments written with tojson: pasted escaped
                assert any(v[2] for v in fast._skeletons.cache.values())


def test_a_template_that_json_encodes_content_is_served_with_the_content_escaped(tok):
    tpl = _tpl("{% if m.role == 'user' %}{{ m.content | tojson }}{% else %}{{ m.content }}{% endif %}")
    convs = [Conversation([Message("user", u), Message("assistant", "ok")])
             for u in ['plain', 'say "hi"', "a\\b", "new\nline", "tab\t", "Zürich {0}"]]
    fast = Labeler(tok, tpl)
    got = fast.encode(convs)[0]
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in _exact(tok, tpl, convs)]
    (learnt,) = fast._skeletons.cache.values()
    assert learnt is not None and learnt[2] and fast._skeletons.n_seen == len(convs) and not fast._skeletons.failed
    assert '"say \\"hi\\""' in tok.decode(got[1].input_ids)


def test_learning_stops_where_shapes_do_not_repeat(tok, monkeypatch):
    """Each learnt shape costs about three exact labellings: where nearly every conversation has a shape
    of its own (a number argument that differs each time), learning stops after the allowance."""
    from tool_data import HERMES, TOOLS, call

    monkeypatch.setattr(skeleton, "LEARN_FREE", 4)
    tpl = ChatTemplate("hermes", HERMES, "<|im_end|>")
    convs = [Conversation([Message("user", "timer"), Message("assistant", "", tool_calls=(call("set_timer", {"minutes": i}),)),
                           Message("tool", "ok"), Message("assistant", "done")], tools=TOOLS) for i in range(40)]
    fast = Labeler(tok, tpl)
    got = fast.encode(convs)[0]
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in _exact(tok, tpl, convs)]
    assert len(fast._skeletons.cache) == 4



def _awkward_conversations(seed: int, n: int) -> list[Conversation]:
    """Random chats whose replies start (or end) with new lines or white space, which may be a tail of
    the generation prompt (DeepSeek-R1's ends ``<think>\n``): where the exact rule looks at a reply's
    first characters to find where the turn starts."""
    import random

    rng = random.Random(seed)
    heads = ["", "\n", "\n\n", "\n \n", " ", "\t", "assistant\n"]
    words = ["hello", "Paris", "{0}", "ünï", "42", ".", "x y", "\n", " "]
    convs = []
    for _ in range(n):
        msgs = [Message("system", "".join(rng.choices(words, k=3)))] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            reply = rng.choice(heads) + "".join(rng.choices(words, k=rng.randint(1, 4))) + rng.choice(["", "\n", " "])
            msgs += [Message("user", "".join(rng.choices(words, k=3))),
                     Message("assistant", reply if reply.strip() else reply + "ok")]
        convs.append(Conversation(msgs))
    return convs


def _official_sources() -> dict[str, str]:
    import test_official_templates as off

    return {**{k: v[0] for k, v in off.TEMPLATES.items()}, "deepseek-r1": off.DEEPSEEK_R1, "mistral-tools": off.MISTRAL_TOOLS}


@pytest.mark.parametrize("name", ["builtin:" + n for n in template_names()] + sorted(_official_sources()))
def test_labels_do_not_depend_on_the_order_of_conversations(tok, name, monkeypatch):
    """Skeletons on or off, the file in either order: every conversation gets the same ids and labels
    (the first of a shape is labelled exactly, later ones by its skeleton, which the sampled check must
    never have to correct: it is switched off here)."""
    import test_official_templates as off

    monkeypatch.setattr(skeleton, "VERIFY_EVERY", 10**9)
    t = tok
    if name.startswith("builtin:"):
        tpl = resolve_template(name.split(":", 1)[1], tok)
    else:
        t = AutoTokenizer.from_pretrained(tok.name_or_path)
        t.add_special_tokens({"additional_special_tokens": off.SPECIALS}, replace_extra_special_tokens=False)
        tpl = ChatTemplate(name, _official_sources()[name], None, {"bos_token": t.bos_token, "eos_token": t.eos_token})
    convs = _awkward_conversations(seed=11, n=60)

    def labels(order: list[int], masking: str, skeletons: bool) -> dict[int, list]:
        out: dict[int, list] = {}  # conversation -> its examples' (ids, labels)
        labeler = Labeler(t, tpl, masking=masking, skeletons=skeletons)
        exs = labeler.encode([convs[k] for k in order])[0]
        assert not labeler.skeletons_failed
        for e in exs:
            out.setdefault(order[e.index], []).append((e.input_ids, e.labels))
        return out

    forward, backward = list(range(len(convs))), list(range(len(convs)))[::-1]
    for masking in ("all_assistant", "all"):
        want = labels(forward, masking, skeletons=False)
        assert labels(forward, masking, skeletons=True) == want, masking
        assert labels(backward, masking, skeletons=True) == want, masking


def test_deepseek_r1_reply_starting_with_a_new_line_is_trained_the_same_in_either_order(tok):
    """DeepSeek-R1's prompt ends ``<think>\\n``, which the rendered turn does not show. The exact rule trains
    the (empty) reasoning's close and then the reply as rendered, its leading new line included; the
    skeleton learnt from another reply must agree."""
    import test_official_templates as off

    from sftlab.data.masking import trained_text

    t = AutoTokenizer.from_pretrained(tok.name_or_path)
    t.add_special_tokens({"additional_special_tokens": off.SPECIALS}, replace_extra_special_tokens=False)
    tpl = ChatTemplate("deepseek-r1", off.DEEPSEEK_R1, None, {"bos_token": t.bos_token, "eos_token": t.eos_token})
    a = Conversation([Message("user", "q1"), Message("assistant", "a1")])
    b = Conversation([Message("user", "q2"), Message("assistant", "\nHello")])
    for order in ([a, b], [b, a]):
        exs = Labeler(t, tpl).encode(order)[0]
        got = {trained_text(t, e)[0] for e in exs}
        assert got == {"\n</think>\n\na1<｜end▁of▁sentence｜>", "\n</think>\n\n\nHello<｜end▁of▁sentence｜>"}, order
