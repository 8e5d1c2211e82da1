"""The bucket pipe: the one double-buffered send / receive / acknowledge loop.

Every method moves its buckets through it, over any `Link`: a gloo/NCCL `Group`
today, whatever a method without sockets offers tomorrow (buffers shared on one
host, with the same calls):

- a header first (update number, bucket count), so that a receiver refuses a
  sender that is an update ahead or planned differently;
- two buffers: bucket k+1 is packed while bucket k is on the wire, and a buffer is
  packed again only once its previous bucket was sent (with `overlap=False`, one
  bucket at a time);
- with `verify`, a checksum in a tail after each bucket's data (computed by the pack
  where it can, on CUDA inside the copy kernel), checked on arrival or, where the
  unpack computes it while copying, right after;
- a closing acknowledgement: every member offers 0, or 1 + its rank if one of its
  buckets failed its checksum, so that the sender and every other receiver learn
  who got a bad bucket.

The pipe decides nothing about what a bucket holds: packing and unpacking are the
caller's, which is what lets the shard and gather methods share it.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

import torch

from shardsync.runtime.device_wait import copies_not_run, stream_done_within
from shardsync.runtime.errors import TransferError
from shardsync.runtime.plan.buckets import Bucket
from shardsync.runtime.wire import checksum


class Link(Protocol):
    """What the pipe needs of a channel (`wire.channels.Group` has it): member 0 is
    the sender; every wait fails naming the channel, the peer and the update."""

    name: str
    rank: int
    peers: tuple[str, ...]
    timeout: float

    def broadcast(self, tensor: torch.Tensor): ...

    def wait(self, work, what: str, update: int | None) -> None: ...

    def send_header(self, update: int, buckets: int) -> None: ...

    def receive_header(self, update: int, buckets: int) -> None: ...

    def acknowledge(self, problem: int, what: str, update: int) -> int: ...


class BucketPipe:
    """Two buffers for the largest bucket (plus the checksum tail), shared by all of an
    endpoint's channels: it serves them one at a time."""

    def __init__(self, largest: int, dtype: torch.dtype, device: torch.device, *, verify: bool, overlap: bool):
        self.tail = checksum.tail_elements(dtype) if verify else 0  # buffer elements after each bucket's data
        self.depth = 2 if overlap else 1
        self.device = device
        self.buffers = [torch.empty(largest + self.tail, dtype=dtype, device=device) for _ in range(2)] if largest \
            else []

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def outbound(self, update: int) -> "Outbound":
        return Outbound(self, update)

    def inbound(self, update: int) -> "Inbound":
        return Inbound(self, update)


class Outbound:
    """One update's sending side; `problems` collects what the acknowledgements reported."""

    def __init__(self, pipe: BucketPipe, update: int):
        self.pipe, self.update = pipe, update
        self.problems: list[str] = []

    def header(self, group: Link, buckets: int) -> None:
        group.send_header(self.update, buckets)

    def sending(self, group: Link, where: str = "") -> "Sending":
        """A run of buckets on `group`; `where` ends the wait messages (" of phase 3")."""
        return Sending(self, group, where)

    def close(self, group: Link) -> None:
        """A send completes once the bytes are on the socket: only the receivers'
        acknowledgement says they arrived, passed their checksums and were written."""
        problem = group.acknowledge(0, "waiting for the receivers' acknowledgement", self.update)
        if problem:
            self.problems.append(f"channel {group.name}: {group.peers[problem - 1]} received a bucket that failed "
                                 f"its checksum")

    def check(self) -> None:
        if self.problems:
            raise TransferError(f"update {self.update}: {'; '.join(self.problems)}")


class Sending:
    def __init__(self, outbound: Outbound, group: Link, where: str):
        self.outbound, self.group, self.where = outbound, group, where
        self.in_flight: list = []
        self.index = 0

    def put(self, bucket: Bucket, pack: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """Pack `bucket` (`pack(buffer)` fills `buffer[:bucket.numel]` and returns the
        bucket's checksum if it wrote the tail on the way, else None) and put it on the
        wire, first waiting for the bucket that last used the buffer."""
        pipe, update = self.outbound.pipe, self.outbound.update
        if len(self.in_flight) == pipe.depth:  # the buffer about to be packed is still on the wire
            self.group.wait(self.in_flight.pop(0), f"sending bucket {self.index - pipe.depth}{self.where}", update)
        buffer = pipe.buffers[self.index % 2]
        fill(buffer, bucket, pack, pipe.tail)
        wire = buffer[:bucket.numel + pipe.tail]
        self.in_flight.append(self.group.broadcast(wire))
        self.index += 1

    def drain(self) -> None:
        for work in self.in_flight:
            self.group.wait(work, f"sending the last buckets{self.where}", self.outbound.update)
        self.in_flight.clear()


def fill(buffer: torch.Tensor, bucket: Bucket, pack: Callable[[torch.Tensor], torch.Tensor | None], tail: int) -> None:
    """Pack into `buffer`, then write the checksum's tail (`tail` elements) where the copy
    did not write it on its way."""
    if pack(buffer) is None and tail:
        checksum.write(buffer, bucket.numel)


class Inbound:
    """One update's receiving side: which buckets failed their checksum here
    (`corrupted`), and which other members reported one (`elsewhere`)."""

    def __init__(self, pipe: BucketPipe, update: int):
        self.pipe, self.update = pipe, update
        self.corrupted: list[str] = []
        self.elsewhere: list[str] = []
        self._bad: set[str] = set()  # channels with a bad bucket this update

    def header(self, group: Link, buckets: int) -> None:
        group.receive_header(self.update, buckets)

    def buckets(self, group: Link, buckets, where: str = "",
                check: bool = True) -> Iterator[tuple[int, Bucket, torch.Tensor, bool]]:
        """Yield (index, bucket, buffer, intact) as each bucket arrives (with `check`
        False, no checksum is checked here: the caller's copy checks it). The buffer is
        posted for bucket index + 2 only once the caller asks for the next one, so the
        caller may use it (unpack, assemble, hand a tensor on) until then."""
        pipe, update = self.pipe, self.update
        size = [bucket.numel + pipe.tail for bucket in buckets]
        posted = [group.broadcast(pipe.buffers[i][:size[i]]) for i in range(min(2, len(buckets)))]
        for index, bucket in enumerate(buckets):
            group.wait(posted[index], f"receiving bucket {index}{where}", update)
            buffer = pipe.buffers[index % 2]
            intact = self.arrived_intact(group, buffer, bucket, f"bucket {index}{where}") if check else True
            yield index, bucket, buffer, intact
            if index + 2 < len(buckets):
                posted.append(group.broadcast(buffer[:size[index + 2]]))

    def deliver(self, group: Link, buckets, where: str, unpack, fused: bool) -> None:
        """Unpack every bucket as it arrives (`unpack(index, bucket, buffer)` returns the
        sums it computed while copying beside the tail's, or None): checked before the copy,
        and a bucket that fails is not written; or, where the copy computed the sums
        (`fused`), compared after it, the bucket then written and flagged."""
        compared = []  # (index, [computed, sent]): on the device, compared once the run is through
        for index, bucket, buffer, intact in self.buckets(group, buckets, where, check=not fused):
            if not intact:
                continue
            sums = unpack(index, bucket, buffer)
            if fused and self.pipe.tail and sums is not None:
                compared.append((index, sums))
        if compared:  # one wait for the device, not one a bucket
            self._wait_for_copies(group, where)
            pairs = torch.stack([sums for _, sums in compared]).tolist()
            for (index, _), (sums, sent) in zip(compared, pairs):
                if sent != sums:
                    self.flag(group, f"bucket {index}{where} failed its checksum (sent {sent}, computed {sums}) in "
                                     f"the copy that wrote it")

    def _wait_for_copies(self, group: Link, where: str) -> None:
        """Before reading the sums the copies computed: bounded, as the copies wait on
        the sender's writes (an interprocess event, or the channel's collective)."""
        device = self.pipe.device
        if device.type == "cuda" and not stream_done_within(torch.cuda.current_stream(device), group.timeout):
            raise TransferError(f"update {self.update}: channel {group.name}: "
                                + copies_not_run(f"the copies of its buckets{where}", group.timeout, group.peers[0])
                                + "; their checksums could not be read")

    def arrived_intact(self, group: Link, buffer: torch.Tensor, bucket: Bucket, what: str) -> bool:
        """Whether `buffer` holds `bucket` as its sender summed it (always, without
        `verify`); a bucket that does not is flagged."""
        mismatch = checksum.check(buffer, bucket.numel) if self.pipe.tail else None
        if mismatch is not None:
            self.flag(group, f"{what} failed its checksum (sent {mismatch[0]}, computed {mismatch[1]})")
        return mismatch is None

    def flag(self, group: Link, problem: str) -> None:
        """Record a bad bucket of `group`'s: the update fails, and the acknowledgement says so."""
        self._bad.add(group.name)
        self.corrupted.append(f"channel {group.name}: {problem}")

    def close(self, group: Link) -> None:
        mine = 1 + group.rank if group.name in self._bad else 0
        problem = group.acknowledge(mine, "acknowledging", self.update)
        if problem and problem != mine:
            self.elsewhere.append(f"channel {group.name}: {group.peers[problem - 1]} received a bucket that failed "
                                  f"its checksum")
