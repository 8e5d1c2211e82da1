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

from shardsync.runtime.methods.base import Context, OverChannels, engine_name, trainer_name
from shardsync.runtime.plan import boxes
from shardsync.runtime.plan import buckets as bucketing
from shardsync.runtime.plan.boxes import Box
from shardsync.runtime.reports import ChannelReport, Receipt
from shardsync.runtime.wire.channels import Channels
from shardsync.runtime.wire.pack import pack
from shardsync.runtime.wire.pipe import BucketPipe


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
            family, layer, expert = module.resolve(local.name, cfg)
            hf_of[local.name] = tuple(family.hf_names(layer, expert))
        copies = [FullCopy(hf, _full(shapes[hf]), hf, _full(shapes[hf])) for names in hf_of.values() for hf in names]
        schedules.append(StageSchedule(stage, tuple(hf_of), hf_of, bucketing.schedule(copies, capacity)))
    return schedules


class GatherMethod(OverChannels):
    """One endpoint's side of the baseline: its stages' schedules, groups and buffers."""

    def __init__(self, context: Context):
        self.context = context
        module, cfg, layout = context.module, context.cfg, context.layout
        self.stages = stage_schedules(module, cfg, layout, context.capacity)
        self.shapes = module.hf_shapes(cfg)
        largest = max((b.numel for s in self.stages for b in s.buckets), default=0)
        self.pipe = BucketPipe(largest, context.dtype, context.device, verify=context.verify, overlap=context.overlap)
        self.elsize = torch.empty((), dtype=context.dtype).element_size()
        self.channels = Channels(context.device, context.timeout, context.channel_options)
        self.peak_temp_bytes = 0
        self._held = 0
        if context.trainer is not None:
            pp = context.trainer.pp
            self.tables = {t: {local.name: local for local in module.megatron_shard_table(
                cfg, t, layout.train_tp, pp, layout.train_pp)} for t in range(layout.train_tp)}
        # HF name -> (vLLM tensor, piece) of this engine rank; None: the engine's loader takes full tensors
        self.pieces: dict[str, list] | None = None
        if context.engine is not None and module.VLLM_LAYOUT:
            self.pieces = {}
            for local in module.vllm_shard_table(cfg, context.engine[1], layout.infer_tp, layout.infer_ep):
                for piece in local.pieces:
                    self.pieces.setdefault(piece.hf_name, []).append((local.name, piece))

    @property
    def digest(self) -> str:
        """What every endpoint must have planned alike: the shard plan where the spec has
        one (receivers slice their share by it), else each bucket's tensors and boxes."""
        if self.context.plan is not None:
            return self.context.plan.digest
        body = [[s.stage, [[(e.dst_tensor, e.dst_box, e.offset) for e in b.entries] for b in s.buckets]]
                for s in self.stages]
        return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()


    # -- set-up -----------------------------------------------------------------------

    def connect(self, store, diagnose) -> None:
        layout = self.context.layout
        if self.context.trainer is not None:
            pp, tp = self.context.trainer.pp, self.context.trainer.tp
            if layout.train_tp > 1:
                peers = tuple(trainer_name(layout.trainer_at(pp, t)) for t in range(layout.train_tp))
                self.channels.join(store, f"gather-pp{pp}", tp, peers, diagnose)
            if tp == 0:
                self._join_broadcast(store, pp, 0, diagnose)
        else:
            engine, tp = self.context.engine
            for stage in self.stages:
                self._join_broadcast(store, stage.stage, 1 + engine * layout.infer_tp + tp, diagnose)

    def _join_broadcast(self, store, pp: int, member: int, diagnose) -> None:
        layout = self.context.layout
        peers = (trainer_name(layout.trainer_at(pp, 0)),) + tuple(
            engine_name(e, s) for e in range(layout.engines) for s in range(layout.infer_tp))
        self.channels.join(store, f"broadcast-pp{pp}", member, peers, diagnose)

    # -- updates ----------------------------------------------------------------------

    def send(self, tensors, update: int) -> tuple[ChannelReport, ...]:
        """All ranks of the stage gather; TP rank 0 converts, packs and broadcasts."""
        pp, tp = self.context.trainer.pp, self.context.trainer.tp
        stage = self.stages[pp]
        broadcast = self.channels.get(stage.name)
        started = time.perf_counter()
        outbound = self.pipe.outbound(update)
        if broadcast is not None:
            outbound.header(broadcast, len(stage.buckets))
            sending = outbound.sending(broadcast)
        full: dict[str, torch.Tensor] = {}
        waiting = list(stage.megatron)
        last_use = _last_bucket(stage)
        for index, bucket in enumerate(stage.buckets):
            for entry in bucket.entries:
                while entry.src_tensor not in full:
                    self._gather(waiting.pop(0), stage, tensors, full, tp, update)
            if broadcast is not None:
                sending.put(bucket, lambda buffer: pack(bucket, full, buffer))
            for name in [n for n in full if last_use[n] == index]:
                self._release(full.pop(name))
        if broadcast is None:
            return (ChannelReport(f"gather-pp{pp}", len(stage.megatron), 0, time.perf_counter() - started),)
        sending.drain()
        outbound.close(broadcast)
        outbound.check()
        return (ChannelReport(stage.name, len(stage.megatron), stage.numel * self.elsize,
                              time.perf_counter() - started),)

    def _gather(self, name: str, stage: StageSchedule, tensors, full: dict, tp: int, update: int) -> None:
        """One Megatron tensor's shards from every TP rank; full HF tensors on TP rank 0.
        A name without HF tensors here (none) still takes part in the collective."""
        shard = tensors[name]
        group = self.channels.get(f"gather-pp{stage.stage}")
        if group is None:
            shards = [shard]
        else:
            shards = [torch.empty_like(shard) for _ in range(group.size)]
            self._hold(sum(s.numel() * s.element_size() for s in shards))
            group.wait(group.all_gather(shards, shard.contiguous()), f"gathering {name}", update)
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

    def receive(self, sink, update: int) -> Receipt:
        """Every stage's buckets in order, assembled into full tensors: each sliced into
        this rank's share of the targets, or, without a vLLM table, handed to the
        engine's loader (`sink.load_weights`) as soon as it completes."""
        inbound = self.pipe.inbound(update)
        reports: list[ChannelReport] = []
        stream = self._full_tensors(inbound, reports)
        if self.pieces is not None:
            for hf_name, tensor in stream:
                self._slice(hf_name, tensor, sink)
            return Receipt(tuple(reports), tuple(inbound.corrupted), tuple(inbound.elsewhere))
        try:
            sink.load_weights(stream)
        finally:
            # drained whatever the loader did, so the channels stay in step for the next update
            left = tuple(hf_name for hf_name, _ in stream)
        return Receipt(tuple(reports), tuple(inbound.corrupted), tuple(inbound.elsewhere), left)

    def _full_tensors(self, inbound, reports: list):
        """Yield (HF name, full tensor) as each tensor's last bucket arrives; a yielded
        tensor is released once the consumer asks for the next one. A bucket that fails
        its checksum is recorded (the update then fails) and the stream goes on, so
        every member finishes the exchange."""
        for stage in self.stages:
            group = self.channels[stage.name]
            started = time.perf_counter()
            inbound.header(group, len(stage.buckets))
            remaining = {e.dst_tensor: boxes.numel(_full(self.shapes[e.dst_tensor]))
                         for b in stage.buckets for e in b.entries}
            full: dict[str, torch.Tensor] = {}
            for index, bucket, buffer, _intact in inbound.buckets(group, stage.buckets):
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
            inbound.close(group)
            reports.append(ChannelReport(stage.name, len(stage.megatron), stage.numel * self.elsize,
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
