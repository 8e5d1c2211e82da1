"""Persistent channels: one stateless process group per plan channel.

Groups are built over a shared `TCPStore` (never the processes' default group,
which the trainer and the engine own), created once at connect, reused by every
update and shut down at close. Gloo carries CPU tensors, NCCL CUDA tensors. Every
blocking call has a timeout and fails with the channel, the peer and the update.
A method holds its groups in one `Channels`, which counts what it created: the
evidence that updates create none.

A wait on a group is also a wait on the rest of the transfer: a member whose peer
failed elsewhere (an engine of another channel killed, a trainer that gave up) would
otherwise wait out its whole timeout for a signal that will not come. So a gloo wait
that lasts asks the session, a few times a second, whether the update already failed,
and stops with that failure's words.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping, Protocol

import torch
from torch._C._distributed_c10d import AllreduceOptions, BroadcastOptions, GatherOptions, ReduceOp
from torch.distributed import PrefixStore, Store

from shardsync.runtime.errors import TransferError


WATCH_EVERY_S = 0.25  # how often a gloo wait that lasts asks whether the update failed elsewhere


class PeerWatch(Protocol):
    """What an endpoint's session knows of its peers while one of its waits lasts."""

    def diagnose(self, peers: tuple[str, ...]) -> str:
        """A sentence naming those of `peers` (or of the rest of the transfer) that went silent."""

    def failed_elsewhere(self, update: int) -> str | None:
        """Why `update` failed, once another endpoint said it did; None until then."""


@dataclass
class Group:
    """One channel's group: member 0 is the source, 1..K the engine replicas."""

    name: str
    rank: int
    size: int
    backend: object
    timeout: float
    peers: tuple[str, ...]  # a readable name per member
    device: torch.device
    watch: PeerWatch | None = None  # the session's news of the peers, set at connect

    def broadcast(self, tensor: torch.Tensor):
        options = BroadcastOptions()
        options.rootRank = 0
        options.rootTensor = 0
        return self.backend.broadcast([tensor], options)

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor):
        """Every member's `tensor` into `outputs` (one per member), on every member."""
        return self.backend.allgather([outputs], [tensor])

    def gather_at_source(self, tensor: torch.Tensor):
        """Every member's `tensor` to member 0, which hears each member directly: a member
        that is gone fails member 0's wait at once, not after a timeout elsewhere in a ring."""
        options = GatherOptions()
        options.rootRank = 0
        outputs = [[torch.empty_like(tensor) for _ in range(self.size)]] if self.rank == 0 else []
        return self.backend.gather(outputs, [tensor], options)

    def send_header(self, update: int, buckets: int) -> None:
        """Member 0 announces the update number and how many buckets follow."""
        self.wait(self.broadcast(torch.tensor([update, buckets], dtype=torch.int64, device=self.device)),
                  "sending the header", update)

    def receive_header(self, update: int, buckets: int) -> None:
        """Refuse an update whose announced number or bucket count is not the expected one."""
        announced = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.wait(self.broadcast(announced), "receiving the header", update)
        if announced.tolist() != [update, buckets]:
            raise TransferError(f"update {update}: channel {self.name}: the sender announced update "
                                f"{announced[0].item()} with {announced[1].item()} buckets; expected {buckets}")

    def max_across(self, tensor: torch.Tensor):
        options = AllreduceOptions()
        options.reduceOp = ReduceOp.MAX
        return self.backend.allreduce([tensor], options)

    def acknowledge(self, problem: int, what: str, update: int) -> int:
        """The closing exchange of an update: every member offers 0, or 1 + its own rank
        if it received something wrong; returns the largest offered (0: all well)."""
        value = torch.tensor([problem], dtype=torch.int64, device=self.device)
        self.wait(self.max_across(value), what, update)
        return int(value.item())

    def wait(self, work, what: str, update: int | None) -> None:
        """Wait for `work`, turning a timeout, a dead peer or a failure elsewhere in the
        update into a TransferError."""
        started = time.monotonic()
        try:
            failure = self._wait_watching(work, update, started + self.timeout)
        except RuntimeError as exc:
            elapsed = time.monotonic() - started
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            found = f"{self.watch.diagnose(self._others())}; " if self.watch is not None else ""
            raise TransferError(
                f"{self._waiting(what, update)} failed after {elapsed:.1f}s (timeout {self.timeout:.0f}s): "
                f"{found}{reason}"
            ) from None
        if failure is not None:
            raise TransferError(f"{self._waiting(what, update)}: stopped waiting after "
                                f"{time.monotonic() - started:.1f}s, the update failed elsewhere: {failure}")

    def _others(self) -> tuple[str, ...]:
        return tuple(p for i, p in enumerate(self.peers) if i != self.rank)

    def _waiting(self, what: str, update: int | None) -> str:
        """The start of a failed wait's message: when, on which channel, what, with whom."""
        when = f"update {update}" if update is not None else "connect"
        return f"{when}: channel {self.name}: {what} with {', '.join(self._others())}"

    def _wait_watching(self, work, update: int | None, deadline: float) -> str | None:
        """Wait for `work` until `deadline`; None once it completed. On gloo, in slices of
        WATCH_EVERY_S, between which the watch is asked whether the update failed
        elsewhere: if so, its words (the work is left to the group's close). NCCL waits
        once, for the whole timeout: a wait of its that times out may abort the
        communicator."""
        if self.watch is None or update is None or self.device.type != "cpu":
            work.wait(timedelta(seconds=self.timeout))
            return None
        while True:
            left = deadline - time.monotonic()
            try:
                work.wait(timedelta(seconds=max(min(WATCH_EVERY_S, left), 0.001)))
                return None
            except RuntimeError:
                if work.is_completed():  # it ended as the slice did: done, or its own failure raised here
                    work.wait(timedelta(seconds=self.timeout))
                    return None
                if time.monotonic() >= deadline:
                    raise
            failure = self.watch.failed_elsewhere(update)
            if failure is not None:
                return failure

    def close(self) -> None:
        try:
            self.backend.shutdown()
        except RuntimeError:
            pass  # a peer already gone; nothing left to release here


def create_group(store: Store, name: str, rank: int, peers: tuple[str, ...], device: torch.device,
                 timeout: float, **options) -> Group:
    """Join channel `name` as member `rank`. Blocks until every member has joined.

    Extra keyword options are accepted and forwarded so that callers (engine
    workers set up through a framework's hooks) can pass what they are given.
    """
    prefixed = PrefixStore(f"shardsync/{name}", store)
    started = time.monotonic()
    try:
        if device.type == "cuda":
            backend = _nccl(prefixed, rank, len(peers), timeout, device, **options)
        else:
            backend = _gloo(prefixed, rank, len(peers), timeout, **options)
    except RuntimeError as exc:
        others = ", ".join(p for i, p in enumerate(peers) if i != rank)
        raise TransferError(
            f"connect: channel {name}: joining with {others} failed after {time.monotonic() - started:.1f}s: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    return Group(name, rank, len(peers), backend, timeout, peers, device)


class Channels(Mapping[str, Group]):
    """The groups one method holds, by name: joined at connect, closed together.

    `created` counts every group joined through it, across reconnects, so that an
    endpoint can show its channels were made at connect and never during an update.
    """

    def __init__(self, device: torch.device, timeout: float, options: dict):
        self.device, self.timeout, self.options = device, timeout, options
        self._groups: dict[str, Group] = {}
        self.created = 0

    def __getitem__(self, name: str) -> Group:
        return self._groups[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._groups)

    def __len__(self) -> int:
        return len(self._groups)

    def join(self, store: Store, name: str, member: int, peers: tuple[str, ...], watch: PeerWatch | None) -> Group:
        group = create_group(store, name, member, peers, self.device, self.timeout, **self.options)
        group.watch = watch
        self._groups[name] = group
        self.created += 1
        return group

    def close(self) -> None:
        for group in self._groups.values():
            group.close()
        self._groups.clear()


def _gloo(store, rank: int, size: int, timeout: float, host: str = "127.0.0.1", **_unused):
    from torch._C._distributed_c10d import ProcessGroupGloo

    options = ProcessGroupGloo._Options()
    options._timeout = timedelta(seconds=timeout)
    options._devices = [ProcessGroupGloo.create_device(hostname=host)]
    return ProcessGroupGloo(store, rank, size, options)


def _nccl(store, rank: int, size: int, timeout: float, device: torch.device, **_unused):
    from torch._C._distributed_c10d import ProcessGroupNCCL

    options = ProcessGroupNCCL.Options()
    options._timeout = timedelta(seconds=timeout)
    torch.cuda.set_device(device)
    backend = ProcessGroupNCCL(store, rank, size, options)
    backend.eager_connect_single_device(device)
    return backend
