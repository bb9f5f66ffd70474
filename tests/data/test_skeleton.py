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
    "truth": "{% if m.content %}{{ m.content }}{% endif %}",
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
    # learning (2 probe + 2 exact renders) + the exact check of the first and of 1 in VERIFY_EVERY
    assert len(calls) <= 4 + 2 * (1 + 1000 // skeleton.VERIFY_EVERY)
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
    assert 0 < served and (served < len(convs) or name == "qwen3-like")  # both paths were taken


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
