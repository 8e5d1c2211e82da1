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

The store lives in the first trainer rank's process, which may close and exit as soon
as its own part of the last update is settled, while a slower endpoint is still
reading that update's votes or outcomes. So every endpoint says when it is through
with the store for a step (`e{epoch}/through/{who}`: the last update it read the
outcome of, the count it resumed from once connected, or `closed`), and the host's
close keeps the store up until every peer is through with the host's last step, has
closed, or has stopped beating (gone), bounded by the timeout.
"""

from __future__ import annotations

import logging
import socket
import time
from datetime import timedelta

from torch.distributed import PrefixStore, TCPStore

from shardsync.runtime.session.agreement import (Silence, SpeakForTheGone, agree, first_refusal, post_verdict,
                                                  round_keys)
from shardsync.runtime.errors import TransferError, UpdateFailedElsewhere, UpdateRefused
from shardsync.runtime.session.liveness import SILENT_AFTER_S, Heartbeat, Watch, silent_peers, stop_beats

EPOCH = "epoch"
CLOSED = "closed"  # the value of a `through` key once its endpoint closed
log = logging.getLogger("shardsync")


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
        # the last step this endpoint is through with in this epoch: (update count, in words)
        self._through: tuple[int, str] | None = None

    @property
    def is_host(self) -> bool:
        return self.who == self.host_name

    def open(self) -> None:
        """Reach (or host) the store and take this endpoint's epoch; beat from now on."""
        if self.store is None:
            self.store = open_store(self.address, self.port, self.is_host, self.timeout)
        self.epoch = self._take_epoch()
        self._through = None
        if self.heartbeat is None or not self.heartbeat.beating:  # (one stops when its store's host closes it)
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
        going_ahead = False
        try:
            decided_ok = self._post(f"u{update}", update, refusal)
            if refusal is not None:
                return  # the caller raises its own, more precise error
            found = None if decided_ok else self._hear(f"u{update}", "before the update", update)
            if found is not None:
                who, why, _ = found
                raise UpdateRefused(f"update {update}: refused before any byte moved by {why}")
            going_ahead = True
        finally:
            if not going_ahead:  # the update ends here: nothing more of it to read
                self.through(update)

    def outcome(self, update: int, failure: str | None) -> None:
        """After an update: say how it went here, then (if it went well) hear everyone,
        so that an endpoint whose own part completed still learns that the update failed
        elsewhere (UpdateFailedElsewhere). Best effort when failing: the store may be gone.
        Either way this endpoint is then through with the update (`through`)."""
        try:
            self._outcome(update, failure)
        finally:
            self.through(update)

    def _outcome(self, update: int, failure: str | None) -> None:
        try:
            decided_ok = self._post(f"done{update}", update, failure)
        except RuntimeError:
            if failure is None:  # this part is whole; how the others fared cannot be known
                raise UpdateFailedElsewhere(f"update {update}: {self.diagnose(())}") from None
            return
        if failure is not None or decided_ok:
            return
        found = self._hear(f"done{update}", "after the update", update, failed=UpdateFailedElsewhere)
        if found is not None:
            who, why, missing = found
            waiting = f"; no word yet from {', '.join(missing)}" if missing else ""
            raise UpdateFailedElsewhere(f"update {update} failed: {why}{waiting}")

    def through(self, update: int, connected: bool = False) -> None:
        """This endpoint needs the store no more for `update`: it read the update's outcome
        (or its refusal, or gave up on it), or, `connected`, it finished connecting and
        `update` is the count it resumes from. The host's close waits for every peer to
        be through with the host's own last step. Best effort: the store may be gone."""
        self._through = (update, f"connecting (epoch {self.epoch})" if connected else f"update {update}")
        if self.is_host:
            return  # the host waits for the others, never for itself
        try:
            self.store.set(self._through_key(self.who), str(update))
        except RuntimeError:
            pass  # the store is gone: nobody is left waiting for this

    def failed_elsewhere(self, update: int) -> str | None:
        """Why `update` failed, once an endpoint posted its failure (which decides the
        outcome's round: this endpoint, still waiting, has posted nothing); None until
        then, or when the store cannot say (the wait goes on and reports its own way)."""
        stage = f"done{update}"
        try:
            if not self._has(self._decided(stage)):
                return None
            found = first_refusal(self.store, self._verdict_keys(stage), self.timeout, self._decided(stage))
        except (RuntimeError, Silence):
            return None
        return found[1] if found is not None else None

    def diagnose(self, peers: tuple[str, ...]) -> str:
        others = tuple(p for p in self.everyone if p != self.who) if peers else ()
        return silent_peers(self.store, peers, self.host_name, others)

    def close(self) -> None:
        """Leave the store. The host first keeps it up for the peers still reading it
        (`_wait_until_peers_are_through`); any other endpoint says it closed and goes."""
        if self.is_host:
            self._wait_until_peers_are_through()
            self._stop_heartbeat()
        else:  # beats no more before it says so: the host may take the store down at once
            self._stop_heartbeat()
            self._say_closed()
        self.store = None

    def leave_epoch(self) -> None:
        """Done with this connection (a connect that failed, a reconnect): the next connect
        takes a new epoch, and the host need not wait for this endpoint in this one."""
        if not self.is_host:
            self._say_closed()
        self.epoch = None
        self._through = None

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

    def _through_key(self, who: str) -> str:
        return f"e{self.epoch}/through/{who}"

    def _say_closed(self) -> None:
        if self.store is None or self.epoch is None:
            return
        try:
            self.store.set(self._through_key(self.who), CLOSED)
        except RuntimeError:
            pass  # the store is gone already

    def _wait_until_peers_are_through(self) -> None:
        """Hold the store until every peer is through with this host's last step (or closed),
        or stopped beating for SILENT_AFTER_S (gone: nobody is left to read), or the
        timeout passed; a warning names those never heard from. Polls with a growing
        pause (1 to 20 ms): once, at close, where a peer that died must not hold it for long."""
        if self.store is None or self.epoch is None or self._through is None:
            return  # not connected in this epoch: no step anyone could still be reading
        step, what = self._through
        peers = [p for p in self.everyone if p != self.who]
        keys = {p: self._through_key(p) for p in peers}
        watch = Watch(self.store)
        deadline = time.monotonic() + self.timeout
        pending, gone, still_open, pause = list(peers), [], [], 0.001
        try:
            while pending:
                present = [p for p in pending if self.store.check([keys[p]])]
                said = self.store.multi_get([keys[p] for p in present]) if present else []
                for peer, value in zip(present, said):
                    if value == CLOSED.encode() or (value.isdigit() and int(value) >= step):
                        pending.remove(peer)
                        if value != CLOSED.encode():
                            still_open.append(peer)
                for peer in watch.gone(pending):
                    pending.remove(peer)
                    gone.append(peer)
                if not pending or time.monotonic() > deadline:
                    break
                time.sleep(pause)
                pause = min(2 * pause, 0.02)
            stop_beats(self.store, still_open + pending)
        except RuntimeError as exc:
            log.warning("%s: closing the rendezvous store while waiting for %s to be through with %s: "
                        "the store failed: %s", self.who, ", ".join(pending), what,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return
        if gone:
            log.warning("%s: closing the rendezvous store without word that %s %s through with %s "
                        "(no %s): no heartbeat for %.0fs, gone", self.who, ", ".join(gone),
                        "is" if len(gone) == 1 else "are", what, ", ".join(keys[p] for p in gone), SILENT_AFTER_S)
        if pending:
            log.warning("%s: closing the rendezvous store after %.0fs without word that %s %s through with %s "
                        "(no %s), though still beating: a read of the store left there will fail",
                        self.who, self.timeout, ", ".join(pending), "is" if len(pending) == 1 else "are", what,
                        ", ".join(keys[p] for p in pending))

    def _post(self, stage: str, update: int, verdict: str | None) -> bool:
        """Post this endpoint's verdict on a stage; True where it was the last, every one "ok"."""
        said = "ok" if verdict is None else f"{self.who}: {verdict}"
        decided_ok = post_verdict(self.store, self._verdict_keys(stage), self.who, said, self._decided(stage))
        if update > 2:  # the store stays small over many updates
            old = f"{stage.rstrip('0123456789')}{update - 2}"
            keys = round_keys(self._verdict_keys(old), self.who, self._decided(old))
            if self.heartbeat is not None and self.heartbeat.beating:
                self.heartbeat.discard(keys)  # at its next beat: no round trip inside the update
            else:
                for key in keys:
                    self.store.delete_key(key)
        return decided_ok

    def _hear(self, stage: str, when: str, update: int, failed=TransferError):
        """Everyone's verdict on this stage of the update: None when all are ok, else
        (who, verdict, those not heard from yet). Silence past the timeout, or a store
        that cannot be reached, raises `failed`."""
        keys, decided = self._verdict_keys(stage), self._decided(stage)
        if self.heartbeat is not None:
            self.heartbeat.watch_round(SpeakForTheGone(keys, self.who, decided))
        try:
            return first_refusal(self.store, keys, self.timeout, decided)
        except Silence as silence:
            raise failed(f"update {update}: no word from {silence} {when} within {self.timeout:.0f}s: "
                         f"{self.diagnose(tuple(silence.pending))}") from None
        except RuntimeError:
            raise failed(f"update {update}: {self.diagnose(())}") from None
        finally:
            if self.heartbeat is not None:
                self.heartbeat.watch_round(None)

    def _verdict_keys(self, stage: str) -> dict[str, str]:
        return {other: f"e{self.epoch}/{stage}/{other}" for other in self.everyone}

    def _decided(self, stage: str) -> str:
        return f"e{self.epoch}/{stage}/decided"

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
