"""SpecError: the one exception a user's spec can cause.

Every message names `file:line:col`, shows the offending source line with a caret
under the column, and gives a hint, so that a spec author never sees a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pos:
    """A place in a spec file (1-based line and column)."""

    file: str
    line: int
    col: int
    end_col: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"




class SpecError(Exception):
    def __init__(self, message: str, pos: Pos | None = None, hint: str | None = None,
                 source: str | None = None):
        self.message = message
        self.pos = pos
        self.hint = hint
        self.source = source
        super().__init__(self.render())

    def with_source(self, text: str) -> "SpecError":
        """Attach the spec's text (for specs that do not come from a file)."""
        if self.source is None:
            self.source = text
            self.args = (self.render(),)
        return self

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        head = f"{self.pos}: error: {self.message}" if self.pos else f"error: {self.message}"
        lines = [head]
        text = self.source
        if text is None and self.pos and self.pos.line > 0:
            text = _read_source(self.pos.file)
        if text is not None and self.pos and 0 < self.pos.line <= len(text.splitlines()):
            src = text.splitlines()[self.pos.line - 1]
            width = 1
            if self.pos.end_col and self.pos.end_col > self.pos.col:
                width = self.pos.end_col - self.pos.col
            lines.append(f"  {self.pos.line:4d} | {src}")
            lines.append("       | " + " " * (self.pos.col - 1) + "^" * width)
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


def _read_source(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None
