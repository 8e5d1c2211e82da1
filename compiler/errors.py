"""Errors a spec author sees: one line, with the file, the line and what was expected."""

from __future__ import annotations


class SpecError(Exception):
    """A mistake in a spec file, reported as `file:line: where: message`."""

    def __init__(self, path: str, line: int | None, where: str, message: str):
        self.path = path
        self.line = line
        self.where = where
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        location = f"{self.path}:{self.line}" if self.line else self.path
        where = f" {self.where}:" if self.where else ""
        return f"{location}:{where} {self.message}"
