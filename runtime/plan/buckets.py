"""Buckets: a channel's copies packed, in plan order, into flat buffers.

The schedule is computed from the plan alone, so sender and receivers agree on
every offset without exchanging any. A copy larger than the room left in a bucket
is split into leading row (then column) blocks, so no buffer ever exceeds
`bucket_bytes`. Pure Python: `runtime/wire/pack.py` moves the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from shardsync.runtime.plan import boxes
from shardsync.runtime.plan.boxes import Box


@dataclass(frozen=True)
class Entry:
    src_tensor: str
    src_box: Box
    dst_tensor: str
    dst_box: Box
    offset: int  # in elements of the wire dtype

    @property
    def numel(self) -> int:
        return boxes.numel(self.src_box)


@dataclass(frozen=True)
class Bucket:
    entries: tuple[Entry, ...]
    numel: int


def schedule(copies, capacity: int) -> tuple[Bucket, ...]:
    """Pack copies in order into buckets of at most `capacity` elements."""
    if capacity < 1:
        raise ValueError(f"bucket capacity must be at least one element, got {capacity}")
    buckets: list[Bucket] = []
    entries: list[Entry] = []
    used = 0
    for copy in copies:
        pending = [copy.src_box]
        while pending:
            box = pending.pop(0)
            room = capacity - used
            if boxes.numel(box) <= room:
                head, rest = box, []
            else:
                head, rest = _leading_part(box, room)
            entries.append(Entry(copy.src_tensor, head, copy.dst_tensor,
                                 boxes.translate(head, copy.src_box, copy.dst_box), used))
            used += boxes.numel(head)
            pending = rest + pending
            if used == capacity:
                buckets.append(Bucket(tuple(entries), used))
                entries, used = [], 0
    if entries:
        buckets.append(Bucket(tuple(entries), used))
    return tuple(buckets)


def phased_schedule(copies, capacity: int) -> dict[int, tuple[Bucket, ...]]:
    """The channel's buckets, keyed by the phase in which the walk moves them.

    The copies are bucketed in phase order as one stream, so a bucket fills up across
    phase boundaries (a bucket a layer would cap every bucket at a layer's size
    whatever `capacity` says, and every bucket costs a hand-off between processes);
    each bucket is moved in the phase of its last element, so an engine still
    completes its layers in order, and every process derives the same keys."""
    ordered = sorted(copies, key=lambda copy: copy.phase)  # stable: plan order within a phase
    phase_of = {copy.src_tensor: copy.phase for copy in ordered}  # a phase is its source tensor's layer
    by_phase: dict[int, list] = {}
    for bucket in schedule(ordered, capacity):
        by_phase.setdefault(phase_of[bucket.entries[-1].src_tensor], []).append(bucket)
    return {phase: tuple(buckets) for phase, buckets in by_phase.items()}


def _leading_part(box: Box, room: int) -> tuple[Box, list[Box]]:
    """The largest leading block of `box` with at most `room` elements (room >= 1),
    and the rest of the box as blocks in order."""
    for dim, (start, stop) in enumerate(box):
        if stop - start == 1:
            continue
        inner = boxes.numel(box[dim + 1:])
        fits = room // inner
        if fits >= 1:
            return _with(box, dim, start, start + fits), [_with(box, dim, start + fits, stop)]
        head, rest = _leading_part(_with(box, dim, start, start + 1), room)
        return head, rest + [_with(box, dim, start + 1, stop)]
    return box, []  # a single element; room >= 1


def _with(box: Box, dim: int, start: int, stop: int) -> Box:
    return box[:dim] + ((start, stop),) + box[dim + 1:]
