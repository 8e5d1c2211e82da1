"""Packing and unpacking buckets: one batched kernel per bucket on CUDA, replayed as a graph.

Eagerly, a bucket's pieces cost one kernel launch each plus Python to cut the views,
which on a GPU is far slower than the bytes; even captured as a graph, 15-60 short
copies run one after another and reach about 0.69 of the copy rate (bench/RESULTS.md).
On CUDA each bucket is therefore one launch of `wire.batched_copy`'s kernel, which
walks every piece of the bucket and, with `checksums`, computes the bucket's checksum
on the way: packing, it writes the tail itself; unpacking, it returns the sums it
computed beside the tail's, so that the pipe compares them without a pass or a launch
of its own. The plan and the schedule never change between updates, and the
trainer's parameters and the engine's tensors mostly keep their storage, so a
bucket's descriptors are built once for a set of addresses, and its launch is
captured as a CUDA graph the second time the same addresses come by and replayed
from then on. Where storage moved (an engine layer vLLM re-allocates when it
re-processes it, a trainer handing over new tensors), the bucket runs eagerly with
descriptors built for the new addresses. On the CPU: one multi-tensor copy per bucket.
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

    def __init__(self, device: torch.device, checksums: bool = False):
        self.device = device
        self.batched = device.type == "cuda"
        self.checksums = checksums
        self._prepared: dict = {}  # key -> _Prepared for the addresses last seen
        self.captures = 0
        # where graphs are captured: made here, not in an update, because making a stream
        # waits for the device
        self._capture_stream = torch.cuda.Stream(device) if self.batched else None

    @property
    def fuses_checksums(self) -> bool:
        """Whether unpack computes the checksum while it reads (else the pipe checks first)."""
        return self.batched and self.checksums

    def pack(self, key, bucket, tensors, buffer: torch.Tensor) -> torch.Tensor | None:
        sources = [tensors[e.src_tensor] for e in bucket.entries]
        if not self._batchable(sources, buffer):
            packing.pack(bucket, tensors, buffer)
            return None
        entries = [(src, e.src_box, e.offset) for e, src in zip(bucket.entries, sources)]
        return self._run(("pack",) + key, buffer, entries, bucket.numel, to_bucket=True)

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

    def _batchable(self, tensors: list[torch.Tensor], buffer: torch.Tensor) -> bool:
        if not self.batched or not tensors:
            return False
        try:
            from shardsync.runtime.wire.batched_copy import supported
        except ImportError as exc:  # no Triton beside this CUDA build of torch: per-piece copies
            log.warning("shardsync: batched copies need Triton (%s); copying bucket pieces one by one", exc)
            self.batched = False
            return False
        return supported(buffer) and all(supported(t) for t in tensors)

    def _run(self, key, buffer, entries, numel: int, to_bucket: bool) -> torch.Tensor | None:
        """The bucket's kernel for these addresses: replayed from its graph, captured the
        second time the same addresses come by, or run eagerly."""
        from shardsync.runtime.wire.batched_copy import BucketKernel

        addresses = (buffer.data_ptr(),) + tuple(t.data_ptr() for t, _, _ in entries)
        prepared = self._prepared.get(key)
        if prepared is None or prepared.addresses != addresses:
            kernel = BucketKernel(entries, numel, buffer, sums=self.checksums)
            self._prepared[key] = _Prepared(addresses, kernel)
            return kernel.run(buffer, to_bucket)
        if prepared.graph is None:
            prepared.capture(buffer, to_bucket, self._capture_stream)
            self.captures += 1
        prepared.graph.replay()
        return prepared.sums


class _Prepared:
    """A bucket's kernel for one set of addresses, and once it ran twice, its graph."""

    def __init__(self, addresses: tuple, kernel):
        self.addresses = addresses
        self.kernel = kernel
        self.graph: torch.cuda.CUDAGraph | None = None
        self.sums: torch.Tensor | None = None

    def capture(self, buffer: torch.Tensor, to_bucket: bool, capture: torch.cuda.Stream) -> None:
        """Captured on a side stream of its own, which runs nothing while capturing; the
        graph is replayed on this rank's stream, in its order. Not through
        `torch.cuda.graph`, which synchronizes the whole device and empties the
        allocator's cache on entry: this rank's stream may be waiting on another
        process's events, a host wait for them would have no deadline, and the engine's
        cache is not ours to empty. Ending the capture still waits while work queued
        before it waits on another process (measured on an H200: a trainer capturing
        its packs held until the busy engine whose reads its stream waited on was
        through): a host wait without a deadline, once per bucket and set of addresses.
        The capture mode is the thread's own, so that another thread of the engine
        touching CUDA meanwhile neither breaks the capture nor is broken by it."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(capture):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.sums = self.kernel.run(buffer, to_bucket)
            finally:
                graph.capture_end()
        self.graph = graph
