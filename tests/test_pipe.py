"""The bucket pipe alone, in one process: a fake link stands in for a group.

The sender runs to completion first (its broadcasts are queued), then the receiver
takes them in order; the closing acknowledgement is the max of what both offer.
What is checked: buckets arrive in order through two alternating buffers, the
header refuses a different update, and a bucket that fails its checksum is flagged
here and reported to the sender by the acknowledgement; over shared slots, an update
packed ahead of its vote is announced by the vote alone and not packed again.
"""

from __future__ import annotations

from collections import deque

import pytest
import torch

from shardsync.runtime.errors import TransferError
from shardsync.runtime.plan import Copy
from shardsync.runtime.plan.buckets import schedule
from shardsync.runtime.wire import checksum, shared
from shardsync.runtime.wire.pack import pack, unpack
from shardsync.runtime.wire.pipe import BucketPipe
from shardsync.runtime.wire.shared_pipe import SharedPipe
from shardsync.runtime.targets import TensorTargets


class _Done:
    def __init__(self, then=lambda: None):
        self.then = then

    def wait(self, timeout=None):
        self.then()


class FakeLink:
    """Member `rank` of a two-member channel whose messages go through `wire`."""

    def __init__(self, rank: int, wire: deque, acks: dict):
        self.name, self.rank, self.peers, self.timeout = "fake", rank, ("sender", "receiver"), 5.0
        self.wire, self.acks = wire, acks

    def broadcast(self, tensor):
        if self.rank == 0:
            self.wire.append(tensor.clone())
            return _Done()
        return _Done(lambda: tensor.copy_(self.wire.popleft()))

    def wait(self, work, what, update):
        work.wait()

    def send_header(self, update, buckets):
        self.wire.append(torch.tensor([update, buckets]))

    def receive_header(self, update, buckets):
        if self.wire.popleft().tolist() != [update, buckets]:
            raise TransferError(f"update {update}: channel {self.name}: header differs")

    def acknowledge(self, problem, what, update):
        self.acks[self.rank] = problem
        return max(self.acks.values())


def _setup(verify: bool):
    copies = [Copy(f"s{i}", ((0, 3), (0, 4)), f"d{i}", ((0, 3), (0, 4)), f"h{i}") for i in range(5)]
    buckets = schedule(copies, 10)
    gen = torch.Generator().manual_seed(0)
    sources = {c.src_tensor: torch.randn(3, 4, generator=gen) for c in copies}
    dests = {c.dst_tensor: torch.zeros(3, 4) for c in copies}
    largest = max(b.numel for b in buckets)
    pipes = [BucketPipe(largest, torch.float32, torch.device("cpu"), verify=verify, overlap=True) for _ in range(2)]
    wire, acks = deque(), {}
    return buckets, sources, dests, pipes, FakeLink(0, wire, acks), FakeLink(1, wire, acks)


def _send(pipe, link, buckets, sources, update=1):
    outbound = pipe.outbound(update)
    outbound.header(link, len(buckets))
    sending = outbound.sending(link)
    for bucket in buckets:
        sending.put(bucket, _packer(bucket, sources))
    sending.drain()
    return outbound


def test_buckets_arrive_in_order_through_two_alternating_buffers():
    buckets, sources, dests, (out_pipe, in_pipe), sender, receiver = _setup(verify=True)
    outbound = _send(out_pipe, sender, buckets, sources)
    inbound = in_pipe.inbound(1)
    inbound.header(receiver, len(buckets))
    seen = []
    for index, bucket, buffer, intact in inbound.buckets(receiver, buckets):
        assert intact and buffer.data_ptr() == in_pipe.buffers[index % 2].data_ptr()
        unpack(bucket, buffer, TensorTargets(dests))
        seen.append(index)
    inbound.close(receiver)
    outbound.close(sender)
    outbound.check()
    assert seen == list(range(len(buckets))) and inbound.corrupted == [] and inbound.elsewhere == []
    assert all(torch.equal(dests[f"d{i}"], sources[f"s{i}"]) for i in range(5))
    assert out_pipe.nbytes == 2 * (max(b.numel for b in buckets) + checksum.tail_elements(torch.float32)) * 4


def test_a_bucket_that_fails_its_checksum_is_flagged_and_reported_to_the_sender():
    buckets, sources, _, (out_pipe, in_pipe), sender, receiver = _setup(verify=True)
    outbound = _send(out_pipe, sender, buckets, sources)
    sender.wire[2].view(torch.uint8)[5] ^= 0x10  # bucket 1 (after the header and bucket 0)
    inbound = in_pipe.inbound(1)
    inbound.header(receiver, len(buckets))
    intact = [ok for _, _, _, ok in inbound.buckets(receiver, buckets, " of phase 0")]
    inbound.close(receiver)
    outbound.close(sender)
    assert intact == [i != 1 for i in range(len(buckets))]
    assert len(inbound.corrupted) == 1 and inbound.corrupted[0].startswith(
        "channel fake: bucket 1 of phase 0 failed its checksum")
    with pytest.raises(TransferError, match="update 1: channel fake: receiver received a bucket that failed"):
        outbound.check()


def test_a_header_for_another_update_is_refused():
    buckets, sources, _, (out_pipe, in_pipe), sender, receiver = _setup(verify=False)
    _send(out_pipe, sender, buckets, sources, update=2)
    with pytest.raises(TransferError, match="update 1: channel fake"):
        in_pipe.inbound(1).header(receiver, len(buckets))


def _packer(bucket, sources):
    """A pack that returns no checksum sums: the pipe computes them."""
    def packed(buffer):
        pack(bucket, sources, buffer)

    return packed


class _SignalLink(FakeLink):
    """A producer's side of a colocated channel: what it announces, and readers that
    released every bucket at once."""

    def __init__(self):
        super().__init__(0, deque(), {})
        self.announced: list[list[int]] = []

    def broadcast(self, tensor):
        self.announced.append(tensor.tolist())  # (update, bucket, slot)
        return _Done()

    def gather_at_source(self, tensor):
        return _Done()


def test_an_update_packed_ahead_is_announced_by_its_vote_and_read_where_the_plan_puts_it():
    """Packed ahead, every bucket of update 1 lies in a slot of its own, and after the
    vote neither end signals anything: no header, no announcement, no release a bucket;
    the reader takes each bucket from the slot it was told at connect, the bytes the
    trainer packed. Update 2, refused at its vote after it was packed, is never sent;
    an update that was not packed ahead cannot be sent (its readers would read the
    slots regardless), and a bucket beyond those the producer packs is refused."""
    buckets, sources, dests, _, _, _ = _setup(verify=True)
    largest = max(b.numel for b in buckets)
    pipe = SharedPipe(largest, torch.float32, torch.device("cpu"), verify=True, overlap=True, slots=len(buckets))
    pipe.own = shared.create_slots(pipe.slot_numel, pipe.depth, torch.float32, torch.device("cpu"))
    reader = SharedPipe(largest, torch.float32, torch.device("cpu"), verify=True, overlap=True)
    link = _SignalLink()
    reader.mapped[link.name] = pipe.own  # (the same process: the producer's slots as a reader maps them)
    reader.announced_by_vote[link.name] = list(range(len(buckets)))
    try:
        pipe.pack_ahead(1, [(bucket, _packer(bucket, sources)) for bucket in buckets])
        expected = torch.zeros(largest + checksum.tail_elements(torch.float32))
        for slot, bucket in enumerate(buckets):
            expected.zero_()
            pack(bucket, sources, expected)
            checksum.write(expected, bucket.numel)
            assert torch.equal(pipe.own[slot][:bucket.numel + 4], expected[:bucket.numel + 4]), slot

        outbound = pipe.outbound(1)
        outbound.header(link, len(buckets))
        sending = outbound.sending(link)
        for bucket in buckets:
            sending.put(bucket, _failing)
        assert link.announced == [] and not link.wire  # no header, no bucket announced
        inbound = reader.inbound(1)
        inbound.header(link, len(buckets))  # (a header on the wire would be taken here: there is none)
        read = []
        for index, bucket, buffer, intact in inbound.buckets(link, buckets):
            unpack(bucket, buffer, TensorTargets(dests))
            read.append((index, buffer.data_ptr(), intact))
        assert read == [(i, pipe.own[i].data_ptr(), True) for i in range(len(buckets))]
        assert all(torch.equal(dests[f"d{i}"], sources[f"s{i}"]) for i in range(5))
        with pytest.raises(TransferError, match=f"more buckets than the {len(buckets)} its producer packs ahead"):
            list(inbound.buckets(link, buckets[:1]))

        pipe.pack_ahead(2, [(bucket, _packer(bucket, sources)) for bucket in buckets])  # refused at its vote
        with pytest.raises(TransferError, match="update 3 was not packed ahead of its vote"):
            pipe.outbound(3)
        with pytest.raises(ValueError, match=f"{2 * len(buckets)} buckets, more than the {len(buckets)} slots"):
            pipe.pack_ahead(4, [(bucket, _packer(bucket, sources)) for bucket in buckets * 2])
    finally:
        reader.mapped.clear()
        pipe.forget()


def _failing(buffer):
    raise AssertionError("packed again")
