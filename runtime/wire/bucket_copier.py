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

import torch

from shardsync.runtime.wire import pack as packing

log = logging.getLogger("shardsync")


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
        self._kernels: dict = {}  # key -> (addresses, the bucket's kernel for them)
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
                                  flagging=self.flagging)

    def pack(self, key, bucket, tensors, buffer: torch.Tensor, flag: torch.Tensor | None = None) -> torch.Tensor | None:
        """`flag` (int32 [1] on the bucket's device): set to 1 where a packed element of a
        trainer's tensor is NaN or Inf (on the CPU, where the packed bucket's sum is not
        finite), else left as it was; nothing waited for."""
        sources = [tensors[e.src_tensor] for e in bucket.entries]
        if not self._batchable(sources, buffer):
            packing.pack(bucket, tensors, buffer)
            if flag is not None:
                packing.flag_nonfinite(bucket, buffer, flag)
            return None
        entries = [(src, e.src_box, e.offset) for e, src in zip(bucket.entries, sources)]
        return self._run(("pack",) + key, buffer, entries, bucket.numel, to_bucket=True, flag=flag)

    def unpack(self, key, bucket, buffer: torch.Tensor, targets) -> torch.Tensor | None:
        dests = [targets.tensor(e.dst_tensor) for e in bucket.entries]  # (the targets may restore a layer here)
        if not self._batchable(dests, buffer):
            packing.unpack(bucket, buffer, targets)
            return None
        entries = [(dst, e.dst_box, e.offset) for e, dst in zip(bucket.entries, dests)]
        sums = self._run(("unpack",) + key, buffer, entries, bucket.numel, to_bucket=False)
        for entry in bucket.entries:
            targets.written(entry.dst_tensor, entry.numel)
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

    def _batchable(self, tensors: list[torch.Tensor], buffer: torch.Tensor) -> bool:
        if not tensors or not self._triton():
            return False
        from shardsync.runtime.wire.batched_copy import supported

        return supported(buffer) and all(supported(t) for t in tensors)

    def _run(self, key, buffer, entries, numel: int, to_bucket: bool, flag=None) -> torch.Tensor | None:
        """The bucket's kernel for these addresses: kept from an earlier update, or built."""
        from shardsync.runtime.wire.batched_copy import BucketKernel

        addresses = (buffer.data_ptr(),) + tuple(t.data_ptr() for t, _, _ in entries)
        kept = self._kernels.get(key)
        if kept is None or kept[0] != addresses:
            kept = self._kernels[key] = (addresses, BucketKernel(entries, numel, buffer, sums=self.checksums))
            self.descriptors_built += 1
        return kept[1].run(buffer, to_bucket, flag)
