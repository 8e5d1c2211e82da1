"""Naming the peer that stopped, over a real TCPStore and real heartbeat threads."""

from __future__ import annotations

import time
from datetime import timedelta

import torch.distributed as dist

from shardsync.harness.local_cluster import free_port
from shardsync.runtime.session.liveness import BEAT_S, Heartbeat, silent_peers, stop_beats


def _store():
    return dist.TCPStore("127.0.0.1", free_port(), is_master=True, timeout=timedelta(seconds=10),
                         wait_for_workers=False)


def test_a_silent_peer_is_named():
    store = _store()
    beating = Heartbeat(store, "trainer pp0 tp0")
    store.add("alive/engine 0 tp0", 1)  # beat once, then died
    try:
        sentence = silent_peers(store, ("trainer pp0 tp0", "engine 0 tp0"), "trainer pp0 tp0")
    finally:
        beating.stop()
    assert sentence.startswith("engine 0 tp0 stopped responding")


def test_a_stuck_peer_points_at_the_endpoint_elsewhere_that_died():
    store = _store()
    alive = [Heartbeat(store, who) for who in ("trainer pp0 tp0", "engine 1 tp1")]
    store.add("alive/engine 1 tp0", 1)  # on another channel of the same trainer, then killed
    try:
        sentence = silent_peers(store, ("trainer pp0 tp0",), "trainer pp0 tp0",
                                others=("trainer pp0 tp0", "engine 1 tp0", "engine 1 tp1"))
    finally:
        for beat in alive:
            beat.stop()
    assert sentence.startswith("trainer pp0 tp0 still alive (heartbeats go on), so stuck rather than gone; ")
    assert "engine 1 tp0 stopped responding" in sentence and "which may be what it waits on" in sentence
    assert "engine 1 tp1" not in sentence


def test_a_heartbeat_told_the_store_is_closing_stops_and_a_new_one_on_that_store_beats_on():
    store = _store()
    told = Heartbeat(store, "engine 0 tp0")
    stop_beats(store, ["engine 0 tp0"])
    time.sleep(0.05)
    assert not told.beating
    again = Heartbeat(store, "engine 0 tp0")  # a later session of the same endpoint on a store kept up
    try:
        time.sleep(2.5 * BEAT_S)
        assert again.beating
        assert silent_peers(store, ("engine 0 tp0",), "engine 0 tp0").startswith("engine 0 tp0 still alive")
    finally:
        again.stop()
