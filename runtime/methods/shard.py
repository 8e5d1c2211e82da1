"""The shard method: peer to peer, each trainer rank's boxes straight to the engines.

One persistent group per plan channel (a source rank and the engine ranks it
feeds); each channel's copies are bucketed in phase order (embedding, layer 0,
layer 1, ..., head) and packed from views of the trainer's tensors, so no whole
tensor is ever held. Receivers write each piece into the live tensor by box.
"""

from __future__ import annotations

import time
from typing import Iterator

from shardsync.runtime.methods.base import Context, OverChannels, engine_name, trainer_name
from shardsync.runtime.plan import Channel
from shardsync.runtime.plan import buckets as bucketing
from shardsync.runtime.reports import ChannelReport, Receipt
from shardsync.runtime.wire.channels import Channels
from shardsync.runtime.wire.bucket_copier import BucketCopier
from shardsync.runtime.wire.pipe import BucketPipe


class ShardMethod(OverChannels):
    def __init__(self, context: Context):
        self.plan = context.plan
        if context.trainer is not None:
            self.mine = self.plan.channels_of_source(context.trainer.rank)
            self.member = 0  # the source of each of its channels
        else:
            engine, tp = context.engine
            self.mine = self.plan.channels_of_engine_rank(tp)
            self.member = 1 + engine  # replicas follow the source, in engine order
        self.schedules = {c.name: bucketing.phased_schedule(c.copies, context.capacity) for c in self.mine}
        largest = max((b.numel for s in self.schedules.values() for bs in s.values() for b in bs), default=0)
        self.pipe = self._pipe(largest, context)
        # one batched kernel per bucket on CUDA (checksum fused), foreach copies on the CPU
        self.copier = BucketCopier(context.device, checksums=context.verify, flagging=context.pack_ahead)
        self.wire_dtype = context.dtype
        self.channels = Channels(self.channel_device(context), context.timeout, context.channel_options)

    def _pipe(self, largest: int, context: Context) -> BucketPipe:
        """Where buckets go between pack and unpack: this endpoint's own two buffers."""
        return BucketPipe(largest, context.dtype, context.device, verify=context.verify, overlap=context.overlap)

    @staticmethod
    def channel_device(context: Context):
        """Where the channels' collectives run: the bytes' own device (NCCL for CUDA)."""
        return context.device

    @property
    def digest(self) -> str:
        return self.plan.digest

    @property
    def peak_temp_bytes(self) -> int:
        return 0  # packed from views, written by box: no whole tensor held

    def connect(self, store, watch) -> None:
        for channel in self.mine:
            peers = (trainer_name(channel.src),) + tuple(
                engine_name(e, channel.dst_tp) for e in range(channel.engines))
            self.channels.join(store, channel.name, self.member, peers, watch)
        self.load_kernels()

    def load_kernels(self) -> None:
        """The copies' kernels, loaded before the first update: an engine's tensors hold
        the wire's dtype (checked at every update), a trainer's are known only then."""
        buckets = [b for schedule in self.schedules.values() for bs in schedule.values() for b in bs]
        sending = self.member == 0
        self.copier.load_kernels(self.wire_dtype, buckets, to_bucket=sending,
                                 tensor_dtypes=None if sending else (self.wire_dtype,))

    def send(self, tensors, update: int) -> tuple[ChannelReport, ...]:
        outbound = self.pipe.outbound(update)

        def move(channel: Channel, group, phase: int, schedule) -> None:
            sending = outbound.sending(group, f" of phase {phase}")
            for index, bucket in enumerate(schedule):
                key = (channel.name, phase, index)
                sending.put(bucket, lambda buffer: self.copier.pack(key, bucket, tensors, buffer))
            sending.drain()

        reports = self._walk(outbound.header, move, outbound.close)
        outbound.check()
        return reports

    def receive(self, targets, update: int) -> Receipt:
        """Written by box as each bucket arrives; a bucket that fails its checksum is
        not written (checked first), or found in the copy that wrote it (CUDA, where the
        check runs inside the copy kernel), and the acknowledgement says so."""
        inbound = self.pipe.inbound(update)

        def move(channel: Channel, group, phase: int, schedule) -> None:
            def unpack(index, bucket, buffer):
                return self._unpack((channel.name, phase, index), bucket, buffer, targets)

            inbound.deliver(group, schedule, f" of phase {phase}", unpack, fused=self.copier.fuses_checksums)

        reports = self._walk(inbound.header, move, inbound.close)
        return Receipt(reports, tuple(inbound.corrupted), tuple(inbound.elsewhere))

    def _unpack(self, key, bucket, buffer, targets):
        return self.copier.unpack(key, bucket, buffer, targets)

    def _walk(self, header, move, finish) -> tuple[ChannelReport, ...]:
        """One update over this rank's channels: headers, then each phase on every
        channel, then acknowledgements.

        Every process walks its collectives in one global order (phase, then channel
        in plan order), which is what keeps overlapping channels from deadlocking,
        and lets an engine complete (and re-process) its layers one by one.
        """
        seconds = {c.name: 0.0 for c in self.mine}
        for channel in self.mine:
            header(self.channels[channel.name], self._bucket_count(channel))
        for channel, phase, schedule in self._runs():
            started = time.perf_counter()
            move(channel, self.channels[channel.name], phase, schedule)
            seconds[channel.name] += time.perf_counter() - started
        for channel in self.mine:
            started = time.perf_counter()
            finish(self.channels[channel.name])
            seconds[channel.name] += time.perf_counter() - started
        return tuple(ChannelReport(c.name, len(c.copies), c.numel * self.plan.dtype_bytes, seconds[c.name])
                     for c in self.mine)

    def _runs(self):
        return walk(self.mine, self.schedules)

    def _bucket_count(self, channel: Channel) -> int:
        """What the header announces: both ends derive it from the same schedule."""
        return sum(len(buckets) for buckets in self.schedules[channel.name].values())


def walk(channels: list[Channel], schedules: dict) -> Iterator[tuple[Channel, int, list]]:
    """(channel, phase, its buckets in that phase) over `channels` (their `schedules` by
    name), in the walk's order: phase by phase, every channel in plan order."""
    for phase in sorted({phase for c in channels for phase in schedules[c.name]}):
        for channel in channels:
            schedule = schedules[channel.name].get(phase)
            if schedule:
                yield channel, phase, schedule
