"""The one exception type for user mistakes.

Anything a user can fix (a missing file, a malformed line, an unknown template) raises
:class:`SftlabError` with a message that names the place and the fix. The CLI prints it as one
line on stderr and exits non-zero; any other exception is a bug in sftlab and keeps its traceback.
"""

from __future__ import annotations


class SftlabError(Exception):
    """A user-facing error: one line, naming file/line or example, what is wrong and how to fix it."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.hint = hint
        super().__init__(message if not hint else f"{message} ({hint})")
