"""The colocated method: trainer and engines on one host or GPU share buffers, no wire.

The shard method's plan, channels and walk (headers, then phase by phase every channel
in plan order, then acknowledgements), over `wire.shared_pipe` instead of sockets:
each trainer rank packs its buckets into two slots of memory its engine ranks map
(CPU shared memory, or CUDA memory shared by IPC), and each engine rank unpacks them
from there into its live tensors. A channel keeps a small gloo group of its members
for the signals only (a bucket is in a slot; its readers released it), so every wait
has a timeout and names the channel, the peer and the update, as on the wire.

Why pack into shared slots rather than let engines copy straight from the trainer's
tensors: the trainer's tensors are not in shareable memory in general (megatron-core's
CPU parameters are private memory, and a `Sender.update` may be handed new tensors at
every update), a packed bucket is what a checksum covers, and a consumer reading one
contiguous slot is what lets a bucket be one batched copy. The cost is a second copy of
each byte, measured in bench/RESULTS.md.

With `pack_ahead`, a trainer's slots hold its whole update (one a bucket, so its memory
is its shard's, in buckets) and it packs every bucket before the vote, the NaN/Inf
check done by the packs on their way. The vote is then the announcement: bucket k of
the trainer's walk lies in slot k, which its engines work out from the plan at
connect, so they read every slot as soon as the vote is in, with no header and no
signal a bucket. On one GPU that saves the check's own pass over every byte (about
0.4 of the time the update's copies take, bench/RESULTS.md) and every hand-off between
processes after the vote, while still no engine reads a byte before it. On CUDA the
vote does not even wait for the packs: it covers what the hosts check, and the NaN/Inf
flags the packs raise close a gate on the device that every engine's copies read first
(`wire.device_gate`), so the engines' copies are queued while the packs still run and
none writes a byte of an update a trainer found a NaN or Inf in.

Everything is created or mapped at connect: the producer's slots (and on CUDA their
"written" events and its NaN/Inf flag), each consumer's mapping of the slots that feed
it (and its "read" events, which the producer opens; on CUDA, every packing-ahead
trainer's flag), counted in `mappings_created`; an update maps nothing. Engines map
only the slots of the trainer ranks that feed them.
"""

from __future__ import annotations

import pickle
from dataclasses import replace
from datetime import timedelta

import torch

from shardsync.runtime.errors import TransferError
from shardsync.runtime.methods.base import Context, PackedAhead, trainer_name
from shardsync.runtime.methods.shard import ShardMethod, walk
from shardsync.runtime.plan import buckets as bucketing
from shardsync.runtime.reports import Receipt
from shardsync.runtime.wire import shared
from shardsync.runtime.wire.device_gate import Gate, TrainerFlag
from shardsync.runtime.wire.shared_pipe import SharedPipe


class ColocatedMethod(ShardMethod):
    def __init__(self, context: Context):
        super().__init__(context)
        self.producer = context.trainer is not None
        self.timeout = context.timeout
        self.capacity = context.capacity
        self.mappings_created = 0
        # what the packs of an update packed ahead raise on a NaN/Inf: on the CPU a flag its read lowers again
        # (`FiniteCheck.read`); on CUDA a trainer's flag the engines' gates read (`wire.device_gate`), set at connect
        self._flag = torch.zeros(1, dtype=torch.int32) if self.pipe.packs_ahead and not self.pipe.cuda else None
        self._trainer_flag: TrainerFlag | None = None
        self._gate: Gate | None = None  # an engine's on CUDA, where trainers pack ahead
        self._trainers = tuple(trainer_name(src) for src in context.layout.senders)
        self.who = trainer_name(context.trainer) if self.producer else None

    def _pipe(self, largest: int, context: Context) -> SharedPipe:
        return SharedPipe(largest, context.dtype, context.device, verify=context.verify, overlap=context.overlap,
                          slots=sum(map(self._bucket_count, self.mine)) if context.pack_ahead else 0)

    def pack_ahead(self, tensors, update: int, nonfinite_allowed: bool = False, vet=None) -> PackedAhead | None:
        if not self.pipe.packs_ahead:
            return None
        gated = self._trainer_flag is not None
        flag = self._trainer_flag.flag if gated else self._flag
        # (gated: raised to the update's number; allowed, to 0, which raises nothing)
        stamp = 0 if nonfinite_allowed else update if gated else 1

        def pack(buffer, key, bucket):
            if vet is not None:
                vet(self.copier.pack_reads(key, bucket))
            return self.copier.pack(key, bucket, tensors, buffer, flag, stamp)

        def packs():
            for channel, phase, schedule in self._runs():
                for index, bucket in enumerate(schedule):
                    key = (channel.name, phase, index)
                    yield bucket, lambda buffer, key=key, bucket=bucket: pack(buffer, key, bucket)

        self.pipe.pack_ahead(update, packs())
        if not gated:
            return PackedAhead(flag)
        self._trainer_flag.packed(update)
        return PackedAhead(flag, after_vote=lambda: self._trainer_flag.raised_in(update))

    def receive(self, targets, update: int) -> Receipt:
        gate = self._gate
        if gate is None:
            return super().receive(targets, update)
        gate.set_for(update)
        receipt = super().receive(targets, update)
        gate.read_after_copies()
        return replace(receipt, gated_off=gate.was_closed, waits_on=gate.trainers)

    def _unpack(self, key, bucket, buffer, targets):
        return self.copier.unpack(key, bucket, buffer, targets, self._gate)

    @staticmethod
    def channel_device(context: Context):
        """The signals are a few integers on the host; NCCL would refuse two ranks on one GPU."""
        return torch.device("cpu")

    def connect(self, store, watch) -> None:
        pipe: SharedPipe = self.pipe
        if self.producer:
            if pipe.cuda and pipe.packs_ahead:
                self._trainer_flag = TrainerFlag(pipe.device, self.timeout)
                self.mappings_created += 1
            # every trainer says whether the engines gate on its flag (they all read it, fed or not)
            store.set(self._flag_key(self.who),
                      pickle.dumps(self._trainer_flag.handle() if self._trainer_flag is not None else None))
            if self.mine and pipe.slot_numel:
                pipe.own = shared.create_slots(pipe.slot_numel, pipe.depth, pipe.dtype, pipe.device)
                self.mappings_created += 1
                store.set(self._slots_key(self.mine[0].src), pickle.dumps((pipe.own.handle, pipe.packs_ahead)))
            super().connect(store, watch)
            if pipe.cuda:
                for channel in self.mine:
                    pipe.read_events[channel.name] = tuple(
                        self._open_read_events(store, channel, member, watch)
                        for member in range(1, channel.engines + 1))
            return
        super().connect(store, watch)  # the producer published its slots before joining
        for channel in self.mine:
            producer = trainer_name(channel.src)
            handle, packs_ahead = pickle.loads(store.get(self._slots_key(channel.src)))
            pipe.mapped[channel.name] = shared.map_slots(handle, pipe.device, producer)
            self.mappings_created += 1
            if packs_ahead:
                pipe.announced_by_vote[channel.name] = self._slots_packed_ahead(channel)
            if pipe.cuda:
                events = tuple(shared.interprocess_event() for _ in range(handle.count))
                pipe.own_read_events[channel.name] = events
                store.set(self._read_events_key(channel, self.member),
                          pickle.dumps(tuple(bytes(e.ipc_handle()) for e in events)))
        if pipe.cuda and self.mine:
            self._gate_on_trainer_flags(store, watch)

    def _gate_on_trainer_flags(self, store, watch) -> None:
        """Map the flag and "packed" event of every trainer that packs ahead on CUDA (it
        votes before its packs ran, `wire.device_gate`), and load the gated unpacks; a
        trainer that checks its tensors before the vote needs no gate."""
        handles = {}
        for name in self._trainers:
            key = self._flag_key(name)
            try:
                store.wait([key], timedelta(seconds=self.timeout))
            except RuntimeError:
                raise TransferError(f"connect: {name} did not share its NaN/Inf flag within {self.timeout:.0f}s: "
                                    f"{watch.diagnose((name,))}") from None
            handle = pickle.loads(store.get(key))
            if handle is not None:
                handles[name] = handle
        if not handles:
            return
        self._gate = Gate(self.pipe.device, handles, self.timeout)
        self.mappings_created += self._gate.mapped
        self.copier.gated = True
        self.load_kernels()

    def _slots_packed_ahead(self, channel) -> list[int]:
        """Where a producer that packs ahead puts each bucket of `channel`, in the order
        they are read: it fills its slots from slot 0 in its own walk over all of its
        channels (`pack_ahead`), which the plan and the agreed bucket size fix."""
        theirs = self.plan.channels_of_source(channel.src.rank)
        schedules = {c.name: bucketing.phased_schedule(c.copies, self.capacity) for c in theirs}
        slots, slot = [], 0
        for other, _, schedule in walk(theirs, schedules):
            if other.name == channel.name:
                slots.extend(range(slot, slot + len(schedule)))
            slot += len(schedule)
        return slots

    def _open_read_events(self, store, channel, member: int, watch) -> tuple:
        key = self._read_events_key(channel, member)
        try:
            store.wait([key], timedelta(seconds=self.timeout))
        except RuntimeError:
            reader = f"engine {member - 1} tp{channel.dst_tp}"
            raise TransferError(f"connect: channel {channel.name}: {reader} did not share its read events within "
                                f"{self.timeout:.0f}s: {watch.diagnose((reader,))}") from None
        self.mappings_created += 1
        return tuple(shared.open_event(h, self.pipe.device) for h in pickle.loads(store.get(key)))

    @staticmethod
    def _flag_key(who: str) -> str:
        return f"colocated/{who}/nonfinite-flag"

    @staticmethod
    def _slots_key(src) -> str:
        return f"colocated/{trainer_name(src)}/slots"

    @staticmethod
    def _read_events_key(channel, member: int) -> str:
        return f"colocated/{channel.name}/member{member}/read-events"

    def close(self) -> None:
        super().close()
        self.pipe.forget()
        for held in (self._trainer_flag, self._gate):
            if held is not None:
                held.close()
        self._trainer_flag = self._gate = None
        self.copier.gated = False
