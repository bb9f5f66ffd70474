"""The one Conversation type every input format is converted to.

A chat is a list of :class:`Message`. Beyond text, an assistant message may carry ``tool_calls``
(functions it calls, OpenAI shape: ``{"id"?, "type": "function", "function": {"name", "arguments"}}``,
``arguments`` a dict once normalised) and ``reasoning`` (its thinking, apart from the reply); a
``tool`` message carries a function's result, with the ``tool_call_id``/``name`` of the call it
answers. A conversation may list the ``tools`` (JSON schemas) the model was offered; the chat
template receives them as ``tools=``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str
    tool_calls: tuple[dict, ...] | None = None  # assistant only: the calls it makes
    reasoning: str | None = None  # assistant only: its thinking, without the <think> markers
    tool_call_id: str | None = None  # tool only: the call this result answers
    name: str | None = None  # tool only: the function whose result this is
    # assistant only: its reasoning was read from content with a </think> and no <think> (DeepSeek-R1's raw
    # replies); the doctor says so. Not part of the message's value: equal to the same message with <think>.
    reasoning_unopened: bool = field(default=False, compare=False, repr=False)

    def to_template(self) -> dict:
        """The message as chat templates expect it (HF conventions: ``reasoning_content``, ``tool_calls``)."""
        d: dict = {"role": self.role, "content": self.content}
        if self.tool_calls:
            d["tool_calls"] = [dict(c) for c in self.tool_calls]
        if self.reasoning is not None:
            d["reasoning_content"] = self.reasoning
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            d["name"] = self.name
        return d


@dataclass
class Conversation:
    """One training example.

    ``messages`` holds a chat; ``text`` holds a plain-text example (then ``messages`` is empty and
    every token is trained). ``tools`` lists the function schemas offered to the model (None: none).
    ``source`` says where it came from ("data.jsonl:12"); ``line`` is the 1-based line (or record
    number) in that file; ``weight`` scales the example's loss.
    """

    messages: list[Message] = field(default_factory=list)
    text: str | None = None
    weight: float = 1.0
    source: str = "<memory>"
    line: int = 0
    tools: list[dict] | None = None

    @property
    def is_text(self) -> bool:
        return self.text is not None

    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source

    def replies(self) -> list[str]:
        return [m.content for m in self.messages if m.role == "assistant"]
