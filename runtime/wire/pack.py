"""Packing a bucket's source boxes into a flat buffer, and unpacking one into live tensors.

Packing casts to the wire dtype; unpacking writes each piece into the live
destination tensor by box, in place. Offsets come from the bucket schedule
(`runtime/plan/buckets.py`), which both ends compute alike.
"""

from __future__ import annotations

from typing import Mapping

import torch

from shardsync.runtime.plan import boxes
from shardsync.runtime.plan.buckets import Bucket


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


def flag_nonfinite(bucket: Bucket, buffer: torch.Tensor, flag: torch.Tensor, stamp: int = 1) -> None:
    """Raise `flag` (int32 [1]) to `stamp` if the packed bucket's float32 sum is not finite,
    which a NaN or an Inf among its elements makes it; queued on the device, not waited for.
    Weights are far too small for a finite sum to overflow, and where one did, the
    endpoint's exact search of its tensors clears the flag. Where the batched kernel
    does not pack (the CPU), it has no launch to flag them in; reading the bucket just
    written is cheaper than reading the trainer's tensors again."""
    found = torch.isfinite(buffer[:bucket.numel].sum(dtype=torch.float32)).logical_not_()
    torch.maximum(flag, found.to(flag.dtype) * stamp, out=flag)
