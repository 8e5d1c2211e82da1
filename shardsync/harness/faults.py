"""Fault injection for drills and tests: a receiver that stops mid-update, a flipped byte,
an endpoint slow to read how an update went."""

from __future__ import annotations

import time
from pathlib import Path

import torch


class StopAtFirstPiece:
    """Write targets that stop after the first piece written, having said so (the flag
    file): forever (to be killed mid-update) or for a moment (while a sender is killed)."""

    def __init__(self, targets, flag: str, forever: bool):
        self.targets, self.flag, self.forever, self.done = targets, flag, forever, False

    def __getattr__(self, name: str):
        return getattr(self.targets, name)

    def written(self, name: str, numel: int) -> None:
        self.targets.written(name, numel)
        if not self.done:
            self.done = True
            Path(self.flag).touch()
            time.sleep(3600 if self.forever else 2.0)


def corrupt_next_bucket() -> None:
    """Flip one byte of the next bucket this process receives, before its checksum is checked."""
    from shardsync.runtime.wire import checksum

    original = checksum.check

    def check(buffer, numel):
        checksum.check = original
        buffer[:numel].view(torch.uint8)[numel // 2] ^= 0x10
        return original(buffer, numel)

    checksum.check = check


def slow_to_read_outcome(seconds: float, update: int | None = None) -> None:
    """Make this process wait `seconds` between posting its own outcome of `update` (every
    update when None) and reading everyone else's, as an endpoint on a loaded host may:
    the others, the store's host among them, have heard every outcome by then and may
    have closed."""
    from shardsync.runtime.session.rendezvous import Session

    original = Session._hear

    def _hear(self, stage, when, number, *args, **kwargs):
        if stage.startswith("done") and update in (None, number):
            time.sleep(seconds)
        return original(self, stage, when, number, *args, **kwargs)

    Session._hear = _hear
