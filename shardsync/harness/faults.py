"""Fault injection for drills and tests: a receiver that stops mid-update or reads slowly,
a flipped byte, an endpoint slow to read how an update went, a producer that writes a
shared slot again before its readers are done, a GPU busy with other work."""

from __future__ import annotations

import faulthandler
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


class SlowTargets:
    """Write targets that take `seconds` before every piece is copied into them, as an
    engine rank on a loaded host might: its buckets stay in use that much longer."""

    def __init__(self, targets, seconds: float):
        self.targets, self.seconds = targets, seconds

    def __getattr__(self, name: str):
        return getattr(self.targets, name)

    def tensor(self, name: str) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.targets.tensor(name)


def reuse_slots_early() -> None:
    """Make this process, a colocated producer, write each shared slot again without
    waiting for its readers to release the bucket it held: the ordering bug the
    colocated method exists to rule out, which its readers' checksums must catch."""
    from shardsync.runtime.wire.shared_pipe import SharedPipe

    def take_slot(self) -> int:
        slot = self._next % self.depth
        self._next += 1
        self._occupants[slot] = None
        return slot

    SharedPipe.take_slot = take_slot


class BusyDeviceTargets:
    """Write targets on a GPU busy with other work when an update's copies are queued:
    from the update after `quiet` on, `seconds` of it go on the stream first, as a
    device shared with a long kernel. (The first update builds what the copies keep on
    the device, later ones reuse it: each finds the device busy at a different step.)"""

    def __init__(self, targets, seconds: float, quiet: int = 2):
        self.targets, self.seconds, self.quiet = targets, seconds, quiet

    def __getattr__(self, name: str):
        return getattr(self.targets, name)

    def begin_update(self) -> None:
        self.targets.begin_update()
        if self.quiet:
            self.quiet -= 1
        else:
            torch.cuda._sleep(int(self.seconds * 2e9))  # cycles: at most 2 GHz, so at least `seconds`
            # where this host is a sixth of the way into that work (stderr): waiting, with a
            # deadline, for its copies to run, unless something else blocked it on the device
            faulthandler.dump_traceback_later(self.seconds / 6, exit=False)


def corrupt_next_bucket() -> None:
    """Flip one byte of the next bucket this process receives, before its checksum is
    checked: before the check that precedes the copy, or, where the copy computes the
    checksum (CUDA), before that copy."""
    from shardsync.runtime.wire import checksum
    from shardsync.runtime.wire.bucket_copier import BucketCopier

    original_check, original_unpack = checksum.check, BucketCopier.unpack

    def flip(buffer, numel: int) -> None:
        checksum.check, BucketCopier.unpack = original_check, original_unpack
        buffer[:numel].view(torch.uint8)[numel // 2] ^= 0x10

    def check(buffer, numel):
        flip(buffer, numel)
        return original_check(buffer, numel)

    def unpack(self, key, bucket, buffer, targets, gate=None):
        if self.fuses_checksums:
            flip(buffer, bucket.numel)
        return original_unpack(self, key, bucket, buffer, targets, gate)

    checksum.check, BucketCopier.unpack = check, unpack


def slow_to_read_outcome(seconds: float, update: int | None = None) -> None:
    """Make this process wait `seconds` between posting its own outcome of `update` (every
    update when None) and reading everyone else's (or, where its own was the last
    and decided the round, saying it is through), as an endpoint on a loaded host may:
    the others, the store's host among them, have heard every outcome by then and may
    have closed."""
    from shardsync.runtime.session.rendezvous import Session

    original = Session._post

    def _post(self, stage, number, *args, **kwargs):
        decided = original(self, stage, number, *args, **kwargs)
        if stage.startswith("done") and update in (None, number):
            time.sleep(seconds)
        return decided

    Session._post = _post
