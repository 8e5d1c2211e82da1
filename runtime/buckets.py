"""Buckets: a channel's copies packed, in plan order, into flat buffers.

The schedule is computed from the plan alone, so sender and receivers agree on
every offset without exchanging any. A copy larger than the room left in a bucket
is split into leading row (then column) blocks, so no buffer ever exceeds
`bucket_bytes`. Packing casts to the wire dtype; unpacking writes each piece into
the live destination tensor by box, in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from runtime import boxes
from runtime.boxes import Box


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


def pack(bucket: Bucket, tensors: Mapping[str, torch.Tensor], buffer: torch.Tensor) -> torch.Tensor:
    """Copy a bucket's source boxes into `buffer` (cast to its dtype); returns the used view.

    One multi-tensor copy per bucket: on CUDA a few kernel launches instead of one per
    piece, which is what bounds a piece-by-piece pack (bench-pack measures it).
    """
    targets = [buffer[e.offset:e.offset + e.numel].view(boxes.shape(e.src_box)) for e in bucket.entries]
    sources = [tensors[e.src_tensor][boxes.as_slices(e.src_box)] for e in bucket.entries]
    if targets:
        torch._foreach_copy_(targets, sources)
    return buffer[:bucket.numel]


def unpack(bucket: Bucket, buffer: torch.Tensor, targets) -> None:
    """Write a received bucket into the live destination tensors by box, in place.

    `targets` gives each destination tensor (`tensor(name)`) and is told what was
    written (`written(name, numel)`), see `runtime/targets.py`, after the copies.
    """
    dests = [targets.tensor(e.dst_tensor)[boxes.as_slices(e.dst_box)] for e in bucket.entries]
    sources = [buffer[e.offset:e.offset + e.numel].view(boxes.shape(e.dst_box)) for e in bucket.entries]
    if dests:
        torch._foreach_copy_(dests, sources)
    for entry in bucket.entries:
        targets.written(entry.dst_tensor, entry.numel)
