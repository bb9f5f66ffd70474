"""The one Conversation type every input format is converted to."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass
class Conversation:
    """One training example.

    ``messages`` holds a chat; ``text`` holds a plain-text example (then ``messages`` is empty and
    every token is trained). ``source`` says where it came from ("data.jsonl:12"); ``line`` is the
    1-based line (or record number) in that file; ``weight`` scales the example's loss.
    """

    messages: list[Message] = field(default_factory=list)
    text: str | None = None
    weight: float = 1.0
    source: str = "<memory>"
    line: int = 0

    @property
    def is_text(self) -> bool:
        return self.text is not None

    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source

    def replies(self) -> list[str]:
        return [m.content for m in self.messages if m.role == "assistant"]
