"""A channel's waits end at their timeout, or sooner once the update failed elsewhere:
two members of a real gloo group, in two processes over a real TCPStore, one of which
answers only when told. And a wait whose slice ends as its work completes (a race no
real group can be made to lose on demand: a stand-in work) is not a timeout."""

from __future__ import annotations

import multiprocessing
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from shardsync.harness.local_cluster import free_port
from shardsync.runtime.errors import TransferError
from shardsync.runtime.wire.channels import WATCH_EVERY_S, Group, create_group

PEERS = ("trainer pp0 tp0", "engine 0 tp0")


class FailsAfter:
    """A session whose update fails elsewhere `after` seconds from now (never if None)."""

    def __init__(self, after: float | None):
        self.at = None if after is None else time.monotonic() + after
        self.asked = 0

    def failed_elsewhere(self, update: int) -> str | None:
        self.asked += 1
        if self.at is not None and time.monotonic() >= self.at:
            return f"engine 1 tp0: update {update}: its channel broke"
        return None

    def diagnose(self, peers: tuple[str, ...]) -> str:
        return f"{', '.join(peers)} still alive"


def _source(port: int, timeout: float, started, answer) -> None:
    """Member 0, in its own process: joins, broadcasts once `answer` is set, then leaves."""
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
    started.set()  # (the join waits `timeout` for the other member: a process may take longer to start)
    group = create_group(store, "pp0-tp0-to-tp0", 0, PEERS, torch.device("cpu"), timeout)
    answer.wait(60)
    group.wait(group.broadcast(torch.tensor([7, 2, 1], dtype=torch.int64)), "announcing bucket 2", 7)
    group.close()


class Channel:
    """Member 1 of a channel here, member 0 in a child process that answers when told."""

    def __init__(self, timeout: float):
        context = multiprocessing.get_context("spawn")
        port = free_port()
        self.store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30),
                                   wait_for_workers=False)
        self.answer, started = context.Event(), context.Event()
        self.source = context.Process(target=_source, args=(port, timeout, started, self.answer), daemon=True)
        self.source.start()
        assert started.wait(60), "the channel's source process did not start within 60 s"
        self.engine = create_group(self.store, "pp0-tp0-to-tp0", 1, PEERS, torch.device("cpu"), timeout)

    def close(self) -> None:
        self.answer.set()
        self.source.join(30)
        self.engine.close()


@pytest.mark.parametrize("fails_after", [0.6, None])
def test_a_wait_ends_once_the_update_failed_elsewhere_and_else_at_its_timeout(fails_after):
    timeout = 3.0
    channel = Channel(timeout)
    engine = channel.engine
    try:
        engine.watch = FailsAfter(fails_after)
        started = time.monotonic()
        with pytest.raises(TransferError) as raised:
            engine.wait(engine.broadcast(torch.zeros(3, dtype=torch.int64)), "waiting for bucket 2", 7)
        took = time.monotonic() - started
        message = str(raised.value)
        assert message.startswith("update 7: channel pp0-tp0-to-tp0: waiting for bucket 2 with trainer pp0 tp0")
        if fails_after is not None:
            assert fails_after <= took < fails_after + WATCH_EVERY_S + 0.5, took
            assert "the update failed elsewhere: engine 1 tp0: update 7: its channel broke" in message
        else:
            assert timeout <= took < timeout + 1.0, took
            assert "(timeout 3s): trainer pp0 tp0 still alive" in message
            assert engine.watch.asked >= int(timeout / WATCH_EVERY_S) - 2  # it kept asking
    finally:
        channel.close()


def test_a_wait_that_completes_asks_the_session_nothing():
    channel = Channel(3.0)
    engine = channel.engine
    try:
        engine.watch = FailsAfter(0.0)  # would stop any wait that asked it
        received = torch.zeros(3, dtype=torch.int64)
        work = engine.broadcast(received)
        channel.answer.set()
        deadline = time.monotonic() + 30
        while not work.is_completed() and time.monotonic() < deadline:  # the child may start slowly
            time.sleep(0.01)
        engine.wait(work, "waiting for bucket 2", 7)
        assert received.tolist() == [7, 2, 1] and engine.watch.asked == 0
    finally:
        channel.close()


class _EndsAsItsSliceDoes:
    """A work that completes just as a slice of the wait on it times out: the slice's
    wait raises, and by the time it is looked at the work is done, with `failure` (a
    RuntimeError's words) or without."""

    def __init__(self, failure: str | None = None):
        self.failure, self.waits = failure, 0

    def wait(self, timeout):
        self.waits += 1
        if self.waits == 1:
            raise RuntimeError("Operation timed out!")
        if self.failure:
            raise RuntimeError(self.failure)

    def is_completed(self) -> bool:
        return self.waits >= 1


@pytest.mark.parametrize("failure", [None, "Connection closed by peer"], ids=["done", "failed"])
def test_a_slice_that_ends_as_its_work_completes_is_not_taken_for_a_timeout(failure):
    """The race a first H200 run hit in every trainer's wait for the closing
    acknowledgement (0.3 s into a 60 s timeout): the wait returns, or raises the work's
    own failure, never the slice's timeout."""
    group = Group("pp0-tp0-to-tp0", 1, 2, None, 60.0, PEERS, torch.device("cpu"), FailsAfter(None))
    work = _EndsAsItsSliceDoes(failure)
    if failure is None:
        group.wait(work, "acknowledging", 7)
    else:
        with pytest.raises(TransferError, match="acknowledging with trainer pp0 tp0 failed after .*Connection closed"):
            group.wait(work, "acknowledging", 7)
    assert work.waits == 2
