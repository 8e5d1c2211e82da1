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
from shardsync.runtime.session.liveness import BEAT_S, GONE_AFTER_S

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


def test_a_peer_taken_for_gone_that_votes_late_refuses_with_everyone(endpoints):
    """The verdict posted in its name stands: its own late "ok" does not complete the
    round for anyone who reads it later."""
    _crash(endpoints[VICTIM])
    waiting = (HOST, ENGINE)
    results = _in_threads({who: (lambda s=endpoints[who]: s.vote(1, None)) for who in waiting})
    late = _in_threads({VICTIM: lambda: endpoints[VICTIM].vote(1, None)})
    for who, (error, _) in {**results, **late}.items():
        assert isinstance(error, UpdateRefused), (who, error)
        assert f"{VICTIM}: gone, no heartbeat for {GONE_AFTER_S:.0f}s" in str(error), (who, error)


def test_the_last_to_say_ok_hears_a_refusal_posted_before_it(endpoints):
    endpoints[ENGINE].vote(1, "its targets are wrong")
    for who in (HOST, VICTIM):  # the last "ok" completes the round's count, with the refusal in it
        with pytest.raises(UpdateRefused, match=f"{ENGINE}: its targets are wrong"):
            endpoints[who].vote(1, None)


def test_a_peer_slow_to_vote_but_beating_is_waited_for(endpoints):
    def late_vote():
        time.sleep(GONE_AFTER_S + 1.5)
        return endpoints[VICTIM].vote(1, None)

    results = _in_threads({HOST: lambda: endpoints[HOST].vote(1, None),
                           ENGINE: lambda: endpoints[ENGINE].vote(1, None), VICTIM: late_vote})
    assert all(outcome is None for outcome, _ in results.values()), results
    assert all(seconds >= GONE_AFTER_S + 1.5 for _, seconds in results.values()), results


def test_the_store_keeps_only_the_last_rounds_of_many_updates(endpoints):
    """Each endpoint deletes its keys of the rounds two updates back, from its heartbeat
    (not inside the update): after a beat, the store holds as many keys after 40 updates
    as after 10."""
    host_store = endpoints[HOST].store

    def updates(first: int, last: int) -> None:
        for update in range(first, last + 1):
            for stage in ("vote", "outcome"):
                results = _in_threads({who: (lambda s=s, stage=stage: getattr(s, stage)(update, None))
                                       for who, s in endpoints.items()})
                assert all(outcome is None for outcome, _ in results.values()), (update, stage, results)

    def keys_after_a_beat() -> int:
        time.sleep(2 * BEAT_S + 0.2)
        return host_store.num_keys()

    updates(1, 10)
    after_ten = keys_after_a_beat()
    updates(11, 40)
    assert keys_after_a_beat() == after_ten
