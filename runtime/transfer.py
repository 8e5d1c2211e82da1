"""The API: a Sender on each trainer rank, a Receiver on each engine rank.

Each is built once (model config, its own position, the peers' parallelism, the
rendezvous address, bucket size, timeout), connected once, then called once per
update with the rank's local tensors. Channels persist between updates.

An update either completes everywhere or fails loudly: every endpoint first votes
on it (bad tensors refuse it before any byte moves), every wait has a timeout and
names the channel, the silent peer and the update, `verify=True` checks each
bucket's checksum, and a Receiver whose update did not complete is `stale` until a
later one does. After a failure, `reconnect()` on every endpoint (and `connect()` on
a restarted one) re-creates the channels under a new connection epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import torch

from shardsync import generated
from shardsync.runtime.plan import buckets as bucketing
from shardsync.runtime.wire import checksum
from shardsync.runtime.wire.channels import Group, create_group
from shardsync.runtime.wire.copy_graphs import BucketCopier
from shardsync.runtime.errors import PlanError, StaleWeightsError, TensorError, TransferError, UpdateFailedElsewhere
from shardsync.runtime.methods.gather import GatherMethod
from shardsync.runtime.plan import Channel, Layout, Plan, build_plan
from shardsync.runtime.session import Session, local_address
from shardsync.runtime.targets import as_loader, as_targets
from shardsync.runtime.tensor_checks import as_named, engine_findings, trainer_findings

DEFAULT_BUCKET_BYTES = 64 << 20
METHODS = ("auto", "shard", "gather")
log = logging.getLogger("shardsync")


@dataclass(frozen=True)
class ChannelReport:
    name: str
    copies: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class UpdateReport:
    update: int
    channels: tuple[ChannelReport, ...]

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.channels)


class _Endpoint:
    """What senders and receivers share: the plan, the store, the groups, the buffers."""

    def __init__(self, hf_config: dict, layout: Layout, *, rendezvous: str = "127.0.0.1:29555",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout: float = 60.0, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", make_vocab_size_divisible_by: int = 128, method: str = "auto",
                 overlap: bool = True, verify: bool = False, **group_options):
        architecture = (hf_config.get("architectures") or [None])[0]
        try:
            self.module = generated.for_architecture(architecture)
        except KeyError as exc:
            raise PlanError(str(exc.args[0])) from None
        self.method, self.method_reason = _choose_method(method, self.module)
        self.overlap = overlap  # pack bucket k+1 while bucket k is on the wire (off: one at a time)
        self.verify = verify  # a checksum per bucket, checked by the receivers
        self.gather: GatherMethod | None = None  # the baseline's state, with method="gather"
        self.cfg = self.module.config_from_hf(hf_config, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        self.layout = layout
        host, _, port = rendezvous.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.bucket_bytes = bucket_bytes
        self.timeout = timeout
        self.dtype = dtype
        self.device = torch.device(device)
        self.copier = BucketCopier(self.device)  # graphed on CUDA, plain foreach copies on the CPU
        # channels listen where the rendezvous is reachable: loopback by default
        self.group_options = {"host": local_address(self.host), **group_options}
        self.plan: Plan | None = None
        self.groups: dict[str, Group] = {}
        self.schedules: dict[str, dict[int, tuple[bucketing.Bucket, ...]]] = {}  # channel -> phase -> buckets
        self.buffers: list[torch.Tensor] = []
        self.tail = checksum.tail_elements(dtype) if verify else 0  # buffer elements after each bucket's data
        self.updates = 0
        self.session: Session | None = None

    # -- set-up ---------------------------------------------------------------------

    @property
    def who(self) -> str:
        raise NotImplementedError

    def _my_channels(self) -> list[Channel]:
        raise NotImplementedError

    def _member(self, channel: Channel) -> int:
        raise NotImplementedError

    def connect(self) -> None:
        """Plan, agree on the plan with every peer, then create this rank's channels."""
        if self.groups or self.gather is not None or (self.session is not None and self.session.epoch is not None):
            return  # persistent: already connected
        elsize = torch.empty((), dtype=self.dtype).element_size()
        capacity = max(1, self.bucket_bytes // elsize)
        # without a vLLM layout table there is nothing to plan shard to shard: the
        # gather method's schedule (full HF tensors in model order) is the plan
        plan = build_plan(self.module, self.cfg, self.layout, elsize) if self.module.VLLM_LAYOUT else None
        gather = GatherMethod(self, capacity) if self.method == "gather" else None
        if self.session is None:
            self.session = Session(self.who, self._everyone(), _trainer(0, 0), self.host, self.port, self.timeout)
        self.session.open()
        try:
            # the plan, and what shapes the wire beyond it (bucket size, dtype, checksums): all must agree
            inputs = self._inputs()
            planned = plan.digest if plan is not None else gather.digest
            digest = hashlib.sha256((planned + json.dumps(inputs, sort_keys=True)).encode()).hexdigest()
            self.session.agree(digest, inputs)
            self.updates = self.session.updates_so_far(self.updates)
            self.plan = plan
            self._create_channels(gather, capacity)
        except BaseException:
            self.session.epoch = None  # not connected: a later connect() tries again
            raise
        groups = self.gather.groups if self.gather is not None else self.groups
        for group in groups.values():
            group.diagnose = self.session.diagnose
        log.info("%s: method %s (%s): %s", self.who, self.method, self.method_reason, ", ".join(groups) or "no channel")

    def _create_channels(self, gather: GatherMethod | None, capacity: int) -> None:
        store = self.session.groups_store()
        if gather is not None:
            self.gather = gather
            self._connect_gather(store)
            return
        mine = self._my_channels()
        self.schedules = {c.name: _phased_schedule(c.copies, capacity) for c in mine}
        for channel in mine:
            peers = (_trainer(channel.pp, channel.tp),) + tuple(_engine(e, channel.dst_tp) for e in range(channel.engines))
            self.groups[channel.name] = create_group(
                store, channel.name, self._member(channel), peers, self.device, self.timeout, **self.group_options)
        largest = max((b.numel for s in self.schedules.values() for bs in s.values() for b in bs), default=0)
        # two buffers, shared by this rank's channels (it serves them one at a time)
        if largest and not self.buffers:
            self.buffers = [torch.empty(largest + self.tail, dtype=self.dtype, device=self.device) for _ in range(2)]

    def reconnect(self) -> None:
        """Re-create every channel of this endpoint under a new connection epoch: after a
        failed update (its channels may hold half an exchange), or when a peer restarted.
        Every endpoint of the transfer calls it (a restarted one calls connect()); the
        plan, buffers and the store's host stay."""
        self._close_channels()
        if self.session is not None:
            self.session.drop_client()
            self.session.epoch = None
        self.connect()

    def _connect_gather(self, store) -> None:
        raise NotImplementedError

    @property
    def buffer_bytes(self) -> int:
        buffers = self.gather.buffers if self.gather is not None else self.buffers
        return sum(b.numel() * b.element_size() for b in buffers)

    @property
    def peak_temp_bytes(self) -> int:
        """Whole tensors held beyond the buffers at any time (the gather path's; the shard
        path packs from views and holds none)."""
        return self.gather.peak_temp_bytes if self.gather is not None else 0

    def close(self) -> None:
        self._close_channels()
        if self.session is not None:
            self.session.close()
            self.session = None

    def _close_channels(self) -> None:
        for group in self.groups.values():
            group.close()
        self.groups.clear()
        if self.gather is not None:
            self.gather.close()
            self.gather = None

    def _everyone(self) -> list[str]:
        layout = self.layout
        trainers = [_trainer(pp, tp) for pp in range(layout.train_pp) for tp in range(layout.train_tp)]
        return trainers + [_engine(e, s) for e in range(layout.engines) for s in range(layout.infer_tp)]

    def _inputs(self) -> dict:
        """What both sides must agree on, by field, for a readable refusal."""
        return {
            "family": self.module.FAMILY,
            "spec_sha256": self.module.SPEC_SHA256,
            **{f"config.{k}": v for k, v in vars(self.cfg).items()},
            **{k: v for k, v in vars(self.layout).items()},
            "dtype": str(self.dtype).removeprefix("torch."),
            "bucket_bytes": self.bucket_bytes,
            "method": self.method,
            "verify": self.verify,
        }

    def _require_connected(self) -> None:
        if self.session is None or self.session.epoch is None:
            raise TransferError(f"{self.who}: update before connect() (or after close(), or a failed reconnect)")

    def _settled(self, number: int, transfer) -> tuple[ChannelReport, ...]:
        """Run this endpoint's part of the update, then learn how it went everywhere: a
        part that failed is reported to all; one that completed waits to hear the others."""
        try:
            reports = transfer()
        except BaseException as exc:
            self.session.outcome(number, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        self.session.outcome(number, None)
        return reports

    def _vote(self, number: int, finding: str | None) -> None:
        """Every endpoint says whether it can take this update; a refusal anywhere stops
        it everywhere before any byte moves."""
        self.updates = number  # consumed on every endpoint alike, refused or not
        self.session.vote(number, None if finding is None else f"{self.who}: {finding}")
        if finding is not None:
            raise TensorError(f"update {number}: {self.who} refused it before any byte moved: {finding}")

    def _run_update(self, header, move, finish) -> tuple[ChannelReport, ...]:
        """One update over this rank's channels: headers, then each phase (embedding,
        layer 0, layer 1, ..., head) on every channel, then acknowledgements.

        Every process walks its collectives in one global order (phase, then channel
        in plan order), which is what keeps overlapping channels from deadlocking,
        and lets an engine complete (and re-process) its layers one by one.
        """
        channels = self._my_channels()
        seconds = {c.name: 0.0 for c in channels}
        for channel in channels:
            header(channel, self.groups[channel.name])
        phases = sorted({phase for c in channels for phase in self.schedules[c.name]})
        for phase in phases:
            for channel in channels:
                schedule = self.schedules[channel.name].get(phase)
                if schedule:
                    started = time.perf_counter()
                    move(channel, self.groups[channel.name], phase, schedule)
                    seconds[channel.name] += time.perf_counter() - started
        for channel in channels:
            started = time.perf_counter()
            finish(channel, self.groups[channel.name])
            seconds[channel.name] += time.perf_counter() - started
        return tuple(ChannelReport(c.name, len(c.copies), c.numel * self.plan.dtype_bytes, seconds[c.name])
                     for c in channels)

    def _bucket_count(self, channel: Channel) -> int:
        """What the header announces: both ends derive it from the same schedule."""
        return sum(len(buckets) for buckets in self.schedules[channel.name].values())


class Sender(_Endpoint):
    """A trainer rank's end: sends the shards it holds, converted by box, to engines."""

    def __init__(self, hf_config: dict, layout: Layout, *, pp_rank: int, tp_rank: int, **options):
        super().__init__(hf_config, layout, **options)
        if not (0 <= pp_rank < layout.train_pp and 0 <= tp_rank < layout.train_tp):
            raise PlanError(f"trainer position pp{pp_rank} tp{tp_rank} is outside train_pp={layout.train_pp}, train_tp={layout.train_tp}")
        self.pp_rank, self.tp_rank = pp_rank, tp_rank

    @property
    def who(self) -> str:
        return _trainer(self.pp_rank, self.tp_rank)

    @property
    def src_rank(self) -> int:
        return self.layout.src_rank(self.pp_rank, self.tp_rank)

    def _my_channels(self) -> list[Channel]:
        return self.plan.channels_of_source(self.src_rank) if self.plan else []

    def _member(self, channel: Channel) -> int:
        return 0

    def _connect_gather(self, store) -> None:
        self.gather.connect_trainer(store, self.pp_rank, self.tp_rank, _trainer, _engine)

    def local_shapes(self) -> dict[str, tuple[int, ...]]:
        """The Megatron tensors this rank must hand to `update`, by name."""
        table = self.module.megatron_shard_table(self.cfg, self.tp_rank, self.layout.train_tp, self.pp_rank,
                                                 self.layout.train_pp)
        return {local.name: tuple(local.shape) for local in table}

    def update(self, tensors, allow_nonfinite: bool = False) -> UpdateReport:
        """Send this rank's Megatron tensors (a mapping, or (name, tensor) pairs, names as
        in its shard table) to every engine. Refused before any byte moves, on every
        endpoint, if a tensor is missing, extra, repeated, of the wrong shape or dtype,
        or holds NaN/Inf (unless `allow_nonfinite`)."""
        self._require_connected()
        number = self.updates + 1
        tensors, finding = as_named(tensors)
        finding = finding or trainer_findings(tensors, self.local_shapes(), self.device, allow_nonfinite)
        self._vote(number, finding)
        return UpdateReport(number, self._settled(number, lambda: self._send(tensors, number)))

    def _send(self, tensors: dict, number: int) -> tuple[ChannelReport, ...]:
        if self.gather is not None:
            return tuple(ChannelReport(*r) for r in self.gather.send(self.pp_rank, self.tp_rank, tensors, number))
        problems: list[str] = []

        def send(channel: Channel, group: Group, phase: int, schedule) -> None:
            in_flight: list = []
            depth = 2 if self.overlap else 1
            for index, bucket in enumerate(schedule):
                if len(in_flight) == depth:  # the buffer about to be packed is still on the wire
                    group.wait(in_flight.pop(0), f"sending bucket {index - depth} of phase {phase}", number)
                buffer = self.buffers[index % 2]
                wire = self.copier.pack((channel.name, phase, index), bucket, tensors, buffer)
                in_flight.append(group.broadcast(checksum.write(buffer, bucket.numel) if self.verify else wire))
            for work in in_flight:
                group.wait(work, f"sending the last buckets of phase {phase}", number)

        def header(channel: Channel, group: Group) -> None:
            group.send_header(number, self._bucket_count(channel), self.device)

        def finish(channel: Channel, group: Group) -> None:
            # a send completes once the bytes are on the socket: only the receivers'
            # acknowledgement says they arrived, passed their checksums and were written
            problem = group.acknowledge(0, "waiting for the receivers' acknowledgement", number)
            if problem:
                problems.append(f"channel {channel.name}: {group.peers[problem - 1]} received a bucket that "
                                f"failed its checksum")

        reports = self._run_update(header, send, finish)
        if problems:
            raise TransferError(f"update {number}: {'; '.join(problems)}")
        return reports


class Receiver(_Endpoint):
    """An engine rank's end: writes the pieces it is sent into its live tensors in place.

    Extra keyword arguments are forwarded to channel creation (the seed's receiver
    set-up dropped them and failed with a TypeError).
    """

    def __init__(self, hf_config: dict, layout: Layout, *, engine: int, tp_rank: int, **options):
        super().__init__(hf_config, layout, **options)
        if not (0 <= engine < layout.engines and 0 <= tp_rank < layout.infer_tp):
            raise PlanError(f"engine {engine} tp{tp_rank} is outside engines={layout.engines}, infer_tp={layout.infer_tp}")
        self.engine, self.tp_rank = engine, tp_rank
        self._expected: dict[str, int] | None = None  # derived from the plan on first use
        # why this rank's weights are not the last update's, or None: an update that did
        # not complete leaves a mix of old and new weights, which must not be served
        self.stale: str | None = None

    def check_fresh(self) -> None:
        """Raise StaleWeightsError if the last update did not complete (call before serving)."""
        if self.stale is not None:
            raise StaleWeightsError(f"{self.who} holds a mix of old and new weights: {self.stale}; "
                                    f"a later update must complete before it serves")

    @property
    def who(self) -> str:
        return _engine(self.engine, self.tp_rank)

    def _my_channels(self) -> list[Channel]:
        return self.plan.channels_of_engine_rank(self.tp_rank) if self.plan else []

    def _member(self, channel: Channel) -> int:
        return 1 + self.engine

    def _connect_gather(self, store) -> None:
        self.gather.connect_engine(store, self.engine, self.tp_rank, _trainer, _engine)

    @property
    def loads_full_tensors(self) -> bool:
        """No vLLM layout table: updates hand full HF tensors to the engine's own loader."""
        return not self.module.VLLM_LAYOUT

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The live tensors this rank must hand to `update`: by vLLM name, or by HF
        name (full tensors) for a spec without a vLLM layout table."""
        if self.loads_full_tensors:
            return self.module.hf_shapes(self.cfg)
        return dict(self.plan.dst_shapes[self.tp_rank]) if self.plan else {
            t.name: tuple(t.shape) for t in self.module.vllm_shard_table(self.cfg, self.tp_rank, self.layout.infer_tp)}

    def expected_numel(self) -> dict[str, int]:
        """Elements each destination tensor receives in an update (padding excluded)."""
        if self.plan is None:
            return {}
        if self._expected is None:
            self._expected = {}
            for channel in self._my_channels():
                for copy in channel.copies:
                    self._expected[copy.dst_tensor] = self._expected.get(copy.dst_tensor, 0) + copy.numel
        return self._expected

    def update(self, params) -> UpdateReport:
        """Receive one update into `params`, in place: a mapping of vLLM names to live
        tensors, or targets with the interface of `runtime.targets.TensorTargets`.
        Every element the plan sends is counted as written, or the update fails.

        For a spec without a vLLM layout table, `params` is the engine's loader (an
        object with `load_weights(iterable of (hf_name, tensor))`, as vLLM models
        have) or a mapping of HF names to full tensors; each full tensor is handed
        over as soon as its last bucket arrives.

        An update that fails once bytes have started to arrive marks this rank stale
        (`self.stale`, `check_fresh()`) until a later update completes; one refused
        before any byte moved changes nothing."""
        self._require_connected()
        number = self.updates + 1
        if self.loads_full_tensors:
            targets, finding = as_loader(params), None
        else:
            targets = as_targets(params)
            finding = engine_findings(targets.names(), targets.shape, getattr(targets, "dtype", lambda name: None),
                                      self.plan.dst_shapes[self.tp_rank], self.dtype)
        self._vote(number, finding)

        def receive() -> tuple[ChannelReport, ...]:
            if self.loads_full_tensors:
                return tuple(ChannelReport(*r) for r in self.gather.load(targets, number))
            return self._receive(targets, number)

        try:
            reports = self._settled(number, receive)
        except UpdateFailedElsewhere:
            self.stale = None  # this rank's weights are whole and new; the caller learns the update failed
            raise
        except BaseException as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.stale = f"update {number} did not complete ({why})"
            raise
        self.stale = None
        return UpdateReport(number, reports)

    def _receive(self, targets, number: int) -> tuple[ChannelReport, ...]:
        counting = _CountingTargets(targets)
        targets.begin_update()
        if self.gather is not None:
            reports = tuple(ChannelReport(*r) for r in self.gather.receive(counting, number))
            elsewhere, corrupted = self.gather.failed_elsewhere, self.gather.corrupted
        else:
            reports, elsewhere, corrupted = self._receive_shards(counting, number)
        if corrupted:
            raise TransferError(f"update {number}: {self.who}: {'; '.join(corrupted)}; the bucket was not written")
        expected = self.expected_numel()
        if counting.counts != expected:
            wrong = {n: (counting.counts.get(n, 0), e) for n, e in expected.items() if counting.counts.get(n, 0) != e}
            raise TransferError(f"update {number}: {self.who}: written elements differ from the plan (written, planned): {wrong}")
        targets.finish_update()
        if elsewhere:
            raise UpdateFailedElsewhere(f"update {number}: failed: {'; '.join(elsewhere)} ({self.who} took all of "
                                        f"its share)")
        return reports

    def _receive_shards(self, counting, number: int):
        """The shard path: this rank's channels, phase by phase, written by box; a bucket
        that fails its checksum is not written, and the acknowledgement says so."""
        corrupted: list[str] = []
        bad_channels: set[str] = set()
        elsewhere: list[str] = []

        def header(channel: Channel, group: Group) -> None:
            group.receive_header(number, self._bucket_count(channel), self.device)

        def receive(channel: Channel, group: Group, phase: int, schedule) -> None:
            size = [bucket.numel + self.tail for bucket in schedule]
            posted = [group.broadcast(self.buffers[i][:size[i]]) for i in range(min(2, len(schedule)))]
            for index, bucket in enumerate(schedule):
                group.wait(posted[index], f"receiving bucket {index} of phase {phase}", number)
                buffer = self.buffers[index % 2]
                mismatch = checksum.check(buffer, bucket.numel) if self.verify else None
                if mismatch is None:
                    self.copier.unpack((channel.name, phase, index), bucket, buffer, counting)
                else:
                    bad_channels.add(channel.name)
                    corrupted.append(f"channel {channel.name}: bucket {index} of phase {phase} failed its checksum "
                                     f"(sent {mismatch[0]}, computed {mismatch[1]})")
                if index + 2 < len(schedule):
                    posted.append(group.broadcast(buffer[:size[index + 2]]))

        def finish(channel: Channel, group: Group) -> None:
            mine = 1 + group.rank if channel.name in bad_channels else 0
            problem = group.acknowledge(mine, "acknowledging", number)
            if problem and problem != mine:
                elsewhere.append(f"channel {channel.name}: {group.peers[problem - 1]} received a bucket that failed "
                                 f"its checksum")

        return self._run_update(header, receive, finish), elsewhere, corrupted


class _CountingTargets:
    """Counts what each destination tensor was written, independently of the targets."""

    def __init__(self, targets):
        self.targets = targets
        self.counts: dict[str, int] = {}

    def tensor(self, name: str) -> torch.Tensor:
        return self.targets.tensor(name)

    def written(self, name: str, numel: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + numel
        self.targets.written(name, numel)


def _choose_method(method: str, module) -> tuple[str, str]:
    """(method, why): the shard path wherever the spec has a vLLM layout table."""
    if method not in METHODS:
        raise PlanError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "auto":
        if module.VLLM_LAYOUT:
            return "shard", f"{module.FAMILY} layout tables"
        return "gather", f"the {module.FAMILY} spec has no vLLM layout table; the engine's loader takes full tensors"
    if method == "shard" and not module.VLLM_LAYOUT:
        raise PlanError(f"method 'shard' needs a vLLM layout table and the {module.FAMILY} spec names no vllm "
                        f"tensors: add them, or use method 'auto' or 'gather'")
    return method, "asked for"


def _phased_schedule(copies, capacity: int) -> dict[int, tuple[bucketing.Bucket, ...]]:
    """Buckets per phase: a bucket never spans two phases."""
    by_phase: dict[int, list] = {}
    for copy in copies:
        by_phase.setdefault(copy.phase, []).append(copy)
    return {phase: bucketing.schedule(group, capacity) for phase, group in sorted(by_phase.items())}


def _trainer(pp: int, tp: int) -> str:
    return f"trainer pp{pp} tp{tp}"


def _engine(engine: int, tp: int) -> str:
    return f"engine {engine} tp{tp}"
