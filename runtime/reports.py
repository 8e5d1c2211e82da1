"""What an update reports: per channel, per update, and what a method hands its endpoint.

Plain frozen records, so that results travel as values between a method, its endpoint
and the caller instead of through shared lists.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class ChannelReport:
    """One channel's share of an update: copies (or tensors) carried, bytes, time spent."""

    name: str
    copies: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class UpdateReport:
    update: int
    channels: tuple[ChannelReport, ...]
    # seconds this endpoint spent in each phase of the update, in order: "checks" (its
    # tensors), "vote" (until every endpoint's vote was in), "transfer" (its channels'
    # walk), "outcome" (until every endpoint's outcome was in): where an update's time goes
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.channels)


@dataclass(frozen=True)
class Receipt:
    """What a method's receiving side saw of one update, for its endpoint to judge.

    The method moves the bytes and reports; the endpoint decides whether the update
    failed here, failed elsewhere, or completed (and whether the rank is stale).
    """

    channels: tuple[ChannelReport, ...]
    corrupted: tuple[str, ...] = ()  # buckets that failed their checksum at this rank
    elsewhere: tuple[str, ...] = ()  # ... at another member of one of this rank's channels
    unloaded: tuple[str, ...] = ()  # full tensors the engine's own loader did not take
    # where a gate on the device held this rank's copies (`wire.device_gate`): asked once they ran, whether it
    # was closed (they wrote nothing), and the ranks whose packs it waited for
    gated_off: Callable[[], bool] | None = None
    waits_on: tuple[str, ...] = ()


class PhaseClock:
    """Times the phases of one update as an endpoint passes through them."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        """The phase is also a range in a profiler's trace, where one records (`bench --trace`);
        with none recording, no range is opened (a range is a dispatched op at each end,
        host time between the device's phases)."""
        started = time.perf_counter()
        try:
            if torch.autograd._profiler_enabled():
                with torch.profiler.record_function(f"shardsync {name}"):
                    yield
            else:
                yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
