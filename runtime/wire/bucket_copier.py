"""Packing and unpacking buckets: one batched kernel per bucket on CUDA.

Eagerly, a bucket's pieces cost one kernel launch each plus Python to cut the views,
which on a GPU is far slower than the bytes; even captured as a graph, 15-60 short
copies run one after another and reach about 0.69 of the copy rate (bench/RESULTS.md).
On CUDA each bucket is therefore one launch of `wire.batched_copy`'s kernel (two or
three where some pieces cannot take its vector or word copies), which walks every
piece of the bucket and, with `checksums`, computes the bucket's checksum on the way:
packing, it writes the tail itself; unpacking, it returns the sums it computed beside
the tail's, so that the pipe compares them without a pass or a launch of its own. A
pack may also flag NaN/Inf in what it packs (`flag`), in the same launch. The
plan and the schedule never change between updates, and the trainer's parameters and
the engine's tensors mostly keep their storage, so a bucket's descriptors are built
once for a set of addresses and kept on the device; where storage moved (an engine
layer vLLM re-allocates when it re-processes it, a trainer handing over new tensors),
they are built again for the new addresses.

Launches are not captured as CUDA graphs: ending a capture waited, on an H200, for
work queued before it that waited on another process (a host wait with no deadline),
and a bucket is one to three launches anyway. For the same reason every variant of
the kernel is loaded at connect (`load_kernels`), not at a first launch mid-update.
On the CPU: one multi-tensor copy per bucket.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from shardsync.runtime.wire import pack as packing

log = logging.getLogger("shardsync")


@dataclass
class _Kept:
    """What a bucket's copies need at every update, worked out once: its tensors by name
    (each once, in the order the bucket first takes it), the elements each is written
    in it, and the kernel last built, with the addresses, dtypes and strides it was
    built for. An update whose tensors match reuses the kernel after one look at each
    tensor, not at each of the bucket's pieces."""

    names: tuple[str, ...]
    numels: tuple[int, ...]
    signature: tuple | None = None
    kernel: object = None  # a `batched_copy.BucketKernel`


class BucketCopier:
    """pack / unpack with the signatures of `runtime.wire.pack`. Where they computed the
    bucket's checksum (CUDA with `checksums`), each returns int64 [2, 2]: the sums
    computed on the way, then the tail's (pack wrote the tail after the bucket's data;
    unpack read the sender's); else None, and the tail is the caller's."""

    def __init__(self, device: torch.device, checksums: bool = False, flagging: bool = False):
        self.device = device
        self.batched = device.type == "cuda"
        self.checksums = checksums
        self.flagging = flagging  # packs flag NaN/Inf (`pack`'s `flag`): which of its variants to load
        self.gated = False  # unpacks behind a gate on the device (`unpack`'s `gate`): which variants to load
        self._kept: dict = {}  # key -> _Kept
        self.descriptors_built = 0

    @property
    def fuses_checksums(self) -> bool:
        """Whether unpack computes the checksum while it reads (else the pipe checks first)."""
        return self.batched and self.checksums

    def load_kernels(self, wire_dtype: torch.dtype, buckets, *, to_bucket: bool, tensor_dtypes=None) -> None:
        """Load, before the first update, every variant of the batched kernel that copying
        `buckets` may launch in one direction, for tensors of `tensor_dtypes` (None: every
        dtype the kernel copies: what a trainer hands over is known only then). Nothing
        on the CPU, or without Triton."""
        if not self._triton():
            return
        from shardsync.runtime.wire import batched_copy

        words = {batched_copy.checksum_word_bytes(bucket.numel, wire_dtype) for bucket in buckets}
        batched_copy.load_kernels(self.device, wire_dtype, tensor_dtypes or batched_copy.DTYPES,
                                  to_bucket=to_bucket, sums=self.checksums, word_bytes=words or {4},
                                  flagging=self.flagging, gated=self.gated)

    def pack(self, key, bucket, tensors, buffer: torch.Tensor, flag: torch.Tensor | None = None,
             stamp: int = 1) -> torch.Tensor | None:
        """`flag` (int32 [1] on the bucket's device): raised to `stamp` (at most: flags only
        grow) where a packed element of a trainer's tensor is NaN or Inf (on the CPU, where
        the packed bucket's sum is not finite), else left as it was; nothing waited for."""
        kernel = None
        if self._triton():
            kept = self._bucket(("pack",) + key, bucket, to_bucket=True)
            kernel = self._kernel(kept, bucket, buffer, [tensors[name] for name in kept.names], to_bucket=True)
        if kernel is None:
            packing.pack(bucket, tensors, buffer)
            if flag is not None:
                packing.flag_nonfinite(bucket, buffer, flag, stamp)
            return None
        return kernel.run(buffer, True, flag, stamp)

    def pack_reads(self, key, bucket) -> tuple[str, ...]:
        """The tensors the pack of `bucket` reads, each once, in the order it first takes them."""
        return self._bucket(("pack",) + key, bucket, to_bucket=True).names

    def unpack(self, key, bucket, buffer: torch.Tensor, targets, gate=None) -> torch.Tensor | None:
        """`gate` (a `wire.device_gate.Gate`, set for this update): where it is closed,
        nothing is written (the kernel reads it on the device; copies it cannot make wait
        for it on the host), and the targets still hear every element as written: the
        plan's count of an update is the same, the gate says whether it took effect."""
        kernel = None
        if self._triton():
            kept = self._bucket(("unpack",) + key, bucket, to_bucket=False)
            dests = [targets.tensor(name) for name in kept.names]  # (the targets may restore a layer here)
            kernel = self._kernel(kept, bucket, buffer, dests, to_bucket=False)
        if kernel is None:
            if gate is not None and gate.closed_now():
                for entry in bucket.entries:
                    targets.tensor(entry.dst_tensor)
                    targets.written(entry.dst_tensor, entry.numel)
            else:
                packing.unpack(bucket, buffer, targets)
            return None
        sums = kernel.run(buffer, False, gate=gate.word if gate is not None else None)
        for name, numel in zip(kept.names, kept.numels):
            targets.written(name, numel)
        return sums

    def _triton(self) -> bool:
        """Whether the batched kernel can run here (CUDA, with Triton importable)."""
        if not self.batched:
            return False
        try:
            import shardsync.runtime.wire.batched_copy  # noqa: F401
        except ImportError as exc:  # no Triton beside this CUDA build of torch: per-piece copies
            log.warning("shardsync: batched copies need Triton (%s); copying bucket pieces one by one", exc)
            self.batched = False
        return self.batched

    def _bucket(self, key, bucket, to_bucket: bool) -> _Kept:
        kept = self._kept.get(key)
        if kept is None:
            numels: dict[str, int] = {}
            for entry in bucket.entries:
                name = entry.src_tensor if to_bucket else entry.dst_tensor
                numels[name] = numels.get(name, 0) + entry.numel
            kept = self._kept[key] = _Kept(tuple(numels), tuple(numels.values()))
        return kept

    def _kernel(self, kept: _Kept, bucket, buffer: torch.Tensor, tensors: list[torch.Tensor], to_bucket: bool):
        """The bucket's kernel for these tensors (`kept.names`'): kept from an earlier
        update where every address, dtype and stride is the same, else built; None where
        the kernel cannot copy them (the caller copies piece by piece)."""
        from shardsync.runtime.wire.batched_copy import BucketKernel, supported

        signature = (buffer.data_ptr(),) + tuple((t.data_ptr(), t.dtype, t.stride()) for t in tensors)
        if signature == kept.signature:
            return kept.kernel
        if not tensors or not supported(buffer) or not all(supported(t) for t in tensors):
            return None
        by_name = dict(zip(kept.names, tensors))
        entries = [(by_name[e.src_tensor], e.src_box, e.offset) if to_bucket else
                   (by_name[e.dst_tensor], e.dst_box, e.offset) for e in bucket.entries]
        kept.kernel = BucketKernel(entries, bucket.numel, buffer, sums=self.checksums)
        kept.signature = signature
        self.descriptors_built += 1
        return kept.kernel
