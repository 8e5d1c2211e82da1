"""The store's host, the first trainer rank, keeps the rendezvous store up at close
until its peers are through with the last update: an endpoint slow to read the
last outcome must not see a successful update fail because the host closed and
exited; a peer that is gone or closed must not hold the host's close for long.

The first test runs real processes (the harness); the others drive sessions in
this process, a peer's crash being a heartbeat that stops without a word.
"""

from __future__ import annotations

import logging
import time

import pytest

from shardsync.harness.local_cluster import free_port
from shardsync.presets import model_config
from shardsync.runtime.session import Session
from shardsync.runtime.session.liveness import SILENT_AFTER_S
from tests.transfer_harness import SLOW_READ_S, Case, run

HOST, PEER = "trainer pp0 tp0", "engine 0 tp0"


def test_an_engine_slow_to_read_the_last_outcome_still_sees_the_update_succeed():
    """The host closes (and its process exits) right after its last update, while one
    engine waits SLOW_READ_S before reading that update's outcomes: the host's close
    waits for it, so its update succeeds, exact, instead of failing with the store gone."""
    case = Case(model_config("qwen3-tiny"), 1, 1, 1, 2, slow_reader="engine 1 tp0", timeout=30.0)
    results = run(case)  # raises, with every rank's error, if any rank failed
    for who, result in results.items():
        if who.startswith("engine"):
            assert result["mismatches"] == [[]] * case.updates, who
    host_close = results[HOST]["close_seconds"]
    assert SLOW_READ_S * 0.5 < host_close < SLOW_READ_S + 5, host_close  # it waited, for the slow reader only
    assert results["engine 0 tp0"]["close_seconds"] < 2, results["engine 0 tp0"]  # a peer's close stays quick


@pytest.fixture
def sessions():
    """A host and one peer, connected in epoch 0 and through with update 1 on the host's side."""
    made = []

    def make(timeout: float = 30.0):
        port = free_port()
        host = Session(HOST, [HOST, PEER], HOST, "127.0.0.1", port, timeout)
        peer = Session(PEER, [HOST, PEER], HOST, "127.0.0.1", port, timeout)
        made.extend([peer, host])
        host.open()
        peer.open()
        assert host.epoch == peer.epoch == 0
        host.through(0, connected=True)
        peer.through(0, connected=True)
        host.through(1)  # the host read update 1's outcome; the peer has not said so yet
        return host, peer

    yield make
    for session in made:
        if session.heartbeat is not None:
            session.heartbeat.stop()
        session.store = None


def _timed_close(session: Session) -> float:
    started = time.monotonic()
    session.close()
    return time.monotonic() - started


def test_the_host_closes_at_once_once_its_peers_are_through_or_closed(sessions, caplog):
    host, peer = sessions()
    peer.through(1)
    with caplog.at_level(logging.WARNING, logger="shardsync"):
        assert _timed_close(host) < 1.0
    assert not caplog.records

    host, peer = sessions()
    assert _timed_close(peer) < 1.5  # a peer's close: one key, then its heartbeat stops
    with caplog.at_level(logging.WARNING, logger="shardsync"):
        assert _timed_close(host) < 1.0
    assert not caplog.records


def test_a_peer_left_open_stops_beating_before_the_host_takes_the_store_down(sessions):
    """A peer through with the last update but not closed (an engine that outlives the
    trainer) would beat into a store that is gone, and torch prints every such failure
    with a C++ stack trace: the host's close tells its heartbeat to stop and waits for
    the last beat, within about a beat."""
    host, peer = sessions()
    peer.through(1)
    assert peer.heartbeat.beating
    assert _timed_close(host) < 1.0
    time.sleep(0.05)  # a tenth of a beat: without the word it would beat on for a while
    assert not peer.heartbeat.beating


def test_the_host_does_not_wait_out_its_timeout_for_a_peer_that_is_gone(sessions, caplog):
    """A peer that crashed (its heartbeat stopped, no word) holds the close for about
    the time liveness takes to call it gone, not for the 30 s timeout."""
    host, peer = sessions(timeout=30.0)
    peer.heartbeat.stop()  # killed: no more beats, and no `through` for update 1
    peer.heartbeat = None
    with caplog.at_level(logging.WARNING, logger="shardsync"):
        seconds = _timed_close(host)
    assert SILENT_AFTER_S - 0.1 < seconds < SILENT_AFTER_S + 2, seconds
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert PEER in warning and "update 1" in warning and "gone" in warning, warning
    assert f"e0/through/{PEER}" in warning, warning


def test_the_host_waits_for_a_live_silent_peer_no_longer_than_its_timeout_and_names_it(sessions, caplog):
    host, peer = sessions(timeout=3.0)  # the peer beats on but never says it is through
    with caplog.at_level(logging.WARNING, logger="shardsync"):
        seconds = _timed_close(host)
    assert 3.0 <= seconds < 3.0 + 2, seconds
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert PEER in warning and "update 1" in warning and "still beating" in warning, warning
    assert f"e0/through/{PEER}" in warning, warning
