"""Packing and unpacking buckets on CUDA as replayed graphs.

Eagerly, a bucket's pieces cost one kernel launch each plus Python to cut the views,
which on a GPU is far slower than the bytes (`shardsync bench-pack` measured 6-13% of
the H200's copy rate for Qwen3-4B shards). The plan and the schedule never change
between updates, and the trainer's parameters and the engine's plain tensors keep
their storage, so each bucket's copies are captured once as a CUDA graph and
replayed at every update.

A graph is keyed by the bucket and the addresses it reads and writes: where those
changed (an engine layer that vLLM re-allocates when it re-processes it), the
bucket is copied eagerly; a graph is captured only once the same addresses came
back, so tensors that move at every update never pay for captures.
"""

from __future__ import annotations

import torch

from shardsync.runtime.plan import boxes
from shardsync.runtime.wire import pack as packing



class BucketCopier:
    """pack / unpack with the signatures of `runtime.wire.pack`, graphed on CUDA."""

    def __init__(self, device: torch.device):
        self.graphed = device.type == "cuda"
        self._seen: dict = {}  # key -> addresses at the last update
        self._graphs: dict = {}  # key -> (addresses, graph)
        self.captures = 0

    def pack(self, key, bucket, tensors, buffer: torch.Tensor) -> torch.Tensor:
        if not self.graphed:
            return packing.pack(bucket, tensors, buffer)
        sources = [tensors[e.src_tensor] for e in bucket.entries]

        def pairs():
            return [(buffer[e.offset:e.offset + e.numel].view(boxes.shape(e.src_box)), src[boxes.as_slices(e.src_box)])
                    for e, src in zip(bucket.entries, sources)]

        self._copy(("pack",) + key, (buffer.data_ptr(),) + tuple(t.data_ptr() for t in sources), pairs)
        return buffer[:bucket.numel]

    def unpack(self, key, bucket, buffer: torch.Tensor, targets) -> None:
        if not self.graphed:
            return packing.unpack(bucket, buffer, targets)
        dests = [targets.tensor(e.dst_tensor) for e in bucket.entries]  # (the targets may restore a layer here)

        def pairs():
            return [(dst[boxes.as_slices(e.dst_box)], buffer[e.offset:e.offset + e.numel].view(boxes.shape(e.dst_box)))
                    for e, dst in zip(bucket.entries, dests)]

        self._copy(("unpack",) + key, (buffer.data_ptr(),) + tuple(t.data_ptr() for t in dests), pairs)
        for entry in bucket.entries:
            targets.written(entry.dst_tensor, entry.numel)

    def _copy(self, key, addresses: tuple, pairs) -> None:
        """Replay the bucket's graph if its tensors are where they were when it was
        captured (shapes and boxes are fixed by the plan; storage is what can move)."""
        cached = self._graphs.get(key)
        if cached is not None and cached[0] == addresses:
            cached[1].replay()
            return
        views = pairs()
        if not views:
            return
        if self._seen.get(key) == addresses:  # the same storage twice: worth a graph
            graph = _capture(views)
            self._graphs[key] = (addresses, graph)
            self.captures += 1
            graph.replay()
            return
        self._seen[key] = addresses
        torch._foreach_copy_([d for d, _ in views], [s for _, s in views])


def _capture(pairs) -> torch.cuda.CUDAGraph:
    """One stream: on an H200, per-bucket graphs that fork copies over 4 or 8 streams
    replayed 1.7x and 4.5x slower than on one (bench/RESULTS.md)."""
    device = pairs[0][0].device
    current = torch.cuda.current_stream(device)
    capture = torch.cuda.Stream(device)
    capture.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=capture):
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
    current.wait_stream(capture)
    return graph
