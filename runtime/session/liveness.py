"""Which peer stopped: heartbeats through the rendezvous store.

A collective that fails says little (gloo: "connection closed by peer"; a timeout:
nothing), and one broadcast has several peers. Each endpoint bumps a counter in
the store twice a second from a thread with its own store connection; when a wait
fails, the peers whose counters stopped are the ones named. Counters, not clocks,
so hosts need not agree on the time. A store that cannot be reached means its
host, the first trainer rank, is gone.

The same thread, while its endpoint is blocked in the store waiting for a round's
verdicts (a vote, an outcome), looks at each beat for a peer that has posted none and
stopped beating: a crashed engine would otherwise hold everyone until the timeout.
It also deletes the keys of rounds long over (`discard`), so that keeping the store
small costs no round trips inside an update.
"""

from __future__ import annotations

import threading
import time
from collections import deque

BEAT_S = 0.5
SILENT_AFTER_S = 2.0  # no beat for this long: the peer is taken to be gone
GONE_AFTER_S = 2 * SILENT_AFTER_S  # a round's verdict is posted for a peer only after this long without a beat
STORE_CLOSING = 1 << 40  # added to a peer's counter by the store's host as it closes the store: stop beating


def _key(who: str) -> str:
    return f"alive/{who}"


class Heartbeat:
    """Bumps `alive/{who}` every BEAT_S on a clone of the store, until stopped."""

    def __init__(self, store, who: str):
        self.who = who
        self._store = store.clone()  # its own connection: the endpoint's may be blocked in a wait
        self._stop = threading.Event()
        self._round = None  # what `watch_round` was given, while its endpoint waits in a round
        self._discarded: deque[str] = deque()  # store keys to delete at the next beat
        self._thread = threading.Thread(target=self._run, name=f"shardsync heartbeat {who}", daemon=True)
        count = self._store.add(_key(who), 1)
        if count >= STORE_CLOSING:  # a flag left by a host that closed a session on this store before
            self._store.add(_key(who), -(count // STORE_CLOSING) * STORE_CLOSING)
        self._thread.start()

    def watch_round(self, round_) -> None:
        """Until called with None: at each beat, `round_.look(store)` with this thread's
        own connection (the endpoint's is blocked in the round's wait)."""
        self._round = round_

    def discard(self, keys) -> None:
        """Delete `keys` from the store at the next beat (keys nobody reads any more)."""
        self._discarded.extend(keys)

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                if self._store.add(_key(self.who), 1) >= STORE_CLOSING:
                    return  # the host is taking the store down: a beat after that would fail, loudly, in torch
                while self._discarded:
                    self._store.delete_key(self._discarded.popleft())
            except RuntimeError:
                return  # the store is gone; waits will say so
            round_ = self._round
            if round_ is not None:
                try:
                    round_.look(self._store)
                except RuntimeError:
                    pass  # the store is failing: the next beat finds out, and the wait says so

    @property
    def beating(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * BEAT_S)


def stop_beats(store, peers) -> None:
    """Tell the heartbeats of peers that are still open that the store is closing, and
    wait (about a beat) until each has beaten once more, seen it and stopped, so that
    none is in the middle of a beat when the store goes. Peers whose counter does not
    move by then are not waited for longer."""
    told = {peer: store.add(_key(peer), STORE_CLOSING) for peer in peers}
    deadline = time.monotonic() + BEAT_S + 0.25
    while told and time.monotonic() < deadline:
        time.sleep(0.01)
        told = {peer: count for peer, count in told.items() if _beats(store, peer) <= count}


def silent_peers(store, peers: tuple[str, ...], host: str, others: tuple[str, ...] = ()) -> str:
    """A sentence naming the peers that stopped beating (watched for SILENT_AFTER_S).

    Where every peer still beats, the rest of the transfer (`others`) is watched in the
    same pause: a peer stuck on a channel to an endpoint that died is waiting on that
    endpoint, and the sentence names it. Uses the endpoint's own connection: a new one
    to a dead host would retry for the whole store timeout, an open one fails at once."""
    watched = tuple(peers) + tuple(o for o in others if o not in peers)
    try:
        _beats(store, host)  # reaching the store at all says whether its host lives
        before = {p: _beats(store, p) for p in watched}
        time.sleep(SILENT_AFTER_S)
        after = {p: _beats(store, p) for p in watched}
    except RuntimeError:
        return f"the rendezvous store is unreachable: its host, {host}, is gone"
    silent = [p for p in peers if before[p] == after[p]]
    if silent:
        return f"{', '.join(silent)} stopped responding (no heartbeat for {SILENT_AFTER_S:.0f}s)"
    sentence = f"{', '.join(peers)} still alive (heartbeats go on), so stuck rather than gone"
    gone = [p for p in watched[len(peers):] if before[p] == after[p]]
    if gone:
        sentence += (f"; {', '.join(gone)} stopped responding (no heartbeat for {SILENT_AFTER_S:.0f}s), "
                     f"which may be what {'they wait' if len(peers) > 1 else 'it waits'} on")
    return sentence


class Watch:
    """Which of some peers stopped beating, told without blocking: each `gone` call reads
    their counters once; a peer whose counter has not moved for `after` seconds
    (SILENT_AFTER_S unless told) since this watch first read it is gone. For a wait that
    polls (a host that keeps the store up until its peers are through with it, a
    heartbeat watching a round) and must not wait out its whole timeout for a peer that
    died."""

    def __init__(self, store, after: float = SILENT_AFTER_S):
        self._store = store
        self._after = after
        self._seen: dict[str, tuple[int, float]] = {}  # peer -> (beats, when they last moved)

    def gone(self, peers) -> list[str]:
        now = time.monotonic()
        silent = []
        for peer in peers:
            beats = _beats(self._store, peer)
            seen = self._seen.get(peer)
            if seen is None or seen[0] != beats:
                self._seen[peer] = (beats, now)
            elif now - seen[1] >= self._after:
                silent.append(peer)
        return silent


def _beats(store, who: str) -> int:
    return store.add(_key(who), 0)
