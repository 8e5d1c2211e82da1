"""A vote or an outcome does not wait out its timeout for a peer that crashed before
posting its verdict, and still waits for one that is only slow: sessions driven in
this process over a real TCPStore, a crash being a heartbeat that stops without a word."""

from __future__ import annotations

import threading
import time

import pytest

from shardsync.harness.local_cluster import free_port
from shardsync.runtime.errors import UpdateFailedElsewhere, UpdateRefused
from shardsync.runtime.session import Session
from shardsync.runtime.session.liveness import GONE_AFTER_S

HOST, ENGINE, VICTIM = "trainer pp0 tp0", "engine 0 tp0", "engine 1 tp0"
TIMEOUT = 30.0


@pytest.fixture
def endpoints():
    """Three sessions connected in epoch 0, through with connecting."""
    made = []
    port = free_port()
    everyone = [HOST, ENGINE, VICTIM]
    for who in everyone:
        session = Session(who, everyone, HOST, "127.0.0.1", port, TIMEOUT)
        session.open()
        made.append(session)
    for session in made:
        session.through(0, connected=True)
    yield dict(zip(everyone, made))
    for session in reversed(made):
        if session.heartbeat is not None:
            session.heartbeat.stop()
        session.store = None


def _in_threads(calls: dict) -> dict:
    """Run each endpoint's call at once; what each returned or raised, and when."""
    results, started = {}, time.monotonic()

    def run(who, call):
        try:
            results[who] = (call(), time.monotonic() - started)
        except Exception as exc:  # the call's own error is what is asserted
            results[who] = (exc, time.monotonic() - started)

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT + 10)
    return results


def _crash(session: Session) -> None:
    session.heartbeat.stop()
    session.heartbeat = None


@pytest.mark.parametrize("stage", ["vote", "outcome"])
def test_a_round_does_not_wait_out_its_timeout_for_a_peer_that_crashed(endpoints, stage):
    _crash(endpoints[VICTIM])  # before it posts its verdict in the round
    waiting = (HOST, ENGINE)
    if stage == "vote":
        results = _in_threads({who: (lambda s=endpoints[who]: s.vote(1, None)) for who in waiting})
        raised = UpdateRefused
    else:
        results = _in_threads({who: (lambda s=endpoints[who]: s.outcome(1, None)) for who in waiting})
        raised = UpdateFailedElsewhere
    for who in waiting:
        error, seconds = results[who]
        assert isinstance(error, raised), (who, error)
        assert f"{VICTIM}: gone, no heartbeat for {GONE_AFTER_S:.0f}s" in str(error), error
        assert seconds < GONE_AFTER_S + 3.0, (who, seconds)  # not the 30 s timeout


def test_a_peer_slow_to_vote_but_beating_is_waited_for(endpoints):
    def late_vote():
        time.sleep(GONE_AFTER_S + 1.5)
        return endpoints[VICTIM].vote(1, None)

    results = _in_threads({HOST: lambda: endpoints[HOST].vote(1, None),
                           ENGINE: lambda: endpoints[ENGINE].vote(1, None), VICTIM: late_vote})
    assert all(outcome is None for outcome, _ in results.values()), results
    assert all(seconds >= GONE_AFTER_S + 1.5 for _, seconds in results.values()), results
