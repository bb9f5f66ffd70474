"""The demo data set that ships with sftlab (written by ``python -m sftlab.demo_data.generate``).

- ``train`` (300) / ``eval`` (60): extract fields from one synthetic sentence into compact JSON, keys in
  the order the instruction gives; dates as YYYY-MM-DD, counts as numbers, null for what is not stated.
  The assistant reply is exactly the JSON, so answers are checked by exact match or field by field.
- ``general`` (60): short generic questions (capitals, arithmetic, definitions, conversions, small talk),
  for replay and for checking what fine-tuning made the model forget.
- ``tools_train`` (200) / ``tools_eval`` (40): tool calling with three functions (written by
  ``python -m sftlab.demo_data.tools``); the held-out requests end at the call to make.

All are openai-messages JSONL: ``{"messages": [{"role": ..., "content": ...}, ...]}``.
"""

from __future__ import annotations

from pathlib import Path

from sftlab.core.errors import SftlabError

SPLITS = ("train", "eval", "general", "tools_train", "tools_eval")


def demo_path(split: str) -> Path:
    """Path of the ``train``, ``eval`` or ``general`` JSONL file."""
    if split not in SPLITS:
        raise SftlabError(f"unknown demo split '{split}': use one of {', '.join(SPLITS)}")
    path = Path(__file__).with_name(f"{split}.jsonl")
    if not path.is_file():
        raise SftlabError(f"demo file {path} is missing: run `python -m sftlab.demo_data.generate`")
    return path
