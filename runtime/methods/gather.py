"""The baseline, selectable as `method="gather"`: what the common path does today.

Per pipeline stage, what RL frameworks do: every dense tensor's TP shards are
all-gathered over the stage's TP group; every expert's shards over its expert-TP
group, then over its expert-parallel group, so the stage's first rank holds every
expert whole. That rank turns them into full HF tensors, packs those in model order
into buckets of the same size as the shard path's and broadcasts each bucket to
every engine rank, which takes its share of each full tensor by the spec's vLLM
table (experts it does not hold under expert parallelism are dropped), or, for a
spec without one, hands it to the engine's own loader (`load_weights`, as vLLM
models have). Same transport (groups over the same store), same bucket size, same
cast while packing: a comparison with the shard path is a comparison of methods.

Only the transfer's senders take part: dense-DP-0 ranks in the dense gathers,
expert-DP-0 ranks in the expert gathers (a sender at dense DP rank above 0 is
there for its experts alone). Whole tensors are held at every gathering rank and at
the receivers: `peak_temp_bytes` records the most held at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import torch

from shardsync.runtime.methods.base import Context, OverChannels, engine_name, trainer_name
from shardsync.runtime.plan import boxes
from shardsync.runtime.plan import buckets as bucketing
from shardsync.runtime.plan.boxes import Box
from shardsync.runtime.plan.build import has_experts, is_expert
from shardsync.runtime.plan.layout import Layout, TrainerRank
from shardsync.runtime.reports import ChannelReport, Receipt
from shardsync.runtime.wire.channels import Channels
from shardsync.runtime.wire.bucket_copier import BucketCopier
from shardsync.runtime.wire.pipe import BucketPipe


@dataclass(frozen=True)
class FullCopy:
    """A box of a full HF tensor, at the same place on both ends (what `schedule` packs)."""

    src_tensor: str
    src_box: Box
    dst_tensor: str
    dst_box: Box


@dataclass(frozen=True)
class Step:
    """One Megatron tensor name of a stage. Every sender walks a stage's steps in the
    same order and takes part in the gathers of those it holds, which keeps each
    group's collectives in step and no two groups waiting on each other."""

    name: str  # as every rank names it: experts by their local index
    expert: bool
    hf: tuple[str, ...]  # the full HF tensors its gathers complete on the stage's first rank


@dataclass(frozen=True)
class StageSchedule:
    stage: int
    steps: tuple[Step, ...]
    buckets: tuple[bucketing.Bucket, ...]
    # where each gathered shard's pieces go: ("tp", t) for dense shards of TP rank t,
    # ("ep", r, t) for expert shards of EP rank r and expert-TP rank t -> {name: LocalTensor}
    tables: dict = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"broadcast-pp{self.stage}"

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.buckets)


def stage_schedules(module, cfg, layout: Layout, capacity: int) -> list[StageSchedule]:
    """Every stage's full HF tensors in the order its gathers complete them, packed into buckets."""
    shapes = module.hf_shapes(cfg)
    experts = has_experts(module, cfg)
    schedules = []
    for stage in range(layout.train_pp):
        tables = _stage_tables(module, cfg, layout, stage, experts)
        steps = []
        for name in _names_in_order(module, cfg, layout, stage):
            if name in tables[("tp", 0)]:
                steps.append(Step(name, False, _hf_names(tables[("tp", 0)][name])))
            else:  # an expert, by its local index: complete once every EP rank's one of that index arrived
                held = [tables[("ep", r, t)][name] for r in range(layout.train_ep) for t in range(layout.train_etp)]
                steps.append(Step(name, True, _hf_names(*held)))
        copies = [FullCopy(hf, _full(shapes[hf]), hf, _full(shapes[hf])) for step in steps for hf in step.hf]
        schedules.append(StageSchedule(stage, tuple(steps), bucketing.schedule(copies, capacity), tables))
    return schedules


def _stage_tables(module, cfg, layout: Layout, stage: int, experts: bool) -> dict:
    """Dense tensors of every TP rank and experts of every (EP, expert-TP) rank of a stage."""
    def table(tp: int, ep: int, etp: int) -> list:
        return module.megatron_shard_table(cfg, tp, layout.train_tp, stage, layout.train_pp,
                                           ep, layout.train_ep, etp, layout.train_etp)

    def held(tp: int, ep: int, etp: int, experts_only: bool) -> dict:
        return {local.name: local for local in table(tp, ep, etp)
                if is_expert(module, cfg, local.name) == experts_only}

    tables = {("tp", t): held(t, 0, 0, False) for t in range(layout.train_tp)}
    if experts:
        tables.update({("ep", r, t): held(0, r, t, True)
                       for r in range(layout.train_ep) for t in range(layout.train_etp)})
    return tables


def _names_in_order(module, cfg, layout: Layout, stage: int) -> list[str]:
    return [local.name for local in module.megatron_shard_table(cfg, 0, layout.train_tp, stage, layout.train_pp,
                                                                 0, layout.train_ep, 0, layout.train_etp)]


def _hf_names(*held) -> tuple[str, ...]:
    return tuple(dict.fromkeys(piece.hf_name for local in held for piece in local.pieces))


def gather_groups(layout: Layout, stage: int, experts: bool) -> list[tuple[str, tuple[TrainerRank, ...]]]:
    """A stage's gather groups: the dense TP group (dense-DP-0 ranks); per EP rank its
    expert-TP group, then per expert-TP rank its EP group (expert-DP-0 ranks). Member i
    is the rank at index i of the group's axis, which is how the stage's first rank
    knows whose shard each gathered output is. Groups of one member are not made."""
    senders = [s for s in layout.senders if s.pp == stage]
    groups = [(f"gather-pp{stage}", tuple(sorted((s for s in senders if s.dp == 0), key=lambda s: s.tp)))]
    if experts:
        holders = [s for s in senders if s.edp == 0]
        groups += [(f"gather-pp{stage}-etp-of-ep{r}", tuple(sorted((s for s in holders if s.ep == r),
                                                                   key=lambda s: s.etp)))
                   for r in range(layout.train_ep)]
        groups += [(f"gather-pp{stage}-ep-of-etp{t}", tuple(sorted((s for s in holders if s.etp == t),
                                                                   key=lambda s: s.ep)))
                   for t in range(layout.train_etp)]
    return [(name, members) for name, members in groups if len(members) > 1]


class GatherMethod(OverChannels):
    """One endpoint's side of the baseline: its stages' schedules, groups and buffers."""

    def __init__(self, context: Context):
        self.context = context
        module, cfg, layout = context.module, context.cfg, context.layout
        self.experts = has_experts(module, cfg)
        self.stages = stage_schedules(module, cfg, layout, context.capacity)
        self.shapes = module.hf_shapes(cfg)
        largest = max((b.numel for s in self.stages for b in s.buckets), default=0)
        self.pipe = BucketPipe(largest, context.dtype, context.device, verify=context.verify, overlap=context.overlap)
        # one batched kernel per bucket on CUDA (the full tensors are new at every update: its descriptors too)
        self.copier = BucketCopier(context.device, checksums=context.verify)
        self.elsize = torch.empty((), dtype=context.dtype).element_size()
        self.channels = Channels(context.device, context.timeout, context.channel_options)
        self.peak_temp_bytes = 0
        self._held = 0
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

    @property
    def _broadcasts(self) -> bool:
        """The stage's first rank converts and broadcasts; the others only gather."""
        me = self.context.trainer
        return me is not None and me == self.context.layout.trainer_at(me.pp, 0, 0)

    # -- set-up -----------------------------------------------------------------------

    def connect(self, store, watch) -> None:
        """Groups are joined in one global order (each stage's gathers, then its
        broadcast), every process following its part of it, so no join waits on
        another."""
        layout = self.context.layout
        me = self.context.trainer
        if me is not None:
            for name, members in gather_groups(layout, me.pp, self.experts):
                if me in members:
                    self.channels.join(store, name, members.index(me), tuple(map(trainer_name, members)), watch)
            if self._broadcasts:
                self._join_broadcast(store, me.pp, 0, watch)
                self.copier.load_kernels(self.context.dtype, self.stages[me.pp].buckets, to_bucket=True)
        else:
            engine, tp = self.context.engine
            for stage in self.stages:
                self._join_broadcast(store, stage.stage, 1 + engine * layout.infer_tp + tp, watch)

    def _join_broadcast(self, store, pp: int, member: int, watch) -> None:
        layout = self.context.layout
        peers = (trainer_name(layout.trainer_at(pp, 0)),) + tuple(
            engine_name(e, s) for e in range(layout.engines) for s in range(layout.infer_tp))
        self.channels.join(store, f"broadcast-pp{pp}", member, peers, watch)

    # -- updates ----------------------------------------------------------------------

    def send(self, tensors, update: int) -> tuple[ChannelReport, ...]:
        """Every sender of the stage gathers what it holds; the first rank converts,
        packs and broadcasts as the buckets need the tensors."""
        stage = self.stages[self.context.trainer.pp]
        started = time.perf_counter()
        waiting = list(stage.steps)
        if not self._broadcasts:
            for step in waiting:
                self._gather(step, stage, tensors, update)
            return (ChannelReport(f"gather-pp{stage.stage}", len(stage.steps), 0, time.perf_counter() - started),)
        broadcast = self.channels[stage.name]
        outbound = self.pipe.outbound(update)
        outbound.header(broadcast, len(stage.buckets))
        sending = outbound.sending(broadcast)
        full: dict[str, torch.Tensor] = {}
        last_use = _last_bucket(stage)
        for index, bucket in enumerate(stage.buckets):
            for entry in bucket.entries:
                while entry.src_tensor not in full:
                    full.update(self._gather(waiting.pop(0), stage, tensors, update))
            sending.put(bucket, lambda buffer: self.copier.pack((stage.stage, index), bucket, full, buffer))
            for name in [n for n in full if last_use[n] == index]:
                self._release(full.pop(name))
        for step in waiting:  # tensors without HF partners still take part in their gathers
            for tensor in self._gather(step, stage, tensors, update).values():
                self._release(tensor)
        sending.drain()
        outbound.close(broadcast)
        outbound.check()
        return (ChannelReport(stage.name, len(stage.steps), stage.numel * self.elsize,
                              time.perf_counter() - started),)

    def _gather(self, step: Step, stage: StageSchedule, tensors, update: int) -> dict[str, torch.Tensor]:
        """One step's gathers where this rank holds the tensor; on the stage's first rank,
        the full HF tensors they complete (held until packed), elsewhere nothing."""
        me = self.context.trainer
        if not (me.sends_experts if step.expert else me.sends_dense):
            return {}
        shard = tensors[step.name]
        gathered, held = (self._gather_expert if step.expert else self._gather_dense)(step.name, shard, stage, update)
        full = {}
        if self._broadcasts:
            for hf in step.hf:
                full[hf] = torch.empty(self.shapes[hf], dtype=shard.dtype, device=shard.device)
                self._hold(_nbytes(full[hf]))
            for key, piece_shard in gathered.items():
                for piece in stage.tables[key][step.name].pieces:
                    full[piece.hf_name][boxes.as_slices(piece.hf_box)] = piece_shard[boxes.as_slices(piece.local_box)]
        self._release_bytes(held)
        return full

    def _gather_dense(self, name: str, shard, stage: StageSchedule, update: int) -> tuple[dict, int]:
        """Every TP rank's shard, keyed by its table; and the bytes that holds."""
        group = self.channels.get(f"gather-pp{stage.stage}")
        if group is None:
            return {("tp", 0): shard}, 0
        shards = self._all_gather(group, shard.contiguous(), f"gathering {name} over TP", update)
        return {("tp", t): s for t, s in enumerate(shards)}, sum(map(_nbytes, shards))

    def _gather_expert(self, name: str, shard, stage: StageSchedule, update: int) -> tuple[dict, int]:
        """Local expert `name` of every EP rank, whole: its expert-TP shards gathered and
        joined as they came (rank order), then those joined tensors gathered over EP.
        The first rank cuts each back into its shards and places them by the tables,
        so no layout is assumed beyond what the tables say."""
        me, layout = self.context.trainer, self.context.layout
        etp_group = self.channels.get(f"gather-pp{stage.stage}-etp-of-ep{me.ep}")
        joined, held = shard.contiguous(), 0
        if etp_group is not None:
            parts = self._all_gather(etp_group, joined, f"gathering {name} over expert TP", update)
            joined = torch.cat(parts)
            self._hold(_nbytes(joined))
            self._release_bytes(sum(map(_nbytes, parts)))
            held = _nbytes(joined)
        ep_group = self.channels.get(f"gather-pp{stage.stage}-ep-of-etp{me.etp}")
        whole = [joined]
        if ep_group is not None:
            whole = self._all_gather(ep_group, joined, f"gathering {name} over EP", update)
            self._release_bytes(held)
            held = sum(map(_nbytes, whole))
        ep_ranks = range(layout.train_ep) if ep_group is not None else (me.ep,)
        gathered = {("ep", r, t): part for r, tensor in zip(ep_ranks, whole)
                    for t, part in enumerate(torch.split(tensor, shard.shape[0]))}
        return gathered, held

    def _all_gather(self, group, tensor, what: str, update: int) -> list[torch.Tensor]:
        outputs = [torch.empty_like(tensor) for _ in range(group.size)]
        self._hold(sum(map(_nbytes, outputs)))
        group.wait(group.all_gather(outputs, tensor), what, update)
        return outputs

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
        tensor is released once the consumer asks for the next one. A tensor that lies
        whole in one bucket is yielded as a view of it when this rank slices its share
        (the bucket stays put until the next is asked for), and one this rank holds no
        piece of is not assembled. A bucket that fails its checksum is recorded (the
        update then fails) and the stream goes on, so every member finishes the exchange."""
        for stage in self.stages:
            group = self.channels[stage.name]
            started = time.perf_counter()
            inbound.header(group, len(stage.buckets))
            remaining = {e.dst_tensor: boxes.numel(_full(self.shapes[e.dst_tensor]))
                         for b in stage.buckets for e in b.entries}
            full: dict[str, torch.Tensor] = {}
            for index, bucket, buffer, _intact in inbound.buckets(group, stage.buckets):
                for entry in bucket.entries:
                    name = entry.dst_tensor
                    source = buffer[entry.offset:entry.offset + entry.numel].view(boxes.shape(entry.dst_box))
                    if self.pieces is not None and name not in self.pieces:
                        continue  # not this rank's (an expert another EP rank holds)
                    if self.pieces is not None and entry.numel == remaining[name] == boxes.numel(
                            _full(self.shapes[name])):
                        remaining[name] = 0
                        yield name, source
                        continue
                    if name not in full:
                        full[name] = torch.empty(self.shapes[name], dtype=buffer.dtype, device=buffer.device)
                        self._hold(_nbytes(full[name]))
                    full[name][boxes.as_slices(entry.dst_box)] = source
                    remaining[name] -= entry.numel
                    if remaining[name] == 0:
                        tensor = full.pop(name)
                        yield name, tensor
                        self._release(tensor)
            inbound.close(group)
            reports.append(ChannelReport(stage.name, len(stage.steps), stage.numel * self.elsize,
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
            self._release_bytes(_nbytes(tensor))

    def _release_bytes(self, nbytes: int) -> None:
        self._held -= nbytes


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _full(shape) -> Box:
    return tuple((0, n) for n in shape)


def _last_bucket(stage: StageSchedule) -> dict[str, int]:
    last = {}
    for index, bucket in enumerate(stage.buckets):
        for entry in bucket.entries:
            last[entry.src_tensor] = index
    return last
