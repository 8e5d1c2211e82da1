"""The bucket pipe over buffers shared on one host or GPU: no byte crosses a socket.

The same calls as `wire.pipe` (header, put / drain, buckets, acknowledge), so a
method walks its channels the same way over either. What differs is where a bucket
lives and what says it may be read or rewritten:

- a producer packs each bucket straight into one of its own slots (two, or one
  without overlap, shared by all of its channels, as the pipe's two buffers are), and
  its consumers read the slot where it lies: they hold no buffer of their own;
- or, with as many slots as an update has buckets, the producer packs the whole update
  before the vote (`pack_ahead`), and the vote is the announcement: where each bucket
  lies follows from the plan (slot k holds the k-th bucket of the producer's walk), so
  its consumers read every slot as soon as the vote is in, with no header and no
  signal a bucket, and release them all with the closing acknowledgement. No byte is
  read before the vote, and the packs can do the NaN/Inf check on their way;
- per bucket, member 0 of the channel's signal group broadcasts "bucket k of update u
  is in slot s" once the slot is written, and every reader sends member 0 a release
  once it finished reading (a gather, so member 0 hears each reader directly); a slot is written again only after the
  release of the bucket it last held, so a buffer is never rewritten before its
  readers are done. Both are collectives of a small gloo group with a timeout, whose
  waits name the channel, the peer and the update;
- on CUDA the host never waits on the device for that: the producer records a
  "written" interprocess event on its stream after packing, each consumer's stream
  waits on it before reading and records its own "read" event after, and the
  producer's stream waits on every reader's "read" event before it writes the slot
  again (a wait is queued only where the host does not already see the event done);
- a consumer's host queues the reads of at most `LEAD` buckets ahead of its device,
  waiting (with the timeout) for the reads of bucket k - LEAD before it queues bucket
  k's: a stream that stalls (busy, or waiting on a producer that stopped) would
  otherwise take queued work until CUDA's queue is full, and then block the host in
  whatever call queues the next, without a deadline;
- with `verify`, a consumer checks the bucket's checksum before reading it and checks
  the slot again after: a slot rewritten while it was read is reported as corrupted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from shardsync.runtime.device_wait import copies_not_run, event_done_within
from shardsync.runtime.errors import TransferError
from shardsync.runtime.wire import checksum
from shardsync.runtime.wire.pipe import BucketPipe, Inbound, Link, Outbound, Sending, fill
from shardsync.runtime.wire.shared import Slots

LEAD = 8  # buckets whose reads a consumer's host queues ahead of its device


class SignalLink(Link, Protocol):
    """What the shared pipe needs of a channel beyond the pipe's `Link`: member 0
    hearing from every member directly (`wire.channels.Group` has it)."""

    def gather_at_source(self, tensor: torch.Tensor): ...


@dataclass
class _Occupant:
    """The bucket a producer's slot holds until its readers release it."""

    group: SignalLink
    signal: torch.Tensor  # kept alive until its broadcast completed
    ready: object  # the "bucket k is in slot s" broadcast
    release: object  # the readers' release exchange
    what: str
    update: int


class SharedPipe(BucketPipe):
    """One endpoint's slots (a producer's own), the slots it maps (a consumer's, one set
    per channel), and, on CUDA, the events that order access to them."""

    def __init__(self, largest: int, dtype: torch.dtype, device: torch.device, *, verify: bool, overlap: bool,
                 slots: int = 0):
        """`slots`: a producer's slot count where it packs whole updates ahead (one a
        bucket of its update), else 0: two, or one without `overlap`."""
        self.tail = checksum.tail_elements(dtype) if verify else 0
        self.packs_ahead = slots > 0
        self.depth = slots or (2 if overlap else 1)
        self.device = device
        self.dtype = dtype
        self.slot_numel = largest + self.tail if largest else 0
        self.buffers = []  # the pipe's own buffers: none, buckets live in shared slots
        self.own: Slots | None = None  # a producer's slots
        self.mapped: dict[str, Slots] = {}  # a consumer's view of each channel's producer slots
        self.read_events: dict[str, tuple] = {}  # CUDA: per channel, per member 1..K, per slot, opened at connect
        self.own_read_events: dict[str, tuple] = {}  # CUDA: a consumer's own "read" events per channel and slot
        # a consumer's, per channel whose producer packs ahead: the slot of each of the channel's buckets, in
        # the order it reads them (set at connect)
        self.announced_by_vote: dict[str, list[int]] = {}
        # CUDA: a consumer's reads of its last LEAD buckets over all of its channels, in a ring: (the event
        # recorded after them, the bucket, its producer)
        self.lead: list[tuple[torch.cuda.Event, str, str] | None] = [None] * LEAD
        self._occupants: list[_Occupant | None] = [None] * self.depth
        self._read_by: list[str | None] = [None] * self.depth  # the channel whose readers read each slot last
        self._next = 0
        self._packed_ahead: tuple[int, int] | None = None  # (update, buckets) packed in slots 0, 1, ... before its vote

    @property
    def nbytes(self) -> int:
        return self.own.nbytes if self.own is not None else 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def forget(self) -> None:
        """Drop the slots' state and every mapping (at close, before a reconnect)."""
        self._occupants = [None] * self.depth
        self._read_by = [None] * self.depth
        self._next = 0
        self._packed_ahead = None
        self.announced_by_vote.clear()
        for slots in self.mapped.values():
            slots.close()
        self.mapped.clear()
        self.read_events.clear()
        self.own_read_events.clear()
        if self.own is not None:
            self.own.close()
            self.own = None

    def outbound(self, update: int) -> "Outbound":
        # every update takes the slots in the same order from slot 0, so a bucket lies in
        # the same slot at every update: the copies of each bucket keep their addresses
        # (descriptors built once, graphs replayed) on both ends
        self._next = 0
        ahead, self._packed_ahead = self._packed_ahead, None
        if self.packs_ahead and (ahead is None or ahead[0] != update):
            raise TransferError(f"update {update} was not packed ahead of its vote, and this producer's readers "
                                f"read its buckets where the vote says the packs put them")
        return SharedOutbound(self, update, ahead[1] if self.packs_ahead else 0)

    def inbound(self, update: int) -> "Inbound":
        return SharedInbound(self, update)

    # -- the producer's slots -----------------------------------------------------------

    def take_slot(self) -> int:
        """The next slot to write, once the readers of the bucket it holds are done."""
        slot = self._next % self.depth
        self._next += 1
        self._free(slot)
        return slot

    def _free(self, slot: int) -> None:
        """Wait until the readers of the bucket `slot` holds are done with it (on CUDA, order
        this rank's stream after their reads)."""
        occupant, self._occupants[slot] = self._occupants[slot], None
        if occupant is not None:
            group = occupant.group
            group.wait(occupant.ready, f"announcing {occupant.what}", occupant.update)
            group.wait(occupant.release, f"waiting for the readers to release {occupant.what}", occupant.update)
        # (a slot packed ahead was released on the host by its update's closing acknowledgement)
        reader, self._read_by[slot] = self._read_by[slot], None
        if self.cuda and reader is not None:
            stream = torch.cuda.current_stream(self.device)
            for per_slot in self.read_events[reader]:
                _wait_on_device(stream, per_slot[slot])

    def occupy(self, slot: int, channel: str, occupant: _Occupant | None = None) -> None:
        """`slot` is read by `channel`'s readers; `occupant`: what to wait for on the host
        before writing it again (None for a slot announced by the vote)."""
        self._occupants[slot] = occupant
        self._read_by[slot] = channel

    def write(self, slot: int, bucket, pack) -> None:
        """Pack `bucket` into `slot` (with its checksum's tail) and, on CUDA, record that it was written."""
        fill(self.own[slot], bucket, pack, self.tail)
        if self.cuda:
            self.own.ready_events[slot].record(torch.cuda.current_stream(self.device))

    def pack_ahead(self, update: int, buckets) -> None:
        """Pack every bucket of `update` before its vote: `buckets`, (bucket, pack) in the
        producer's walk order, the order its readers expect them in, into slots 0, 1, ...,
        each once the readers of the bucket it held last are done. The vote announces them;
        a later update packs them again (a refused one was never sent, so never read).

        Launched largest first: the first launch comes after the host's checks, and
        while it runs the host prepares the next; a small bucket first (a walk often
        starts with a sliver of the embedding) would leave the device idle for that."""
        self._packed_ahead = None
        buckets = list(buckets)
        if len(buckets) > self.depth:
            raise ValueError(f"update {update}: {len(buckets)} buckets, more than the {self.depth} slots that hold "
                             f"an update")
        self._next = len(buckets)
        for slot in sorted(range(len(buckets)), key=lambda slot: -buckets[slot][0].numel):
            self._free(slot)
            self.write(slot, *buckets[slot])
        self._packed_ahead = (update, len(buckets))


def _wait_on_device(stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
    """Order `stream` after another process's `event`, unless the host already sees it
    done: packed ahead, every "written" event is done before the vote and every "read"
    event before the next update's packs, and on a GPU shared by several processes a
    wait on another's event takes a turn on the device the update would wait for. (The
    other process records the event again only after this one's next step: no record
    can slip between the look and the skip.)"""
    if not event.query():
        stream.wait_event(event)


class SharedOutbound(Outbound):
    def __init__(self, pipe: SharedPipe, update: int, ahead: int):
        super().__init__(pipe, update)
        self.ahead = ahead  # buckets packed before the vote, in slots 0, 1, ... in the order they are sent
        self.sent = 0  # of those, the buckets the sends have passed

    def header(self, group: SignalLink, buckets: int) -> None:
        if not self.ahead:  # (else the vote was the header)
            super().header(group, buckets)

    def sending(self, group: SignalLink, where: str = "") -> "SharedSending":
        return SharedSending(self, group, where)

    def packed_slot(self, what: str) -> int:
        """The slot the next bucket was packed into ahead of the vote."""
        if self.sent == self.ahead:
            raise TransferError(f"update {self.update}: {what} was not among the {self.ahead} buckets packed ahead")
        self.sent += 1
        return self.sent - 1


class SharedSending(Sending):
    def put(self, bucket, pack) -> None:
        """Pack `bucket` into the next free slot, then say where it lies; packed ahead, its
        readers already know (the vote told them), so only note who reads the slot."""
        outbound = self.outbound
        pipe, update = outbound.pipe, outbound.update
        if outbound.ahead:
            pipe.occupy(outbound.packed_slot(f"bucket {self.index}{self.where}"), self.group.name)
            self.index += 1
            return
        slot = pipe.take_slot()
        pipe.write(slot, bucket, pack)
        signal = torch.tensor([update, self.index, slot], dtype=torch.int64)
        ready = self.group.broadcast(signal)
        release = self.group.gather_at_source(torch.zeros(1, dtype=torch.int64))
        pipe.occupy(slot, self.group.name, _Occupant(self.group, signal, ready, release,
                                                     f"bucket {self.index}{self.where}", update))
        self.index += 1

    def drain(self) -> None:
        """Nothing to wait for here: the next writer of each slot waits for its readers."""


class SharedInbound(Inbound):
    def __init__(self, pipe: SharedPipe, update: int):
        super().__init__(pipe, update)
        self._releases: dict[str, list] = {}
        self._queued = 0  # buckets whose reads this update queued, over every channel
        self._read_ahead: dict[str, int] = {}  # per channel announced by the vote: its buckets read so far

    def header(self, group: SignalLink, buckets: int) -> None:
        if group.name not in self.pipe.announced_by_vote:  # (else the vote was the header)
            super().header(group, buckets)

    def buckets(self, group: SignalLink, buckets, where: str = "", check: bool = True):
        """Yield (index, bucket, slot, intact) as each bucket is announced; the slot is
        released once the caller asks for the next bucket (or the walk ends). With
        `check`, the checksum is checked before the caller reads the slot and again
        after, against the sums read first: a slot written again too early fails it."""
        pipe, update = self.pipe, self.update
        slots = pipe.mapped[group.name]
        releases = self._releases.setdefault(group.name, [])
        by_vote = pipe.announced_by_vote.get(group.name)
        for index, bucket in enumerate(buckets):
            slot = self._slot_by_vote(group, by_vote) if by_vote is not None else self._announced(group, index, where)
            buffer = slots[slot]
            if pipe.cuda:
                self._keep_lead(group)
                _wait_on_device(torch.cuda.current_stream(pipe.device), slots.ready_events[slot])
            checking = pipe.tail and check
            sums = checksum.sent(buffer, bucket.numel) if checking else None
            intact = self.arrived_intact(group, buffer, bucket, f"bucket {index}{where}") if check else True
            yield index, bucket, buffer, intact
            if checking and intact and not checksum.matches(buffer, bucket.numel, sums):
                self.flag(group, f"bucket {index}{where} changed while it was read: its slot was written again "
                                 f"before this rank released it, so what was written from it is wrong")
            if pipe.cuda:
                stream = torch.cuda.current_stream(pipe.device)
                pipe.own_read_events[group.name][slot].record(stream)
                self._queued_reads(stream, f"channel {group.name}'s bucket {index}{where} (update {update})",
                                   group.peers[0])
            if by_vote is None:  # (else the closing acknowledgement releases them all)
                releases.append((index, group.gather_at_source(torch.zeros(1, dtype=torch.int64))))

    def _announced(self, group: SignalLink, index: int, where: str) -> int:
        """The slot the producer says bucket `index` lies in, once it is written."""
        signal = torch.zeros(3, dtype=torch.int64)
        group.wait(group.broadcast(signal), f"waiting for bucket {index}{where}", self.update)
        announced_update, announced_index, slot = signal.tolist()
        slots = self.pipe.mapped[group.name].count
        if (announced_update, announced_index) != (self.update, index) or not 0 <= slot < slots:
            raise TransferError(f"update {self.update}: channel {group.name}: the producer announced bucket "
                                f"{announced_index} of update {announced_update} in slot {slot}; expected "
                                f"bucket {index}{where} of update {self.update}")
        return slot

    def _slot_by_vote(self, group: SignalLink, slots: list[int]) -> int:
        """The slot of the channel's next bucket, packed ahead (the vote said it was written)."""
        taken = self._read_ahead.get(group.name, 0)
        if taken == len(slots):
            raise TransferError(f"update {self.update}: channel {group.name}: more buckets than the {len(slots)} "
                                f"its producer packs ahead")
        self._read_ahead[group.name] = taken + 1
        return slots[taken]

    def _keep_lead(self, group: SignalLink) -> None:
        """Before queuing another bucket's reads: those of the bucket LEAD before it ran."""
        earlier = self.pipe.lead[self._queued % LEAD]
        if earlier is None:
            return
        event, what, producer = earlier
        if not event_done_within(event, group.timeout):
            raise TransferError(f"update {self.update}: channel {group.name}: "
                                + copies_not_run(f"the copies of {what}", group.timeout, producer))

    def _queued_reads(self, stream: torch.cuda.Stream, what: str, producer: str) -> None:
        entry = self.pipe.lead[self._queued % LEAD]
        event = entry[0] if entry is not None else torch.cuda.Event()
        event.record(stream)
        self.pipe.lead[self._queued % LEAD] = (event, what, producer)
        self._queued += 1

    def close(self, group: SignalLink) -> None:
        for index, release in self._releases.pop(group.name, []):
            group.wait(release, f"releasing bucket {index}", self.update)
        super().close(group)
