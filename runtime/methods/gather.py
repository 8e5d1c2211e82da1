"""The baseline, selectable as `method="gather"`: what the common path does today.

Per pipeline stage, every trainer TP rank all-gathers each tensor's TP shards over
the stage's TP group; TP rank 0 turns them into full HF tensors, packs those in
model order into buckets of the same size as the shard path's and broadcasts each
bucket to every engine rank, which assembles each full tensor and slices its own
shard from it (by the spec's vLLM table), or, for a spec without one, hands it to
the engine's own loader (`load_weights`, as vLLM models have). Same transport
(groups over the same store), same bucket size, same cast while packing: a
comparison with the shard path is a comparison of methods.

Whole tensors are held at the sender and at every receiver: `peak_temp_bytes`
records the most held at once (gathered shards and full tensors).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import torch

from shardsync.runtime.plan import boxes
from shardsync.runtime.wire import checksum
from shardsync.runtime.plan import buckets as bucketing
from shardsync.runtime.plan.boxes import Box
from shardsync.runtime.wire.channels import Group, create_group
from shardsync.runtime.wire.pack import pack
from shardsync.runtime.errors import TransferError, UpdateFailedElsewhere


@dataclass(frozen=True)
class FullCopy:
    """A box of a full HF tensor, at the same place on both ends (what `schedule` packs)."""

    src_tensor: str
    src_box: Box
    dst_tensor: str
    dst_box: Box


@dataclass(frozen=True)
class StageSchedule:
    stage: int
    megatron: tuple[str, ...]  # the stage's Megatron tensors, in model order
    hf_of: dict  # Megatron name -> the HF names it converts to
    buckets: tuple[bucketing.Bucket, ...]

    @property
    def name(self) -> str:
        return f"broadcast-pp{self.stage}"

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.buckets)


def stage_schedules(module, cfg, layout, capacity: int) -> list[StageSchedule]:
    """Every stage's full HF tensors in model order, packed into buckets."""
    shapes = module.hf_shapes(cfg)
    schedules = []
    for stage in range(layout.train_pp):
        table = module.megatron_shard_table(cfg, 0, layout.train_tp, stage, layout.train_pp)
        hf_of = {}
        for local in table:
            family, layer = module.resolve(local.name, cfg)
            hf_of[local.name] = tuple(family.hf_names(layer))
        copies = [FullCopy(hf, _full(shapes[hf]), hf, _full(shapes[hf])) for names in hf_of.values() for hf in names]
        schedules.append(StageSchedule(stage, tuple(hf_of), hf_of, bucketing.schedule(copies, capacity)))
    return schedules


class GatherMethod:
    """One endpoint's side of the baseline: groups, buffers, and the update loops."""

    def __init__(self, endpoint, capacity: int):
        self.endpoint = endpoint
        layout = endpoint.layout
        self.stages = stage_schedules(endpoint.module, endpoint.cfg, layout, capacity)
        self.shapes = endpoint.module.hf_shapes(endpoint.cfg)
        self.groups: dict[str, Group] = {}
        self.peak_temp_bytes = 0
        self._held = 0
        largest = max((b.numel for s in self.stages for b in s.buckets), default=0)
        self.tail = endpoint.tail  # checksum elements after each bucket's data (verify=True)
        self.buffers = [torch.empty(largest + self.tail, dtype=endpoint.dtype, device=endpoint.device)
                        for _ in range(2)]
        self.elsize = self.buffers[0].element_size()
        self.corrupted: list[str] = []  # this update's buckets that failed their checksum here
        self.failed_elsewhere: list[str] = []  # ... and at other receivers of the same broadcast

    @property
    def digest(self) -> str:
        """What every endpoint must have scheduled alike: each bucket's tensors and boxes."""
        body = [[s.stage, [[(e.dst_tensor, e.dst_box, e.offset) for e in b.entries] for b in s.buckets]]
                for s in self.stages]
        return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()

    # -- set-up -----------------------------------------------------------------------

    def connect_trainer(self, store, pp: int, tp: int, trainer_name, engine_name) -> None:
        ep, layout = self.endpoint, self.endpoint.layout
        if layout.train_tp > 1:
            peers = tuple(trainer_name(pp, t) for t in range(layout.train_tp))
            self.groups["tp"] = create_group(store, f"gather-pp{pp}", tp, peers, ep.device, ep.timeout,
                                             **ep.group_options)
        if tp == 0:
            self._join_broadcast(store, pp, 0, trainer_name, engine_name)
        self.tables = {t: {local.name: local for local in ep.module.megatron_shard_table(
            ep.cfg, t, layout.train_tp, pp, layout.train_pp)} for t in range(layout.train_tp)}

    def connect_engine(self, store, engine: int, tp: int, trainer_name, engine_name) -> None:
        ep = self.endpoint
        for stage in self.stages:
            self._join_broadcast(store, stage.stage, 1 + engine * ep.layout.infer_tp + tp, trainer_name, engine_name)
        self.pieces: dict[str, list] = {}  # HF name -> (vLLM tensor, piece) of this engine rank
        if ep.module.VLLM_LAYOUT:
            for local in ep.module.vllm_shard_table(ep.cfg, tp, ep.layout.infer_tp):
                for piece in local.pieces:
                    self.pieces.setdefault(piece.hf_name, []).append((local.name, piece))

    def _join_broadcast(self, store, pp: int, member: int, trainer_name, engine_name) -> None:
        ep, layout = self.endpoint, self.endpoint.layout
        peers = (trainer_name(pp, 0),) + tuple(
            engine_name(e, s) for e in range(layout.engines) for s in range(layout.infer_tp))
        self.groups[f"broadcast-pp{pp}"] = create_group(store, f"broadcast-pp{pp}", member, peers, ep.device,
                                                        ep.timeout, **ep.group_options)

    def close(self) -> None:
        for group in self.groups.values():
            group.close()
        self.groups.clear()

    @property
    def buffer_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    # -- updates ----------------------------------------------------------------------

    def send(self, pp: int, tp: int, tensors, number: int) -> list[tuple[str, int, int, float]]:
        """All ranks of the stage gather; TP rank 0 converts, packs and broadcasts."""
        stage = self.stages[pp]
        broadcast = self.groups.get(stage.name)
        started = time.perf_counter()
        if broadcast is not None:
            broadcast.send_header(number, len(stage.buckets), self.endpoint.device)
        full: dict[str, torch.Tensor] = {}
        waiting = list(stage.megatron)
        last_use = _last_bucket(stage)
        in_flight: list = []
        depth = 2 if self.endpoint.overlap else 1
        for index, bucket in enumerate(stage.buckets):
            for entry in bucket.entries:
                while entry.src_tensor not in full:
                    self._gather(waiting.pop(0), stage, tensors, full, tp, number)
            if broadcast is not None:
                if len(in_flight) == depth:
                    broadcast.wait(in_flight.pop(0), f"sending bucket {index - depth}", number)
                buffer = self.buffers[index % 2]
                wire = pack(bucket, full, buffer)
                in_flight.append(broadcast.broadcast(checksum.write(buffer, bucket.numel) if self.tail else wire))
            for name in [n for n in full if last_use[n] == index]:
                self._release(full.pop(name))
        if broadcast is not None:
            for work in in_flight:
                broadcast.wait(work, "sending the last buckets", number)
            problem = broadcast.acknowledge(0, "waiting for the receivers' acknowledgement", number)
            if problem:
                raise TransferError(f"update {number}: channel {stage.name}: {broadcast.peers[problem - 1]} "
                                    f"received a bucket that failed its checksum")
            return [(stage.name, len(stage.megatron), stage.numel * self.elsize,
                     time.perf_counter() - started)]
        return [(f"gather-pp{pp}", len(stage.megatron), 0, time.perf_counter() - started)]

    def _gather(self, name: str, stage: StageSchedule, tensors, full: dict, tp: int, number: int) -> None:
        """One Megatron tensor's shards from every TP rank; full HF tensors on TP rank 0.
        A name without HF tensors here (none) still takes part in the collective."""
        shard = tensors[name]
        group = self.groups.get("tp")
        if group is None:
            shards = [shard]
        else:
            shards = [torch.empty_like(shard) for _ in range(group.size)]
            self._hold(sum(s.numel() * s.element_size() for s in shards))
            group.wait(group.all_gather(shards, shard.contiguous()), f"gathering {name}", number)
        if tp == 0:
            for hf in stage.hf_of[name]:
                full[hf] = torch.empty(self.shapes[hf], dtype=shard.dtype, device=shard.device)
                self._hold(full[hf].numel() * full[hf].element_size())
            for rank, piece_shard in enumerate(shards):
                for piece in self.tables[rank][name].pieces:
                    full[piece.hf_name][boxes.as_slices(piece.hf_box)] = piece_shard[boxes.as_slices(piece.local_box)]
        else:
            for hf in stage.hf_of[name]:
                full[hf] = None  # not held here: only TP rank 0 converts and sends
        if group is not None:
            self._release_bytes(sum(s.numel() * s.element_size() for s in shards))

    def receive(self, targets, number: int) -> list[tuple[str, int, int, float]]:
        """Every stage's buckets in order: assemble each full tensor, slice this rank's share."""
        reports: list = []
        for hf_name, tensor in self._full_tensors(number, reports):
            self._slice(hf_name, tensor, targets)
        return reports

    def load(self, loader, number: int) -> list[tuple[str, int, int, float]]:
        """Every full tensor, as it completes, through the engine's own loader. The stream
        is drained whatever the loader does, so the channels stay in step for the next
        update; a loader that stopped early fails the update."""
        reports: list = []
        stream = self._full_tensors(number, reports)
        try:
            loader.load_weights(stream)
        finally:
            left = [hf_name for hf_name, _ in stream]  # a loader that raised: the peers still finish
        who = self.endpoint.who
        if self.corrupted:
            raise TransferError(f"update {number}: {who}: {'; '.join(self.corrupted)}")
        if left:
            raise TransferError(f"update {number}: {who}: the engine's loader stopped before taking "
                                f"{len(left)} tensor(s), first {left[0]}")
        if self.failed_elsewhere:
            raise UpdateFailedElsewhere(f"update {number}: failed: {'; '.join(self.failed_elsewhere)} ({who} took "
                                        f"all of its share)")
        return reports

    def _full_tensors(self, number: int, reports: list):
        """Yield (HF name, full tensor) as each tensor's last bucket arrives; a yielded
        tensor is released once the consumer asks for the next one. A bucket that fails
        its checksum is recorded (the update then fails) and the stream goes on, so
        every member finishes the exchange."""
        self.corrupted, self.failed_elsewhere = [], []
        for stage in self.stages:
            group = self.groups[stage.name]
            started = time.perf_counter()
            group.receive_header(number, len(stage.buckets), self.endpoint.device)
            remaining = {e.dst_tensor: boxes.numel(_full(self.shapes[e.dst_tensor]))
                         for b in stage.buckets for e in b.entries}
            full: dict[str, torch.Tensor] = {}
            size = [bucket.numel + self.tail for bucket in stage.buckets]
            posted = [group.broadcast(self.buffers[i][:size[i]]) for i in range(min(2, len(stage.buckets)))]
            bad = False
            for index, bucket in enumerate(stage.buckets):
                group.wait(posted[index], f"receiving bucket {index}", number)
                buffer = self.buffers[index % 2]
                mismatch = checksum.check(buffer, bucket.numel) if self.tail else None
                if mismatch is not None:
                    bad = True
                    self.corrupted.append(f"channel {stage.name}: bucket {index} failed its checksum "
                                          f"(sent {mismatch[0]}, computed {mismatch[1]})")
                for entry in bucket.entries:
                    if entry.dst_tensor not in full:
                        full[entry.dst_tensor] = torch.empty(self.shapes[entry.dst_tensor], dtype=buffer.dtype,
                                                             device=buffer.device)
                        self._hold(full[entry.dst_tensor].numel() * buffer.element_size())
                    source = buffer[entry.offset:entry.offset + entry.numel].view(boxes.shape(entry.dst_box))
                    full[entry.dst_tensor][boxes.as_slices(entry.dst_box)] = source
                    remaining[entry.dst_tensor] -= entry.numel
                    if remaining[entry.dst_tensor] == 0:
                        tensor = full.pop(entry.dst_tensor)
                        yield entry.dst_tensor, tensor
                        self._release(tensor)
                if index + 2 < len(stage.buckets):
                    posted.append(group.broadcast(buffer[:size[index + 2]]))
            mine = 1 + group.rank if bad else 0
            problem = group.acknowledge(mine, "acknowledging", number)
            if problem and problem != mine:
                self.failed_elsewhere.append(f"channel {stage.name}: {group.peers[problem - 1]} received a bucket "
                                             f"that failed its checksum")
            reports.append((stage.name, len(stage.megatron), stage.numel * self.elsize,
                            time.perf_counter() - started))

    def _slice(self, hf_name: str, tensor: torch.Tensor, targets) -> None:
        for local_name, piece in self.pieces.get(hf_name, ()):
            targets.tensor(local_name)[boxes.as_slices(piece.local_box)] = tensor[boxes.as_slices(piece.hf_box)]
            targets.written(local_name, boxes.numel(piece.local_box))

    # -- what is held -----------------------------------------------------------------

    def _hold(self, nbytes: int) -> None:
        self._held += nbytes
        self.peak_temp_bytes = max(self.peak_temp_bytes, self._held)

    def _release(self, tensor: torch.Tensor | None) -> None:
        if tensor is not None:
            self._release_bytes(tensor.numel() * tensor.element_size())

    def _release_bytes(self, nbytes: int) -> None:
        self._held -= nbytes


def _full(shape) -> Box:
    return tuple((0, n) for n in shape)


def _last_bucket(stage: StageSchedule) -> dict[str, int]:
    last = {}
    for index, bucket in enumerate(stage.buckets):
        for entry in bucket.entries:
            last[entry.src_tensor] = index
    return last
