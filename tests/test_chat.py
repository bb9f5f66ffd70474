"""`sftlab chat` (driven through a pseudo-terminal) and `sftlab generate`."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_lora_run

import sftlab
from sftlab.chat import ChatSession, HoldCalls, load_chat_model, run_chat
from sftlab.cli import main
from sftlab.data.types import Conversation, Message
from sftlab.eval.generation import GenerationSettings, generate, generate_replies

MAX_NEW = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA run folder as training leaves it (config.yaml + model/ with adapter and tokenizer)."""
    return make_lora_run(tmp_path_factory.mktemp("chat_run"), tiny_model_dir, seed=2)


@pytest.fixture(scope="module")
def loaded(run):
    return load_chat_model(str(run), device="cpu")


def _expected(loaded, messages: list[Message]) -> str:
    model, tok, tpl = loaded
    conv = Conversation(messages + [Message("assistant", "")])
    return generate_replies(model, tok, tpl, [conv], GenerationSettings(max_new_tokens=MAX_NEW))[0]


def test_session_streams_and_keeps_history(loaded):
    model, tok, tpl = loaded
    session = ChatSession(model, tok, tpl, system_prompt="Be brief.", max_new_tokens=MAX_NEW)
    pieces: list[str] = []
    reply = session.send("hello", on_text=pieces.append)
    assert "".join(pieces) == reply
    # Greedy streaming gives what batched generation gives for the same conversation.
    assert reply == _expected(loaded, [Message("system", "Be brief."), Message("user", "hello")])
    second = session.send("and again")
    assert [m.role for m in session.history] == ["system", "user", "assistant", "user", "assistant"]
    assert session.history[2].content == reply and session.history[4].content == second
    assert session.prompt("x").endswith("<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n")
    session.reset()
    assert session.history == [Message("system", "Be brief.")]


class _Terminal:
    """The parent's side of a pseudo-terminal: ``expect`` reads until a marker, keeping what follows."""

    def __init__(self, fd: int):
        import codecs

        self.fd, self.pending, self.seen = fd, "", ""
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character may span two reads

    def expect(self, marker: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {marker!r}; got {self.seen!r}")
            if not select.select([self.fd], [], [], left)[0]:
                continue
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the chat ended before {marker!r}; got {self.seen!r}")
            text = self.decoder.decode(chunk)
            self.pending += text
            self.seen += text
        upto, self.pending = self.pending.split(marker, 1)
        return upto

    def send(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())


def test_chat_through_a_pseudo_terminal(run, loaded):
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="dumb", PYTHONPATH=os.pathsep.join(
        [str(Path(sftlab.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "sftlab.cli", "chat", str(run), "--device", "cpu",
                             "--max-new-tokens", str(MAX_NEW), "--system", "Be brief."],
                            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    term = _Terminal(master)
    try:
        banner = term.expect("you> ")
        assert "template chatml" in banner and "replies end at <|im_end|>" in banner and "system: Be brief." in banner
        term.send("hello")
        term.expect("assistant> ")
        streamed = term.expect("you> ").replace("\r\n", "\n")
        model, tok, tpl = loaded
        conv = Conversation([Message("system", "Be brief."), Message("user", "hello"), Message("assistant", "")])
        gen = generate(model, tok, tpl, [conv], GenerationSettings(max_new_tokens=MAX_NEW))[0]
        cut = "" if gen.finished else f" [cut at --max-new-tokens {MAX_NEW}]"  # a reply cut short says so
        assert streamed == gen.text + cut + "\n"
        term.send("/reset")
        term.expect("(history cleared)")
        term.expect("you> ")
        term.send("/exit")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_chat_with_an_exported_adapter(run, loaded, tmp_path):
    from sftlab.export import export_run

    out = export_run(run, tmp_path / "exp", verify=False).out
    model, tok, tpl = load_chat_model(str(out), device="cpu")
    session = ChatSession(model, tok, tpl, max_new_tokens=MAX_NEW)
    assert session.send("hello") == _expected(loaded, [Message("user", "hello")])


def test_generate_cli(run, loaded, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"},
                                             {"role": "assistant", "content": "hi there"}]}) + "\n")
    out = tmp_path / "gen.jsonl"
    assert main(["generate", str(run), "--data", str(data), "--out", str(out), "--max-new-tokens", str(MAX_NEW),
                 "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 1
    row = json.loads(out.read_text())
    assert row["prompt"] == [{"role": "user", "content": "hello"}] and row["reference"] == "hi there"
    assert row["reply"] == _expected(loaded, [Message("user", "hello")])

    assert main(["generate", str(run), "--prompt", "hello", "--prompt", "two", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"][-1]["content"] for r in rows] == ["hello", "two"]


def test_generate_replies_to_prompt_only_files(run, loaded, tmp_path, capsys):
    """The natural input to generate: prompts without replies, in each format."""
    files = {
        "m.jsonl": [{"messages": [{"role": "user", "content": "hello"}]},
                    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                  {"role": "user", "content": "two"}]},
                    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}],
        "p.jsonl": [{"prompt": "hello"}],
        "s.jsonl": [{"conversations": [{"from": "human", "value": "hello"}]}],
        "a.jsonl": [{"instruction": "hello"}],
    }
    for name, rows in files.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.csv").write_text("Prompt\nhello\n")
    for name in [*files, "p.csv"]:
        out = tmp_path / f"{name}.gen.jsonl"
        assert main(["generate", str(run), "--data", str(tmp_path / name), "--out", str(out), "--max-new-tokens",
                     str(MAX_NEW), "--device", "cpu"]) == 0, capsys.readouterr().err
        got = [json.loads(line) for line in out.read_text().splitlines()]
        assert got[0]["prompt"] == [{"role": "user", "content": "hello"}] and got[0]["reference"] is None
        assert got[0]["reply"] == _expected(loaded, [Message("user", "hello")])
    got = [json.loads(line) for line in (tmp_path / "m.jsonl.gen.jsonl").read_text().splitlines()]
    # the whole chat is the prompt; an empty final assistant message is the reply to generate
    assert [len(r["prompt"]) for r in got] == [1, 3, 1] and got[1]["prompt"][-1]["content"] == "two"
    assert got[1]["reply"] == _expected(loaded, [Message("user", "a"), Message("assistant", "b"), Message("user", "two")])
    capsys.readouterr()
    # truly unusable: one line, before the model loads
    bad = {"t.jsonl": ({"text": "plain"}, "plain-text records have no prompt"),
           "sys.jsonl": ({"messages": [{"role": "system", "content": "S"}]}, "only a system message"),
           "q.jsonl": ({"question": "hi"}, "cannot tell the data format")}
    for name, (row, words) in bad.items():
        (tmp_path / name).write_text(json.dumps(row) + "\n")
        assert main(["generate", str(run), "--data", str(tmp_path / name), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sftlab generate: error:") and words in err and "\n" not in err, err


def test_bad_input_is_one_line(run, tmp_path, capsys):
    assert main(["generate", str(run)]) == 2
    assert "give either --prompt" in capsys.readouterr().err
    broken = tmp_path / "broken_run"
    broken.mkdir()
    (broken / "config.yaml").write_text((run / "config.yaml").read_text())
    assert main(["chat", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sftlab chat: error:") and "no model/" in err and "\n" not in err


# --- tools ------------------------------------------------------------------------------------


def _tool_session(loaded, **kw):
    from tool_data import HERMES, TOOLS

    from sftlab.data.templates import ChatTemplate

    model, tok, _ = loaded
    return ChatSession(model, tok, ChatTemplate("hermes", HERMES, "<|im_end|>", {}), max_new_tokens=MAX_NEW,
                       tools=TOOLS, **kw)


def test_tools_reach_the_prompt_and_the_real_generation_path(loaded):
    session = _tool_session(loaded)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in session.prompt("hi")
    reply, raw = session._generate(session.prompt("hi"), None)
    assert reply == raw  # the tiny ChatML vocabulary has no special token a reply could hold
    session.send("hi")
    assert session.pending_calls == [] and session.history[-1] == Message("assistant", session.history[-1].content)


def test_a_tool_call_is_shown_answered_by_the_user_and_continued(loaded, monkeypatch):
    """The model's reply is scripted (a random tiny model never emits a call); everything else is real."""
    import io

    session = _tool_session(loaded)
    scripted = iter(['Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
                     "It is 21 degrees in Paris."])
    prompts: list[str] = []

    def fake_generate(prompt, on_text):
        prompts.append(prompt)
        text = next(scripted)
        if on_text:
            on_text(text)
        return text, text

    monkeypatch.setattr(session, "_generate", fake_generate)
    lines = iter(["weather in Paris?", '{"temp": 21}', "/exit"])
    out = io.StringIO()
    assert run_chat(session, read=lambda prompt: (out.write(prompt), next(lines))[1], out=out) == 0
    shown = out.getvalue()
    assert "tools: get_weather, set_timer" in shown
    assert 'tool call: get_weather\n{\n  "city": "Paris"\n}\ntool result (get_weather)> assistant> It is 21' in shown
    call = session.history[1].tool_calls[0]
    assert session.history[1].content == "Checking." and call["function"] == {"name": "get_weather",
                                                                                "arguments": {"city": "Paris"}}
    assert session.history[2] == Message("tool", '{"temp": 21}', tool_call_id=call["id"], name="get_weather")
    # The continuation is rendered from the real history: the call, then the result, then the generation prompt.
    assert prompts[1].endswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
                               '<|im_end|>\n<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>'
                               '<|im_end|>\n<|im_start|>assistant\n')
    assert [m.role for m in session.history] == ["user", "assistant", "tool", "assistant"]
    assert session.pending_calls == []


def test_chat_cli_tools_flag(run, tmp_path, capsys, monkeypatch):
    import io

    from tool_data import TOOLS

    good = tmp_path / "tools.json"
    good.write_text(json.dumps({"tools": TOOLS}))
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    assert main(["chat", str(run), "--tools", str(good), "--device", "cpu", "--max-new-tokens", "2"]) == 0
    shown = capsys.readouterr().out
    assert "tools: get_weather, set_timer" in shown
    assert "warning: template chatml ignores tools" in shown  # the run trained with plain ChatML


@pytest.mark.parametrize("content,words", [
    ('[{"type": "function",\n "function": {"name": "f",}}]', "tools.json:2: not valid JSON"),
    ('{"name": "f"}', "expected a JSON list of function schemas"),
    ('[{"type": "function", "function": {"description": "no name"}}]', "tool 1 has no function name"),
    ('[{"name": "f", "parameters": "city"}]', 'tool 1 (f): "parameters" is not a JSON object'),
])
def test_bad_tools_file_is_one_line_before_the_model_loads(run, tmp_path, capsys, content, words):
    bad = tmp_path / "tools.json"
    bad.write_text(content)
    assert main(["chat", str(run), "--tools", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err


def test_generate_checks_the_replys_tool_calls(run, tmp_path, capsys):
    from tool_data import TOOLS

    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps({"tools": TOOLS, "messages": [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}]}) + "\n")
    assert main(["generate", str(run), "--data", str(data), "--max-new-tokens", "2", "--device", "cpu", "--template",
                 "chatml-tools"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["reference"] == '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    assert row["tool_calls"] == {"valid": False, "why": "no tool call in the reply", "calls": [], "match": False}


def test_a_call_that_does_not_parse_is_kept_as_text_and_said(loaded, monkeypatch):
    import io

    session = _tool_session(loaded)
    broken = '<tool_call>{"name": "get_weather", "arguments": {"city": "Par'
    monkeypatch.setattr(session, "_generate", lambda prompt, on_text: (on_text and on_text(broken), (broken, broken))[1])
    lines = iter(["weather?", "/exit"])
    out = io.StringIO()
    assert run_chat(session, read=lambda prompt: next(lines), out=out) == 0
    assert "(not run as a tool call: a <tool_call> block is never closed)" in out.getvalue()
    assert session.history[-1] == Message("assistant", broken) and session.pending_calls == []


def test_a_reply_that_reasons_keeps_its_reasoning_and_its_call(loaded, monkeypatch):
    """Reasoning that mentions <tool_call> made the real call unparsed (kept as text); and a call after
    reasoning went into the history as content "<think>...</think>", rendered back with one newline
    before <tool_call> where chatml-tools trained two."""
    from tool_data import TOOLS

    from sftlab.data.templates import resolve_template

    model, tok, _ = loaded
    session = ChatSession(model, tok, resolve_template("chatml-tools", tok), max_new_tokens=MAX_NEW, tools=TOOLS)
    reply = ('<think>\nI answer with a <tool_call> block.\n</think>\n\n<tool_call>\n'
             '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    monkeypatch.setattr(session, "_generate", lambda prompt, on_text: (reply, reply))
    session.send("weather in Paris?")
    assert session.call_error is None and session.pending_calls[0]["function"]["name"] == "get_weather"
    assert session.history[-1].reasoning == "I answer with a <tool_call> block."
    session.add_tool_result(session.pending_calls[0], '{"temp": 21}')
    assert "<|im_start|>assistant\n" + reply + "<|im_end|>\n" in session.prompt(None)  # as the model wrote it


def test_bare_tool_schemas_are_offered_as_training_rendered_them(tmp_path, loaded):
    """Training reads a bare {"name", "parameters"} schema as OpenAI's {"type": "function", "function": ...};
    chat --tools passed the bare one to the template, so the model saw other <tools> text than in training."""
    from tool_data import TOOLS

    from sftlab.chat_tools import load_tools
    from sftlab.data.formats import load_conversations
    from sftlab.data.templates import resolve_template

    bare = [t["function"] for t in TOOLS]
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(bare))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"tools": bare, "messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}]}) + "\n")
    trained = load_conversations(str(data), None)[0]
    model, tok, _ = loaded
    tpl = resolve_template("chatml-tools", tok)
    session = ChatSession(model, tok, tpl, max_new_tokens=MAX_NEW, tools=load_tools(path))
    assert session.prompt("hi") == tpl.render(trained.messages[:1], add_generation_prompt=True, tools=trained.tools)


def test_a_call_to_a_function_not_offered_is_played_with_a_warning(loaded, monkeypatch):
    """The user still plays the call (the model may be probed), but is told that it names no offered
    tool, as eval would count it invalid; a call that fits gets no warning."""
    import io

    session = _tool_session(loaded)
    stray = '<tool_call>\n{"name": "launch_rocket", "arguments": {"target": "moon"}}\n</tool_call>'
    replies = iter([stray, "It is done."])
    monkeypatch.setattr(session, "_generate", lambda prompt, on_text: (lambda r: (r, r))(next(replies)))
    lines = iter(["go", "ok", "/exit"])
    out = io.StringIO()
    assert run_chat(session, read=lambda prompt: next(lines), out=out) == 0
    text = out.getvalue()
    assert "(warning: call 'launch_rocket': not one of the tools (get_weather" in text and "tool call: launch_rocket" in text
    fitting = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    monkeypatch.setattr(session, "_generate", lambda prompt, on_text: (fitting, fitting))
    session.send("weather?")
    assert session.call_warning is None and session.pending_calls


def test_a_qwen3_coder_xml_call_is_played_with_its_values_typed(loaded, monkeypatch):
    """Qwen3-Coder writes calls as <function=...><parameter=...> XML with text values: chat kept such a
    reply as text; now it is a call, each value typed by the function's schema as eval checks it."""
    session = _tool_session(loaded)
    xml = ("Starting it.\n<tool_call>\n<function=set_timer>\n<parameter=minutes>\n5\n</parameter>\n"
           "<parameter=label>\ntea\n</parameter>\n</function>\n</tool_call>")
    monkeypatch.setattr(session, "_generate", lambda prompt, on_text: (xml, xml))
    session.send("tea timer")
    assert session.call_error is None and session.call_warning is None
    assert session.history[-1].content == "Starting it."
    assert [c["function"] for c in session.pending_calls] == [{"name": "set_timer",
                                                               "arguments": {"minutes": 5, "label": "tea"}}]
    broken = xml.replace("</parameter>\n</function>", "</function>")
    monkeypatch.setattr(session, "_generate", lambda prompt, on_text: (broken, broken))
    session.send("again")
    assert session.call_error == ("<parameter=label> in <function=set_timer> is never closed "
                                  "(no </parameter> before </function>)")
    assert session.history[-1] == Message("assistant", broken)


def test_generate_offers_tools_with_prompts(run, tmp_path, capsys):
    """--tools with --prompt renders the schemas into each prompt (as chat --tools does) and checks each
    reply's calls; with --data (whose conversations carry their own tools) it is one error line."""
    from tool_data import TOOLS

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    assert main(["generate", str(run), "--prompt", "weather in Oslo?", "--tools", str(tools), "--max-new-tokens", "2",
                 "--device", "cpu", "--template", "chatml-tools"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["tool_calls"] == {"valid": False, "why": "no tool call in the reply", "calls": []}
    assert main(["generate", str(run), "--prompt", "weather in Oslo?", "--max-new-tokens", "2", "--device", "cpu",
                 "--template", "chatml-tools"]) == 0
    assert "tool_calls" not in json.loads(capsys.readouterr().out)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    assert main(["generate", str(run), "--data", str(data), "--tools", str(tools)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tools goes with --prompt" in err and "\n" not in err


def test_generate_prompt_with_tools_renders_them(loaded):
    from tool_data import TOOLS

    from sftlab.chat import _conversations
    from sftlab.data.templates import resolve_template

    _, tok, _ = loaded
    conv = _conversations(["weather in Oslo?"], None, None, None, TOOLS)[0]
    text = resolve_template("chatml-tools", tok).render(conv.messages, True, tools=conv.tools)
    assert '"name": "get_weather"' in text and "<tools>" in text


def _streamed_chat(session, monkeypatch, pieces: list[str], lines: list[str], after: str = "It is 21 degrees.") -> str:
    """What run_chat shows when the model streams ``pieces`` (then ``after``, in one piece, after any tool result)."""
    import io

    replies = iter(["".join(pieces), after])
    chunks = iter([pieces, [after]])

    def fake_generate(prompt, on_text):
        text = next(replies)
        for piece in next(chunks):
            on_text(piece)
        return text, text

    monkeypatch.setattr(session, "_generate", fake_generate)
    feed = iter(lines)
    out = io.StringIO()
    assert run_chat(session, read=lambda prompt: (out.write(prompt), next(feed))[1], out=out) == 0
    return out.getvalue()


def test_a_streamed_tool_call_is_shown_once_formatted_not_also_raw(loaded, monkeypatch):
    """Streaming printed `<tool_call>{"name": ...}</tool_call>` as it came, then the formatted call again."""
    pieces = ["Checking the", " weather.<tool", "_call>\n{\"name\": ", '"get_weather", "arguments": {"city": "Paris"}}',
              "\n</tool_call>"]
    shown = _streamed_chat(_tool_session(loaded), monkeypatch, pieces, ["weather in Paris?", '{"temp": 21}', "/exit"])
    assert "<tool" not in shown and '"arguments"' not in shown
    assert 'assistant> Checking the weather.\ntool call: get_weather\n{\n  "city": "Paris"\n}\n' in shown
    assert "assistant> It is 21 degrees." in shown
    # a call that does not parse is shown as the model wrote it, once, with why it was not run
    broken = ['Sure.<tool_call>{"name": "get_weather", ', '"arguments": {"city": "Par']
    shown = _streamed_chat(_tool_session(loaded), monkeypatch, broken, ["weather?", "/exit"])
    assert shown.split("(not run")[0].count("<tool_call>") == 1 and ('assistant> Sure.<tool_call>{"name": "get_weather", "arguments": '
                                                 '{"city": "Par\n(not run as a tool call:') in shown
    # a marker's first characters that turn out to be text are shown, and JSON answers stream for hermes
    shown = _streamed_chat(_tool_session(loaded), monkeypatch, ['{"a": 1} a <tool', "box> here"], ["hi", "/exit"])
    assert 'assistant> {"a": 1} a <toolbox> here\n' in shown


LLAMA_JSON = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
              '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}{% endfor %}'
              "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Llama 3.1's form: the reply is the JSON


@pytest.mark.parametrize("template, pieces, before", [
    # a bare JSON call (Llama's form) from a model whose template writes <tool_call> blocks
    ("hermes", ['{"name": "get_', 'weather", "arguments": {"city": ', '"Paris"}}'], ""),
    ("hermes", ['[{"name": "get_weather", ', '"parameters": {"city": "Paris"}}]'], ""),
    # a Hermes/Qwen block, and Mistral's list, from a model whose template writes bare JSON
    ("llama", ["Checking the weather.", '<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}\n</tool_call>'],
     "Checking the weather."),
    ("llama", ["Checking the weather.[TOOL_", 'CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'],
     "Checking the weather."),
    ("hermes", ["<|python", '_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'], ""),
    # after reasoning, whose <think> the generation prompt opened
    ("llama", ["I should look it up.</think>\n", '{"name": "get_weather",', ' "arguments": {"city": "Paris"}}'],
     "I should look it up.</think>\n"),
])
def test_a_call_in_another_dialect_than_the_templates_is_shown_once(loaded, monkeypatch, template, pieces, before):
    """The hold-back knew only the template's own dialect: another one the parser reads (so chat plays
    the call) was streamed raw, then shown formatted again."""
    from sftlab.data.templates import ChatTemplate

    session = _tool_session(loaded)
    if template == "llama":
        session.template = ChatTemplate("llama-ish", LLAMA_JSON, "<|im_end|>", {})
    shown = _streamed_chat(session, monkeypatch, pieces, ["weather in Paris?", '{"temp": 21}', "/exit"])
    assert session.history[1].tool_calls[0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert f'assistant> {before}\ntool call: get_weather\n{{\n  "city": "Paris"\n}}\n' in shown
    assert shown.count("Paris") == 1 and "_tag" not in shown and "CALLS" not in shown


def test_json_and_text_that_are_no_call_stream_whole(loaded, monkeypatch):
    """Held JSON that turns out to be an answer, not a call, is shown as written, once."""
    for pieces in (['{"city": ', '"Paris"}', " is the answer"], ['{"city": "Paris"}'], ['[1, ', '2]'],
                   ['{"name": "get_weather", "arguments": '], ["a [TOOL", "BOX] b"]):
        shown = _streamed_chat(_tool_session(loaded), monkeypatch, pieces, ["hi", "/exit"])
        assert f"assistant> {''.join(pieces)}\n" in shown and "tool call:" not in shown
    streamed: list[str] = []  # a JSON answer streams once its value is complete and not a call
    hold = HoldCalls(streamed.append)
    for piece in ['{"city": ', '"Paris"}', " is", " it"]:
        hold(piece)
        streamed.append("|")
    assert "".join(streamed) == '|{"city": "Paris"}| is| it|'


def test_a_reply_cut_at_max_new_tokens_says_so(loaded):
    """A reply that ran out of --max-new-tokens read as the model's whole answer."""
    import io

    model, tok, tpl = loaded
    conv = Conversation([Message("user", "hello"), Message("assistant", "")])
    gen = generate(model, tok, tpl, [conv], GenerationSettings(max_new_tokens=3))[0]
    assert not gen.finished  # the random tiny model runs on
    shown = []
    for ends_at_once in (False, True):
        session = ChatSession(model, tok, tpl, max_new_tokens=3)
        if ends_at_once:  # its first token taken as the end of turn: the reply ends, nothing is cut
            session.stop_ids = [*session.stop_ids, gen.token_ids[0]]
        lines = iter(["hello", "/exit"])
        out = io.StringIO()
        assert run_chat(session, read=lambda prompt: next(lines), out=out) == 0
        shown.append(out.getvalue())
        assert session.was_cut == (not ends_at_once)
    assert "assistant> " + gen.text + " [cut at --max-new-tokens 3]\n" in shown[0]
    assert "[cut at" not in shown[1] and "assistant> " in shown[1]


def test_a_broken_call_after_a_tool_result_is_said_too(loaded, monkeypatch):
    """After a tool result, a reply whose call did not parse was shown as text without saying why it was
    not run (only the first reply of a turn said so)."""
    pieces = ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>']
    shown = _streamed_chat(_tool_session(loaded), monkeypatch, pieces, ["weather in Paris?", '{"temp": 21}', "/exit"],
                           after='<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"')
    assert ('tool result (get_weather)> assistant> <tool_call>{"name": "get_weather", "arguments": {"city": "Rome"\n'
            "(not run as a tool call: a <tool_call> block is never closed)\nyou> ") in shown


def test_chat_and_generate_show_earlier_reasoning_as_the_run_trained(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A run trained with reasoning: last (or drop) saw no reasoning before the last reply; eval's prompts
    drop it, but chat's history and generate --data rendered it: other prompts than training and eval."""
    import io

    import sftlab.chat as chat
    from sftlab.eval.run import run_eval

    run = make_lora_run(tmp_path / "run", tiny_model_dir, reasoning="last")
    model, tok, tpl = load_chat_model(str(run), device="cpu")
    for reasoning, shown in (("per_turn", True), ("last", False), ("drop", False)):
        session = ChatSession(model, tok, tpl, max_new_tokens=2, reasoning=reasoning)
        session.history += [Message("user", "hi"), Message("assistant", "4", reasoning="two and two")]
        assert ("two and two" in session.prompt("and again?")) == shown
    rows = [{"messages": [{"role": "user", "content": "what is 2 plus 2?"},
                          {"role": "assistant", "content": "4.", "reasoning_content": "two and two make four"},
                          {"role": "user", "content": "and twice that?"}, {"role": "assistant", "content": "8."}]}]
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps(rows[0]) + "\n")
    res = chat.generate_jsonl(str(run), data=str(data), max_new_tokens=MAX_NEW, device="cpu")
    assert "reasoning_content" not in res.rows[0]["prompt"][1]
    sample = run_eval(str(run), str(data), settings=GenerationSettings(max_new_tokens=MAX_NEW), device="cpu")
    assert res.rows[0]["reply"] == sample["result"]["samples"][0]["reply"]  # the same prompt as eval's
    sessions = []  # and `sftlab chat RUN` takes the run's setting
    monkeypatch.setattr(chat, "run_chat", lambda session, name: sessions.append(session) or 0)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    assert main(["chat", str(run), "--device", "cpu"]) == 0 and sessions[0].reasoning == "last"


def test_generate_refuses_tools_its_template_never_shows(run, tmp_path, capsys):
    """`generate --tools` with a template that ignores tools (the run's plain ChatML) generated from prompts
    without them and judged each reply's calls anyway; chat warns of it, generate said nothing."""
    from tool_data import TOOLS

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    assert main(["generate", str(run), "--prompt", "weather in Oslo?", "--tools", str(tools), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tools: template chatml ignores tools" in err and "chatml-tools" in err and "\n" not in err
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS}) + "\n")
    assert main(["generate", str(run), "--data", str(data), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "d.jsonl:1: its tools: template chatml ignores tools" in err and "\n" not in err
    assert main(["generate", str(run), "--data", str(data), "--device", "cpu", "--template", "chatml-tools",
                 "--max-new-tokens", "2"]) == 0


def test_generate_rows_keep_the_answer_apart_from_the_reasoning(run, tmp_path, monkeypatch):
    """eval's rows hold a reasoning reply's answer and reasoning apart; generate's held the reply whole, so a
    reader of the JSONL had to split <think> blocks itself to get the answer."""
    import sftlab.chat as chat
    from sftlab.eval.generation import Generation

    replies = ["<think>\ntwo and two\n</think>\n\n4", "4", "<think>\nstill thinking"]
    monkeypatch.setattr(chat, "generate", lambda model, tok, tpl, convs, settings, batch_size: [
        Generation(t, True, 3) for t in replies])
    rows = chat.generate_jsonl(str(run), prompts=["a", "b", "c"], device="cpu").rows
    assert (rows[0]["answer"], rows[0]["reasoning"]) == ("4", "two and two")
    assert "answer" not in rows[1] and (rows[2]["answer"], rows[2]["reasoning"]) == ("", "still thinking")


@pytest.mark.parametrize("command", ["chat", "generate"])
@pytest.mark.parametrize("flags,words", [(["--temperature", "-1"], "--temperature -1 must be >= 0"),
                                         (["--top-p", "1.5", "--temperature", "0.7"], "--top-p 1.5 must be in (0, 1]"),
                                         (["--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1")])
def test_bad_generation_flags_are_one_line_naming_the_value_before_the_model_loads(run, capsys, monkeypatch,
                                                                                   command, flags, words):
    """chat loaded the model, then said "--temperature must be >= 0 and --top-p in (0, 1]" (which, at what value?)."""
    import sftlab.chat as chat

    monkeypatch.setattr(chat, "load_chat_model", lambda *a, **k: pytest.fail("the model loaded"))
    extra = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, str(run), *extra, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err


@pytest.mark.parametrize("pieces,shown", [
    (['Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "\nI will wait."],
     "assistant> Checking. I will wait.\ntool call: get_weather\n"),
    (['<think>\nhm\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
      " Back soon."], "assistant> <think>\nhm\n</think>\n\nBack soon.\ntool call: get_weather\n"),
    (['Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'],
     "assistant> Checking.\ntool call: get_weather\n"),
])
def test_text_after_a_call_is_shown_too(loaded, monkeypatch, pieces, shown):
    """The hold-back kept everything from a call's opening: text the model wrote after the call was never
    shown, though the history kept it and the model saw it on the next turn."""
    session = _tool_session(loaded)
    text = _streamed_chat(session, monkeypatch, pieces, ["weather in Paris?", '{"temp": 21}', "/exit"])
    assert shown in text


def test_a_streamed_reply_keeps_think_tags_that_are_special_tokens():
    """Where <think>/</think> are special tokens, the reply's text keeps them (decode_reply) but the stream
    left them out with every special token: the reasoning ran into the answer with no tag between them."""
    import torch
    from conftest import build_tiny_tokenizer
    from transformers import TextIteratorStreamer

    from sftlab.chat import reply_streamer
    from sftlab.eval.generation import decode_reply

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    for t, want in ((tok, "<think>\nhm\n</think>\n\n4"), (build_tiny_tokenizer(), "<think>\nhm\n</think>\n\n4")):
        ids = t("<think>\nhm\n</think>\n\n4<|im_end|>", add_special_tokens=False).input_ids
        streamer = reply_streamer(t, TextIteratorStreamer)
        streamer.put(torch.tensor([[1, 5, 6]]))  # the prompt: skipped
        for i in ids:
            streamer.put(torch.tensor([i]))
        streamer.end()
        assert "".join(streamer) == want == decode_reply(t, ids[:-1])


def test_a_call_marker_that_is_a_special_token_is_held_back_too():
    """Where a call's marker is a special token (Mistral's [TOOL_CALLS], Llama's <|python_tag|>), the stream
    left it out: 'Sure.[{"name": ...}]' streamed raw, the hold-back seeing no marker, then the call again."""
    import torch
    from conftest import build_tiny_tokenizer
    from transformers import TextIteratorStreamer

    from sftlab.chat import reply_streamer
    from sftlab.chat_tools import CALL_MARKERS, HoldCalls

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    ids = tok('Sure.[TOOL_CALLS][{"name": "f", "arguments": {}}]<|endoftext|>', add_special_tokens=False).input_ids
    for keep, want in ((CALL_MARKERS, "Sure."), ((), 'Sure.[{"name": "f", "arguments": {}}]')):
        streamer = reply_streamer(tok, TextIteratorStreamer, keep=keep)
        streamer.put(torch.tensor([[1, 5]]))
        for i in ids:
            streamer.put(torch.tensor([i]))
        streamer.end()
        shown: list[str] = []
        hold = HoldCalls(shown.append)
        for piece in streamer:
            hold(piece)
        assert "".join(shown) == want and "<|endoftext|>" not in hold.text


def test_generate_rows_say_whether_a_call_is_the_references(run, tmp_path, monkeypatch):
    """eval scores a call against the reference's call; generate --data checked it parsed and fit the
    tools, not whether it was the reference's call, though the row held that reference."""
    from tool_data import TOOLS

    import sftlab.chat as chat
    from sftlab.eval.generation import Generation

    rows = [{"tools": TOOLS, "messages": [{"role": "user", "content": f"weather in {c}?"}, {
        "role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": c}}}]}]} for c in ("Oslo", "Rome")]
    rows.append({"tools": TOOLS, "messages": [{"role": "user", "content": "hi"}]})
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    monkeypatch.setattr(chat, "generate", lambda *a, **k: [Generation(call, True, 9)] * 3)
    out = chat.generate_jsonl(str(run), data=str(data), template="chatml-tools", device="cpu").rows
    assert [r["tool_calls"].get("match") for r in out] == [True, False, None]
    assert all(r["tool_calls"]["valid"] for r in out)


@pytest.mark.parametrize("command,after", [("/exit", None), ("/reset", "(history cleared)\nyou> ")])
def test_commands_work_at_the_tool_result_prompt(loaded, monkeypatch, command, after):
    """/exit or /reset typed at 'tool result>' went to the model as the tool's result, and it went on."""
    pieces = ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>']
    session = _tool_session(loaded)
    shown = _streamed_chat(session, monkeypatch, pieces, ["weather in Paris?", command, "/exit"])
    assert "It is 21 degrees" not in shown and not any(m.role == "tool" for m in session.history)
    if after:
        assert shown.endswith("tool result (get_weather)> " + after) and session.history == []
    else:
        assert shown.endswith("tool result (get_weather)> ")
