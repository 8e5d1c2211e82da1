"""The API: a Sender on each trainer rank, a Receiver on each engine rank.

Each is built once (model config, its own position, the peers' parallelism, the
rendezvous address, bucket size, timeout), connected once, then called once per
update with the rank's local tensors. Channels persist between updates.

An update either completes everywhere or fails loudly: every endpoint first votes
on it (bad tensors refuse it before any byte moves; colocated on a GPU with
`pack_ahead`, a NaN/Inf the trainers' packs find closes a gate the engines' copies
read on the device, and fails the update in its outcome: no byte is written either
way, `wire.device_gate`), every wait has a timeout and
names the channel, the silent peer and the update, `verify=True` checks each
bucket's checksum, and a Receiver whose update did not complete is `stale` until a
later one does. After a failure, `reconnect()` on every endpoint (and `connect()` on
a restarted one) re-creates the channels under a new connection epoch.

The endpoints own that session; the bytes are the method's (`runtime/methods/`),
which the endpoints hold without knowing which one it is.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch

from shardsync import generated
from shardsync.runtime import methods
from shardsync.runtime.device_wait import copies_not_run, stream_done_within
from shardsync.runtime.errors import PlanError, StaleWeightsError, TensorError, TransferError, UpdateFailedElsewhere
from shardsync.runtime.methods import METHODS, Context, Method
from shardsync.runtime.methods.base import engine_name, trainer_name
from shardsync.runtime.plan import Layout, Plan, build_plan
from shardsync.runtime.plan.build import source_table
from shardsync.runtime.reports import ChannelReport, PhaseClock, Receipt, UpdateReport
from shardsync.runtime.session import Session, local_address
from shardsync.runtime.targets import as_loader, as_targets
from shardsync.runtime.tensor_checks import (FiniteCheck, as_named, engine_findings, nonfinite_finding,
                                             trainer_names_finding, trainer_tensor_findings)

DEFAULT_BUCKET_BYTES = 64 << 20
log = logging.getLogger("shardsync")

__all__ = ["DEFAULT_BUCKET_BYTES", "METHODS", "ChannelReport", "Receiver", "Sender", "UpdateReport"]


class _Endpoint:
    """What senders and receivers share: the plan, the session, and the method."""

    def __init__(self, hf_config: dict, layout: Layout, *, rendezvous: str = "127.0.0.1:29555",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout: float = 60.0, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", make_vocab_size_divisible_by: int = 128, method: str = "auto",
                 overlap: bool = True, verify: bool = False, pack_ahead: bool = False, **channel_options):
        architecture = (hf_config.get("architectures") or [None])[0]
        try:
            self.module = generated.for_architecture(architecture)
        except KeyError as exc:
            raise PlanError(str(exc.args[0])) from None
        self.method, self.method_reason = methods.choose(method, self.module)
        self.overlap = overlap  # pack bucket k+1 while bucket k is on the wire (off: one at a time)
        self.verify = verify  # a checksum per bucket, checked by the receivers
        # a colocated trainer's: pack its whole update before the vote (engines take the option and ignore it)
        self.pack_ahead = pack_ahead
        self.cfg = self.module.config_from_hf(hf_config, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        self.layout = layout
        host, _, port = rendezvous.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.bucket_bytes = bucket_bytes
        self.timeout = timeout
        self.dtype = dtype
        self.device = _indexed(torch.device(device))
        # channels listen where the rendezvous is reachable: loopback by default
        self.channel_options = {"host": local_address(self.host), **channel_options}
        self.plan: Plan | None = None
        self.transport: Method | None = None  # built at the first connect, kept until the endpoint goes
        self.updates = 0
        self.session: Session | None = None

    # -- set-up ---------------------------------------------------------------------

    @property
    def who(self) -> str:
        raise NotImplementedError

    def _position(self) -> dict:
        """The `trainer` or `engine` position of this endpoint, for the method's Context."""
        raise NotImplementedError

    def connect(self) -> None:
        """Plan, agree on the plan with every peer, then create this rank's channels."""
        if self.session is not None and self.session.epoch is not None:
            return  # persistent: already connected
        if self.transport is None:
            self.transport = self._build_method()
        if self.session is None:
            self.session = Session(self.who, self._everyone(), trainer_name(self.layout.trainer(0)), self.host, self.port,
                                   self.timeout)
        self.session.open()
        try:
            # the plan, and what shapes the wire beyond it (bucket size, dtype, checksums): all must agree
            inputs = self._inputs()
            digest = hashlib.sha256((self.transport.digest + json.dumps(inputs, sort_keys=True)).encode()).hexdigest()
            self.session.agree(digest, inputs)
            self.updates = self.session.updates_so_far(self.updates)
            self.transport.connect(self.session.groups_store(), self.session)
        except BaseException:
            self.transport.close()  # what was joined is left: a later connect() tries again from scratch
            self.session.leave_epoch()  # done with this epoch's store: its host need not wait for this endpoint
            raise
        self.session.through(self.updates, connected=True)  # no more store reads until the next update
        log.info("%s: method %s (%s): %s", self.who, self.method, self.method_reason,
                 ", ".join(self.channels) or "no channel")

    def _build_method(self) -> Method:
        """Plan (without a vLLM layout table there is nothing to plan shard to shard: the
        gather method's schedule of full HF tensors is the plan), then the method."""
        elsize = torch.empty((), dtype=self.dtype).element_size()
        position = self._position()
        if self.module.VLLM_LAYOUT:
            self.plan = build_plan(self.module, self.cfg, self.layout, elsize)
        context = Context(module=self.module, cfg=self.cfg, layout=self.layout, plan=self.plan,
                          dtype=self.dtype, device=self.device, capacity=max(1, self.bucket_bytes // elsize),
                          timeout=self.timeout, verify=self.verify, overlap=self.overlap,
                          pack_ahead=self.pack_ahead and position["trainer"] is not None,
                          channel_options=self.channel_options, **position)
        return methods.build(self.method, context)

    def reconnect(self) -> None:
        """Re-create every channel of this endpoint under a new connection epoch: after a
        failed update (its channels may hold half an exchange), or when a peer restarted.
        Every endpoint of the transfer calls it (a restarted one calls connect()); the
        plan, buffers and the store's host stay."""
        if self.transport is not None:
            self.transport.close()
        if self.session is not None:
            self.session.drop_client()
            self.session.leave_epoch()
        self.connect()

    @property
    def channels(self) -> dict:
        """This endpoint's live channels by name (empty before connect and after close)."""
        return dict(self.transport.channels) if self.transport is not None else {}

    @property
    def channels_created(self) -> int:
        """Channels this endpoint created, over every connect: at connect, 0 during updates."""
        return self.transport.channels_created if self.transport is not None else 0

    @property
    def mappings_created(self) -> int:
        """Shared buffers and events this endpoint created or mapped (colocated method),
        over every connect: at connect, 0 during updates."""
        return self.transport.mappings_created if self.transport is not None else 0

    @property
    def buffer_bytes(self) -> int:
        return self.transport.buffer_bytes if self.transport is not None else 0

    @property
    def peak_temp_bytes(self) -> int:
        """Whole tensors held beyond the buffers at any time (the gather method's; the
        shard method packs from views and holds none)."""
        return self.transport.peak_temp_bytes if self.transport is not None else 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.session is not None:
            self.session.close()
            self.session = None

    def _everyone(self) -> list[str]:
        layout = self.layout
        trainers = [trainer_name(src) for src in layout.senders]
        return trainers + [engine_name(e, s) for e in range(layout.engines) for s in range(layout.infer_tp)]

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

    def _settled(self, number: int, transfer, clock: PhaseClock):
        """Run this endpoint's part of the update, then learn how it went everywhere: a
        part that failed is reported to all; one that completed waits to hear the others."""
        try:
            with clock.phase("transfer"):
                result = transfer()
        except BaseException as exc:
            self.session.outcome(number, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        with clock.phase("outcome"):
            self.session.outcome(number, None)
        return result

    def _vote(self, number: int, finding: str | None, clock: PhaseClock) -> None:
        """Every endpoint says whether it can take this update; a refusal anywhere stops
        it everywhere before any byte moves."""
        self.updates = number  # consumed on every endpoint alike, refused or not
        with clock.phase("vote"):
            self.session.vote(number, None if finding is None else f"{self.who}: {finding}")
        if finding is not None:
            raise TensorError(f"update {number}: {self.who} refused it before any byte moved: {finding}")


class Sender(_Endpoint):
    """A trainer rank's end: sends the shards it holds, converted by box, to engines."""

    def __init__(self, hf_config: dict, layout: Layout, *, pp_rank: int, tp_rank: int, dp_rank: int = 0, **options):
        super().__init__(hf_config, layout, **options)
        self.position = layout.trainer_at(pp_rank, tp_rank, dp_rank)
        if not (self.position.sends_dense or self.position.sends_experts):
            raise PlanError(f"trainer pp{pp_rank} tp{tp_rank} dp{dp_rank} holds only replicas (dense and expert "
                            f"data-parallel rank both above 0): it takes no part in the transfer")
        self.pp_rank, self.tp_rank, self.dp_rank = pp_rank, tp_rank, dp_rank
        self._local_shapes: dict[str, tuple[int, ...]] | None = None
        self._all_finite = FiniteCheck(self.timeout)  # keeps what it prepared for the tensors of the last update
        # packed ahead with the engines gated on the device: the NaN/Inf check still to read after the vote
        self._check_after_vote = None

    @property
    def who(self) -> str:
        return trainer_name(self.position)

    @property
    def src_rank(self) -> int:
        """The rank's global number in the trainer's world, as megatron-core numbers it."""
        return self.position.rank

    def _position(self) -> dict:
        return {"trainer": self.position, "engine": None}

    def connect(self) -> None:
        super().connect()
        if not self.pack_ahead:  # (packed ahead, the packs flag NaN/Inf: no check of its own runs)
            self._all_finite.load(self.device)  # its modules now, not in the first update's check

    def local_shapes(self) -> dict[str, tuple[int, ...]]:
        """The Megatron tensors this rank must hand to `update`, by name: its dense
        tensors at dense DP rank 0, its experts at expert DP rank 0. (Derived once: every
        update checks its tensors against them.)"""
        if self._local_shapes is None:
            self._local_shapes = {local.name: tuple(local.shape)
                                  for local in source_table(self.module, self.cfg, self.layout, self.position)}
        return dict(self._local_shapes)

    def update(self, tensors, allow_nonfinite: bool = False) -> UpdateReport:
        """Send this rank's Megatron tensors (a mapping, or (name, tensor) pairs, names as
        in its shard table) to every engine. Refused before any byte moves, on every
        endpoint, if a tensor is missing, extra, repeated, of the wrong shape or dtype,
        or holds NaN/Inf (unless `allow_nonfinite`)."""
        self._require_connected()
        number = self.updates + 1
        clock = PhaseClock()
        with clock.phase("checks"):
            tensors, finding = as_named(tensors)
            finding = finding or trainer_names_finding(tensors, self.local_shapes())
            finding = finding or self._packed_and_checked(tensors, number, allow_nonfinite)
        self._vote(number, finding, clock)
        reports = self._settled(number, lambda: self._sent_and_checked(tensors, number), clock)
        return UpdateReport(number, reports, clock.seconds)

    def _sent_and_checked(self, tensors: dict, number: int) -> tuple[ChannelReport, ...]:
        """Send; then, where the engines' copies were gated on the device by the packs'
        NaN/Inf flags, read this rank's: a NaN or Inf fails the update in its outcome,
        which every endpoint hears, though no engine wrote a byte of it."""
        reports = self.transport.send(tensors, number)
        after_vote, self._check_after_vote = self._check_after_vote, None
        if after_vote is not None:
            finding = nonfinite_finding(tensors, self.local_shapes(), lambda: not after_vote())
            if finding is not None:
                raise TensorError(f"update {number}: {self.who}: {finding}; no engine wrote a byte of it (their "
                                  f"copies were gated on the device by the packs' NaN/Inf flags)")
        return reports

    def _packed_and_checked(self, tensors: dict, number: int, allow_nonfinite: bool) -> str | None:
        """Check the tensors' shapes, dtypes and device, and pack the update ahead where the
        method does (its packs flag NaN/Inf on the way), then look for NaN/Inf: in what the
        packs flagged, else in one pass of its own over the tensors. A problem, even one
        the device did not get to in time, is a finding.

        Packed ahead, each pack's tensors are checked just before it reads them: the first
        pack is launched after a look at its own tensors, not at every tensor of the update
        (host time the device would wait for), and none reads a tensor not checked."""
        self._check_after_vote = None
        shapes, checked = self.local_shapes(), set()

        def vet(names) -> None:
            unchecked = [name for name in names if name not in checked]
            finding = trainer_tensor_findings(tensors, shapes, self.device, unchecked)
            if finding is not None:
                raise TensorError(finding)
            checked.update(unchecked)

        try:
            packed = self.transport.pack_ahead(tensors, number, nonfinite_allowed=allow_nonfinite, vet=vet)
        except TensorError as exc:
            return str(exc)
        except TransferError as exc:
            return f"packing the update ahead of the vote failed: {exc}"
        finding = trainer_tensor_findings(tensors, shapes, self.device, [n for n in shapes if n not in checked])
        if finding is not None or allow_nonfinite:
            return finding
        check = self._all_finite
        if packed is not None and packed.after_vote is not None:
            self._check_after_vote = packed.after_vote  # the engines' copies wait for it on the device, not the vote
            return None
        if packed is not None:
            return nonfinite_finding(tensors, shapes, lambda: check.read(packed.flag))
        return nonfinite_finding(tensors, shapes, lambda: check([tensors[name] for name in shapes]))


class Receiver(_Endpoint):
    """An engine rank's end: writes the pieces it is sent into its live tensors in place.

    Extra keyword arguments are forwarded to channel creation, as a Sender's are: a
    framework's channel options must reach both ends of every channel.
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
        return engine_name(self.engine, self.tp_rank)

    def _position(self) -> dict:
        return {"trainer": None, "engine": (self.engine, self.tp_rank)}

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
            t.name: tuple(t.shape) for t in self.module.vllm_shard_table(self.cfg, self.tp_rank, self.layout.infer_tp,
                                                                           self.layout.infer_ep)}

    def expected_numel(self) -> dict[str, int]:
        """Elements each destination tensor receives in an update (padding excluded)."""
        if self.plan is None:
            return {}
        if self._expected is None:
            self._expected = {}
            for channel in self.plan.channels_of_engine_rank(self.tp_rank):
                for copy in channel.copies:
                    self._expected[copy.dst_tensor] = self._expected.get(copy.dst_tensor, 0) + copy.numel
        return self._expected

    def update(self, params) -> UpdateReport:
        """Receive one update into `params`, in place: a mapping of vLLM names to live
        tensors, or targets with the interface of `runtime.targets.Targets`.
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
        clock = PhaseClock()
        with clock.phase("checks"):
            if self.loads_full_tensors:
                sink, finding = as_loader(params), None
            else:
                sink = as_targets(params)
                finding = engine_findings(sink.names(), sink.shape, getattr(sink, "dtype", lambda name: None),
                                          self.plan.dst_shapes[self.tp_rank], self.dtype)
        self._vote(number, finding, clock)
        try:
            reports, gated_off = self._settled(number, lambda: self._receive(sink, number), clock)
        except UpdateFailedElsewhere:
            # this rank's weights are whole: new, or, where a gate on the device kept its copies from writing
            # an update a trainer's packs found NaN/Inf in, the last update's; the caller learns it failed
            self.stale = None
            raise
        except BaseException as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.stale = f"update {number} did not complete ({why})"
            raise
        if gated_off:  # (every endpoint said it went well: the trainers saw no NaN/Inf its gate saw)
            self.stale = (f"update {number} completed elsewhere while a gate on the device kept this rank's copies "
                          f"from writing it")
            raise TransferError(f"update {number}: {self.who}: {self.stale}")
        self.stale = None
        return UpdateReport(number, reports, clock.seconds)

    def _receive(self, sink, number: int) -> tuple[tuple[ChannelReport, ...], bool]:
        """The method moves the bytes; this judges what it saw: a bad bucket here, a
        loader that stopped early or elements the plan did not expect fail the update
        here, a bad bucket elsewhere fails it after this rank took its whole share.
        Also returns whether a gate on the device kept the copies from writing: then
        the trainer whose packs found a NaN/Inf fails the update in its outcome."""
        counting = None if self.loads_full_tensors else _CountingTargets(sink)
        if counting is not None:
            sink.begin_update()
        receipt: Receipt = self.transport.receive(counting or sink, number)
        self._wait_for_device(number, receipt.waits_on)
        if receipt.corrupted:
            raise TransferError(f"update {number}: {self.who}: {'; '.join(receipt.corrupted)}")
        if receipt.unloaded:
            raise TransferError(f"update {number}: {self.who}: the engine's loader stopped before taking "
                                f"{len(receipt.unloaded)} tensor(s), first {receipt.unloaded[0]}")
        if counting is not None:
            expected = self.expected_numel()
            if counting.counts != expected:
                wrong = {n: (counting.counts.get(n, 0), e) for n, e in expected.items()
                         if counting.counts.get(n, 0) != e}
                raise TransferError(f"update {number}: {self.who}: written elements differ from the plan "
                                    f"(written, planned): {wrong}")
            sink.finish_update()
        if receipt.elsewhere:
            raise UpdateFailedElsewhere(f"update {number}: failed: {'; '.join(receipt.elsewhere)} ({self.who} took "
                                        f"all of its share)")
        return receipt.channels, receipt.gated_off is not None and receipt.gated_off()

    def _wait_for_device(self, number: int, waits_on: tuple[str, ...] = ()) -> None:
        """On CUDA the method only queued this rank's copies: wait until they ran, so that
        a completed update means the weights are in place whatever stream reads them next,
        and a copy that failed on the device fails this update (leaving the rank stale).
        Bounded: the copies may wait on a trainer's interprocess events (those of
        `waits_on` too, where a gate waited for every trainer's packs)."""
        if self.device.type != "cuda" or stream_done_within(torch.cuda.current_stream(self.device), self.timeout):
            return
        fed_by = {trainer_name(c.src) for c in self.plan.channels_of_engine_rank(self.tp_rank)} if self.plan else set()
        feeding = sorted(fed_by | set(waits_on))
        raise TransferError(f"update {number}: {self.who}: "
                            + copies_not_run("its copies", self.timeout, ", ".join(feeding) or "the trainer ranks"))


def _indexed(device: torch.device) -> torch.device:
    """"cuda" as the device it means now (the current one): every stream lookup of an
    update (several a bucket) then reads the index instead of asking CUDA again which
    device is current, host time that on one GPU shared by four processes lies between
    the device's phases."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


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
