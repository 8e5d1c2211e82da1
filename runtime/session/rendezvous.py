"""One endpoint's connection to the others through the rendezvous store.

What the store carries besides the groups' own rendezvous: the connection number
(epoch), the plan agreement, a vote before every update, and heartbeats. Each
connect attempt lives inside one epoch (its store keys are prefixed with it), so
that after a failure every endpoint can agree and re-create its channels under
fresh keys, while a restarted process can tell an old connection from the one
being opened:

- the first trainer rank hosts the store and opens epoch 0, and a new epoch for
  each later connect attempt (a reconnect, or a retry after a refused connect);
- any other endpoint joins the current epoch unless it already tried that one
  (a reconnect, a retry, or a restarted process taking its old place), in which
  case it waits for the first trainer rank to open the next.

The vote lets every endpoint refuse an update (bad tensors, a stale plan) before
any byte moves, and everyone learns of it at once instead of by timeout.
"""

from __future__ import annotations

import socket
import time
from datetime import timedelta

from torch.distributed import PrefixStore, TCPStore

from shardsync.runtime.session.agreement import Silence, agree, first_refusal
from shardsync.runtime.errors import TransferError, UpdateFailedElsewhere, UpdateRefused
from shardsync.runtime.session.liveness import Heartbeat, silent_peers

EPOCH = "epoch"


def open_store(address: str, port: int, is_host: bool, timeout: float) -> TCPStore:
    """Host the store (bound to `address` only: loopback unless another is given; a
    plain TCPStore would listen on every interface), or reach it."""
    try:
        if not is_host:
            return TCPStore(address, port, None, False, timeout=timedelta(seconds=timeout))
        listener = socket.create_server((address, port), backlog=256)
        # the store owns the socket from here on
        return TCPStore(address, port, None, True, timeout=timedelta(seconds=timeout), wait_for_workers=False,
                        master_listen_fd=listener.detach())
    except (RuntimeError, OSError) as exc:
        role = "host" if is_host else "reach"
        raise TransferError(f"cannot {role} the rendezvous store at {address}:{port} within {timeout:.0f}s: "
                            f"{str(exc).splitlines()[0] if str(exc) else exc}") from None


def local_address(rendezvous_host: str) -> str:
    """This process's address on the rendezvous network, for its channels to listen on:
    loopback when the rendezvous is (the default), else the interface that routes there."""
    if rendezvous_host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((rendezvous_host, 9))  # no packet is sent: this only picks the route
        return probe.getsockname()[0]


class Session:
    def __init__(self, who: str, everyone: list[str], host_name: str, address: str, port: int, timeout: float):
        self.who = who
        self.everyone = everyone
        self.host_name = host_name  # the endpoint that hosts the store (the first trainer rank)
        self.address, self.port = address, port
        self.timeout = timeout
        self.store: TCPStore | None = None
        self.epoch: int | None = None
        self.heartbeat: Heartbeat | None = None

    @property
    def is_host(self) -> bool:
        return self.who == self.host_name

    def open(self) -> None:
        """Reach (or host) the store and take this endpoint's epoch; beat from now on."""
        if self.store is None:
            self.store = open_store(self.address, self.port, self.is_host, self.timeout)
        self.epoch = self._take_epoch()
        if self.heartbeat is None:
            self.heartbeat = Heartbeat(self.store, self.who)

    def agree(self, digest: str, inputs: dict) -> None:
        agree(PrefixStore(f"e{self.epoch}", self.store), self.who, self.everyone, digest, inputs, self.is_host,
              self.timeout)

    def updates_so_far(self, mine: int) -> int:
        """The update count everyone continues from in this epoch: the first trainer rank's."""
        key = f"e{self.epoch}/updates"
        if self.is_host:
            self.store.set(key, str(mine))
            return mine
        try:
            self.store.wait([key], timedelta(seconds=self.timeout))
        except RuntimeError:
            raise TransferError(f"connect: {self.host_name} did not say where updates resume within "
                                f"{self.timeout:.0f}s: {self.diagnose((self.host_name,))}") from None
        return int(self.store.get(key))

    def groups_store(self) -> PrefixStore:
        """Where this epoch's channels rendezvous."""
        return PrefixStore(f"e{self.epoch}", self.store)

    def vote(self, update: int, refusal: str | None) -> None:
        """Before an update: say whether this endpoint can take it, then hear everyone;
        raise UpdateRefused if anyone can't. No byte has moved yet."""
        self._post(f"u{update}", update, refusal)
        if refusal is not None:
            return  # the caller raises its own, more precise error
        found = self._hear(f"u{update}", "before the update", update)
        if found is not None:
            who, why, _ = found
            raise UpdateRefused(f"update {update}: refused before any byte moved by {why}")

    def outcome(self, update: int, failure: str | None) -> None:
        """After an update: say how it went here, then (if it went well) hear everyone,
        so that an endpoint whose own part completed still learns that the update failed
        elsewhere (UpdateFailedElsewhere). Best effort when failing: the store may be gone."""
        try:
            self._post(f"done{update}", update, failure)
        except RuntimeError:
            if failure is None:  # this part is whole; how the others fared cannot be known
                raise UpdateFailedElsewhere(f"update {update}: {self.diagnose(())}") from None
            return
        if failure is not None:
            return
        found = self._hear(f"done{update}", "after the update", update, failed=UpdateFailedElsewhere)
        if found is not None:
            who, why, missing = found
            waiting = f"; no word yet from {', '.join(missing)}" if missing else ""
            raise UpdateFailedElsewhere(f"update {update} failed: {why}{waiting}")

    def diagnose(self, peers: tuple[str, ...]) -> str:
        return silent_peers(self.store, peers, self.host_name)

    def close(self) -> None:
        self._stop_heartbeat()
        self.store = None

    def drop_client(self) -> None:
        """Forget the store connection so the next open reaches the store anew (its host
        may have restarted); the host keeps its store, which holds everyone's state."""
        if not self.is_host:
            self.close()

    def _stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    # -- internals ------------------------------------------------------------------

    def _post(self, stage: str, update: int, verdict: str | None) -> None:
        self.store.set(f"e{self.epoch}/{stage}/{self.who}", "ok" if verdict is None else f"{self.who}: {verdict}")
        if update > 2:  # the store stays small over many updates
            self.store.delete_key(f"e{self.epoch}/{stage.rstrip('0123456789')}{update - 2}/{self.who}")

    def _hear(self, stage: str, when: str, update: int, failed=TransferError):
        """Everyone's verdict on this stage of the update: None when all are ok, else
        (who, verdict, those not heard from yet). Silence past the timeout, or a store
        that cannot be reached, raises `failed`."""
        keys = {other: f"e{self.epoch}/{stage}/{other}" for other in self.everyone}
        try:
            return first_refusal(self.store, keys, self.timeout)
        except Silence as silence:
            raise failed(f"update {update}: no word from {silence} {when} within {self.timeout:.0f}s: "
                         f"{self.diagnose(tuple(silence.pending))}") from None
        except RuntimeError:
            raise failed(f"update {update}: {self.diagnose(())}") from None

    def _take_epoch(self) -> int:
        if self.is_host:
            current = self.store.add(EPOCH, 0)
            if self._has(f"e{current}/opened"):
                current = self.store.add(EPOCH, 1)
            self.store.set(f"e{current}/opened", "1")
            return current
        deadline = time.monotonic() + self.timeout
        while True:
            current = self.store.add(EPOCH, 0)
            tried = f"e{current}/tried/{self.who}"
            if not self._has(tried):
                self.store.set(tried, "1")
                return current
            if time.monotonic() > deadline:
                raise TransferError(f"connect: {self.who} waited {self.timeout:.0f}s for {self.host_name} to "
                                    f"connect again (it opens the next connection after {current})")
            time.sleep(0.05)

    def _has(self, key: str) -> bool:
        return self.store.check([key])
