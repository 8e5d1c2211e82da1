"""`shardsync bench-pack`: the pack / cast / unpack code alone, against the device's copy rate.

One trainer rank's channel (for a real model shape, e.g. Qwen3-4B at TP 2) is
packed into wire buckets and unpacked into engine-layout tensors with the runtime's
own copier (`runtime.wire.bucket_copier`: on CUDA one batched kernel per bucket, its
descriptors kept from one pass to the next), with and without the checksum it
computes on the way (`verify=True`); packed also as a trainer that packs ahead does
it, flagging NaN/Inf on the way (`pack_ahead`); and, for reference, the eager
per-piece `wire.pack.pack` / `wire.pack.unpack` and the eager copy of each box
straight from trainer to engine tensors (what engines reading the trainer's tensors
in place would do: one copy a byte), on any device. Each pass is one read and one
write of the payload, so each is compared with one plain contiguous copy of the same
bytes measured in the same run. On CUDA it also measures the per-piece copies
captured as one graph (the copier before its batched kernel) and staging buckets to
pinned vs pageable host memory, for a CPU (gloo) wire.
"""

from __future__ import annotations

import statistics
import time

import torch

from shardsync import generated
from shardsync.runtime.plan import boxes
from shardsync.runtime.plan import buckets as bucketing
from shardsync.runtime.wire import checksum
from shardsync.runtime.wire import pack as packing
from shardsync.runtime.wire.bucket_copier import BucketCopier
from shardsync.runtime.plan import Layout, build_plan
from shardsync.runtime.targets import TensorTargets
from shardsync.presets import model_config


def run_pack_bench(model: str = "qwen3-4b", train_tp: int = 2, infer_tp: int = 2, device: str = "cuda",
                   src_dtype: str = "bfloat16", wire_dtype: str = "bfloat16", bucket_mb: float = 64.0,
                   repeat: int = 5, train_ep: int = 1, train_etp: int | None = None, train_dp: int | None = None,
                   infer_ep: bool = False) -> dict:
    device = torch.device(device)
    src, wire = getattr(torch, src_dtype), getattr(torch, wire_dtype)
    hf_config = model_config(model)
    module = generated.for_architecture(hf_config["architectures"][0])
    cfg = module.config_from_hf(hf_config)
    elsize = torch.empty((), dtype=wire).element_size()
    layout = Layout(train_tp, 1, infer_tp, 1, train_ep=train_ep, train_etp=train_etp, train_dp=train_dp,
                    infer_ep=infer_ep)
    plan = build_plan(module, cfg, layout, elsize)
    channel = plan.channels_of_source(0)[0]  # trainer rank 0 -> its first engine TP rank
    schedule = bucketing.schedule(channel.copies, max(1, int(bucket_mb * 2**20) // elsize))
    sources = {name: torch.randn(shape, dtype=src, device=device) for name, shape in plan.src_shapes[0].items()}
    dests = {name: torch.zeros(shape, dtype=wire, device=device) for name, shape in plan.dst_shapes[channel.dst_tp].items()}
    targets = TensorTargets(dests)
    buffer = torch.empty(max(b.numel for b in schedule) + checksum.tail_elements(wire), dtype=wire, device=device)
    payload = channel.numel * elsize

    copier = BucketCopier(device)  # what the Sender and Receiver use
    checked = BucketCopier(device, checksums=True)  # the same with verify=True: the checksum fused in
    flagging = BucketCopier(device, flagging=True)  # a trainer that packs ahead: NaN/Inf flagged on the way
    flag = torch.zeros(1, dtype=torch.int32, device=device)

    def pack_all():
        for index, bucket in enumerate(schedule):
            copier.pack(("bench", 0, index), bucket, sources, buffer)

    def unpack_all():
        for index, bucket in enumerate(schedule):
            copier.unpack(("bench", 0, index), bucket, buffer, targets)

    def pack_flagged():
        for index, bucket in enumerate(schedule):
            flagging.pack(("bench", 0, index), bucket, sources, buffer, flag)

    def pack_checked():
        for index, bucket in enumerate(schedule):
            if checked.pack(("bench", 0, index), bucket, sources, buffer) is None:  # the CPU's copy: a pass of its own
                checksum.write(buffer, bucket.numel)

    def unpack_checked():
        """As a receiver checks: the sums the copy computed against the tail, compared
        once at the end. (The one buffer holds the last bucket packed, so the sums of
        the others differ: what counts here is the cost; the tests check the sums.)"""
        found = []
        for index, bucket in enumerate(schedule):
            sums = checked.unpack(("bench", 0, index), bucket, buffer, targets)
            if sums is None:  # the CPU's copy computes none: checked before the copy
                sums = torch.stack([checksum.compute(buffer[:bucket.numel]), checksum.sent(buffer, bucket.numel)])
            found.append(sums)
        torch.stack(found).tolist()

    direct_pairs = [(dests[c.dst_tensor][boxes.as_slices(c.dst_box)],
                     sources[c.src_tensor][boxes.as_slices(c.src_box)]) for c in channel.copies]

    def direct():
        """What an engine reading the trainer's tensors in place would do: each box
        straight from the source into the destination, one copy a byte, no bucket."""
        torch._foreach_copy_([d for d, _ in direct_pairs], [s for _, s in direct_pairs])

    def pack_eager():
        for bucket in schedule:
            packing.pack(bucket, sources, buffer)

    def unpack_eager():
        for bucket in schedule:
            packing.unpack(bucket, buffer, targets)

    for _ in range(2):  # untimed: kernels compiled and descriptors built, as at an endpoint's first update
        pack_all()
        unpack_all()
        pack_flagged()
        pack_checked()
        unpack_checked()

    flat_a = torch.empty(channel.numel, dtype=wire, device=device)
    flat_b = torch.empty_like(flat_a)
    result = {
        "model": model, "device": _device_name(device), "train_tp": train_tp, "infer_tp": infer_tp,
        "train_ep": layout.train_ep, "train_etp": layout.train_etp, "infer_ep": infer_ep,
        "src_dtype": src_dtype, "wire_dtype": wire_dtype, "bucket_mb": bucket_mb, "buckets": len(schedule),
        "copies": len(channel.copies), "pieces": sum(len(b.entries) for b in schedule), "payload_bytes": payload,
        "copy_s": _time(lambda: flat_b.copy_(flat_a), device, repeat),
        "pack_s": _time(pack_all, device, repeat),
        "unpack_s": _time(unpack_all, device, repeat),
        "pack_flagged_s": _time(pack_flagged, device, repeat),
        "pack_checksum_s": _time(pack_checked, device, repeat),
        "unpack_checksum_s": _time(unpack_checked, device, repeat),
        "pack_eager_s": _time(pack_eager, device, repeat),
        "unpack_eager_s": _time(unpack_eager, device, repeat),
        "direct_eager_s": _time(direct, device, repeat),
        "descriptors_built": copier.descriptors_built + checked.descriptors_built + flagging.descriptors_built,
    }
    result["runtime_equals_eager"] = _same_result(schedule, sources, buffer, dests)
    result["copy_GBps"] = payload / result["copy_s"] / 1e9
    result["pack_unpack_vs_copy"] = 2 * result["copy_s"] / (result["pack_s"] + result["unpack_s"])
    result["checksum_cost"] = ((result["pack_checksum_s"] + result["unpack_checksum_s"])
                               / (result["pack_s"] + result["unpack_s"]) - 1)
    for name in ("pack", "unpack", "pack_flagged", "pack_checksum", "unpack_checksum", "pack_eager", "unpack_eager", "direct_eager"):
        result[f"{name}_GBps"] = payload / result[f"{name}_s"] / 1e9
        result[f"{name}_vs_copy"] = result["copy_s"] / result[f"{name}_s"]
    if device.type == "cuda":
        result.update(_cuda_extras(pack_eager, buffer, schedule, sources, payload, repeat, device))
    return result


def _cuda_extras(pack_eager, buffer, schedule, sources, payload, repeat, device) -> dict:
    """The per-piece copies captured as one CUDA graph (the copier before its batched
    kernel), and device-to-host staging (pinned vs pageable), for a gloo wire."""
    extras = {}
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        pack_eager()  # warm-up on the capture stream
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pack_eager()
    extras["pack_pieces_graph_s"] = _time(graph.replay, device, repeat)
    extras["pack_pieces_graph_GBps"] = payload / extras["pack_pieces_graph_s"] / 1e9
    largest = buffer.numel()
    for kind, pinned in (("pinned", True), ("pageable", False)):
        host = torch.empty(largest, dtype=buffer.dtype, pin_memory=pinned)

        def stage():
            for bucket in schedule:
                used = packing.pack(bucket, sources, buffer)
                host[: bucket.numel].copy_(used, non_blocking=pinned)

        extras[f"pack_to_{kind}_host_s"] = _time(stage, device, repeat)
        extras[f"pack_to_{kind}_host_GBps"] = payload / extras[f"pack_to_{kind}_host_s"] / 1e9
    return extras


def _same_result(schedule, sources, buffer, dests) -> bool:
    """The runtime's copies leave the engine tensors as the eager ones do."""
    copier = BucketCopier(buffer.device)
    for tensor in dests.values():
        tensor.zero_()
    for _ in range(2):  # descriptors built, then kept
        for index, bucket in enumerate(schedule):
            copier.pack(("check", index), bucket, sources, buffer)
            copier.unpack(("check", index), bucket, buffer, TensorTargets(dests))
    reference = {name: torch.zeros_like(t) for name, t in dests.items()}
    for bucket in schedule:
        packing.unpack(bucket, packing.pack(bucket, sources, buffer), TensorTargets(reference))
    return all(torch.equal(dests[name], reference[name]) for name in dests)


def _time(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of `repeat` runs after one warm-up, synchronised on CUDA."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
