"""The NaN/Inf part of the vote, read by the device: engines' copies gated by the trainers' flags.

Packed ahead on CUDA, a trainer's packs raise its flag where they read a NaN or Inf.
If the hosts waited for the packs before voting, the vote's round through the store
and the engines' first launches would sit between the last pack and the first unpack
with the device idle (0.8 ms of an 11 ms update on an H200, bench/RESULTS.md). So a
trainer votes on what its host checked as soon as its packs are queued, and each
engine, once the vote is in, queues its copies behind a gate: a word on its own
device, set behind every trainer's "packed" interprocess event from every trainer's
flag, that each of its unpack kernels reads first; closed, they copy nothing. The
trainer reads its flag after the vote and reports a NaN/Inf in the update's outcome,
which every endpoint hears: no engine wrote a byte of it, and none is stale.

A flag is raised to the number of the update whose packs found the NaN/Inf, never
lowered: flags only grow, so a flag an earlier update raised does not close a later
one's gate, and no launch is spent clearing one between updates. Beside it, a trainer
writes on its stream, behind its last pack, the number of the update its packs are
through: a gate is open only where every trainer's says this update, so that a
trainer that died after its vote, its packs not run, closes it too, rather than
leaving engines to copy slots it never filled.

Every trainer's flag and event are mapped by every engine rank (a word and an event
each, at connect), not only by those it feeds: the gate holds every engine back when
any trainer found one, so that no engine writes an update another refuses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardsync.runtime.device_wait import event_done_within, queued_work_not_run
from shardsync.runtime.errors import TransferError
from shardsync.runtime.wire import shared


@dataclass(frozen=True)
class FlagHandle:
    """What an engine needs to read a trainer's flag: plain data, sent through the store."""

    flag: shared.SlotsHandle
    packed: bytes  # the trainer's "packed" interprocess event


class TrainerFlag:
    """A trainer's flag, in memory the engines map, and the event recorded after its packs."""

    def __init__(self, device: torch.device, timeout: float):
        self.timeout = timeout
        self._slots = shared.create_slots(2, 1, torch.int32, device)
        self.flag = self._slots[0][:1]  # raised to the update whose packs found a NaN/Inf
        self._through = self._slots[0][1:2]  # the update whose packs have all run
        self._slots[0][:2].zero_()
        self._packed = shared.interprocess_event()
        self._read = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self._copied = torch.cuda.Event()

    def handle(self) -> FlagHandle:
        return FlagHandle(self._slots.handle, bytes(self._packed.ipc_handle()))

    def packed(self, update: int) -> None:
        """Every pack of `update` is queued: say so on the device behind them, and record
        the event the engines' gates wait for."""
        self._through.fill_(update)
        self._packed.record(torch.cuda.current_stream(self.flag.device))

    def raised_in(self, update: int) -> bool:
        """Whether the packs of `update` found a NaN or Inf, once they ran (TimeoutError
        past the timeout). The read is a copy queued behind them, not a wait on the
        whole stream."""
        self._read.copy_(self.flag, non_blocking=True)
        self._copied.record(torch.cuda.current_stream(self.flag.device))
        if not event_done_within(self._copied, self.timeout):
            raise TimeoutError(queued_work_not_run("the packs flagging NaN/Inf", self.timeout))
        return int(self._read.item()) >= update

    def close(self) -> None:
        self._slots.close()


class Gate:
    """An engine rank's: every trainer's flag and "packed" event, and the word its
    unpack kernels read (nonzero: closed)."""

    def __init__(self, device: torch.device, trainers: dict[str, FlagHandle], timeout: float):
        self.device = device
        self.timeout = timeout
        self.trainers = tuple(trainers)
        self._maps = [shared.map_slots(h.flag, device, name) for name, h in trainers.items()]
        self._flags = [slots[0][:2] for slots in self._maps]  # (the NaN/Inf flag, the update packed through)
        self._packed = [shared.open_event(h.packed, device) for h in trainers.values()]
        self.word = torch.zeros(1, dtype=torch.int32, device=device)
        self._read = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self._copied = torch.cuda.Event()

    @property
    def mapped(self) -> int:
        return len(self._maps)  # (a flag and its event, a trainer)

    def set_for(self, update: int) -> torch.Tensor:
        """Queue the gate for `update` on this rank's stream, behind every trainer's packs
        (a wait is queued only where the host does not already see them done): closed
        where a trainer's flag holds `update`, or its packs are not through it; returns
        the word the unpacks read."""
        stream = torch.cuda.current_stream(self.device)
        for event in self._packed:
            if not event.query():
                stream.wait_event(event)
        flags = torch.stack(self._flags)
        self.word.copy_(((flags[:, 0] >= update) | (flags[:, 1] != update)).any())
        return self.word

    def closed_now(self) -> bool:
        """Whether the gate is closed, waited for on the host (with the timeout: it waits
        for every trainer's packs): for copies the kernel cannot make."""
        self.read_after_copies()
        if not event_done_within(self._copied, self.timeout):
            raise TransferError(f"the NaN/Inf flags of {', '.join(self.trainers)} had not been read on the device "
                                f"after {self.timeout:g}s: the gate waits for their packs")
        return bool(self._read.item())

    def read_after_copies(self) -> None:
        """Queue the word's copy to the host behind this rank's copies."""
        self._read.copy_(self.word, non_blocking=True)
        self._copied.record(torch.cuda.current_stream(self.device))

    def was_closed(self) -> bool:
        """Whether the gate kept the copies from writing (once they ran: the endpoint
        waited for its stream)."""
        if not self._copied.query():
            raise RuntimeError("the gate was read before this rank's copies ran (wait for its stream first)")
        return bool(self._read.item())

    def close(self) -> None:
        self._flags.clear()
        self._packed.clear()
        for slots in self._maps:
            slots.close()
        self._maps.clear()
