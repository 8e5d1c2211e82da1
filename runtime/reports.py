"""What an update reports: per channel, per update, and what a method hands its endpoint.

Plain frozen records, so that results travel as values between a method, its endpoint
and the caller instead of through shared lists.
"""

from __future__ import annotations

from dataclasses import dataclass


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
