"""Plan agreement: every process checks it planned the same transfer before any
group is created or any byte moves.

Through the rendezvous store, not a channel: processes that disagree on the
layout would disagree on the channels too, and would wait on groups that never
form. The first trainer rank publishes its plan inputs and hash; every process
compares, publishes a verdict, and waits for the verdicts of all the others, so a
mismatch anywhere is refused everywhere with the fields that differ.
"""

from __future__ import annotations

import json
from datetime import timedelta

from torch.distributed import DistStoreError

from shardsync.runtime.errors import PlanError, TransferError
from shardsync.runtime.session.liveness import GONE_AFTER_S, Watch

REFERENCE = "agreement/reference"
DECIDED = "agreement/decided"


def agree(store, who: str, everyone: list[str], digest: str, inputs: dict, is_reference: bool, timeout: float) -> None:
    """Refuse to go on unless every process in `everyone` planned with `digest`.

    A process that differs from the reference refuses at once (it may count peers
    that do not exist, and must not wait for them); the others wait for every
    verdict, so they refuse too, naming the fields that differ.
    """
    mine = {"who": who, "digest": digest, "inputs": inputs}
    if is_reference:
        store.set(REFERENCE, json.dumps(mine))
    reference = json.loads(_get(store, REFERENCE, "the first trainer rank's plan", timeout))
    verdict = "ok" if reference["digest"] == digest else describe_difference(reference, mine)
    keys = {o: f"agreement/verdict/{o}" for o in everyone}
    post_verdict(store, keys, who, verdict, DECIDED)
    if verdict != "ok":
        store.set(f"agreement/read/{who}", "1")
        raise PlanError(f"plans differ, refusing to connect: {verdict}")
    try:
        found = first_refusal(store, keys, timeout, DECIDED)
    except Silence as silence:
        raise TransferError(f"connect: no plan check from {silence} within {timeout:.0f}s "
                            f"(is that process running?)") from None
    refusal = found[1] if found is not None else None
    store.set(f"agreement/read/{who}", "1")
    if is_reference:
        # the store lives in this process: leaving (on a refusal) before everyone has
        # read the verdicts would turn their refusal into a lost connection
        try:
            store.wait([f"agreement/read/{other}" for other in everyone], timedelta(seconds=timeout))
        except RuntimeError:
            pass  # a peer that never reads has its own timeout to report
    if refusal is not None:
        raise PlanError(f"plans differ, refusing to connect: {refusal}")


def describe_difference(reference: dict, mine: dict) -> str:
    """The inputs that differ, as `field: <who> has X, <who> has Y`."""
    a, b = reference["inputs"], mine["inputs"]
    fields = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not fields:
        return f"{reference['who']} and {mine['who']} have the same inputs but different plan hashes (different converter versions?)"
    return "; ".join(f"{k}: {reference['who']} has {a.get(k)!r}, {mine['who']} has {b.get(k)!r}" for k in fields)


class Silence(Exception):
    """Some verdicts did not come within the timeout; `pending` names whose."""

    def __init__(self, pending: list[str]):
        super().__init__(", ".join(pending))
        self.pending = pending


def post_verdict(store, keys: dict[str, str], who: str, verdict: str, decided: str) -> bool:
    """Post `who`'s verdict in a round whose verdicts are `keys` (who -> store key); True
    where it decided the round with every verdict "ok" (so the poster need not read it).

    A verdict is written once: one already posted in `who`'s name (gone, by a peer's
    `SpeakForTheGone`) stays, and `who` refuses with it. Each "ok" that went in adds
    one to the round's count, so the count reaches the round's size only where every
    verdict is "ok"; that last "ok", or any refusal, marks the round `decided`, which
    `first_refusal` waits on and then reads the count of: one round trip, not a read
    of every verdict."""
    posted = store.compare_set(keys[who], "", verdict)
    if verdict == "ok" and posted == b"ok":
        if store.add(_count_key(decided), 1) < len(keys):
            return False
        store.set(decided, "1")
        return True
    store.set(decided, "1")
    return False


class SpeakForTheGone:
    """A round's verdicts, looked at from the heartbeat of an endpoint waiting in it: a
    peer that has posted none and has not beaten for GONE_AFTER_S gets a refusal posted
    in its name, which decides the round, so that everyone waiting in it hears why at
    once instead of at the timeout. A peer taken for gone that was only slow finds the
    verdict in its name when it posts (`post_verdict` keeps the first), and refuses too."""

    def __init__(self, keys: dict[str, str], who: str, decided: str):
        self.keys, self.who, self.decided = keys, who, decided
        self._watch: Watch | None = None

    def look(self, store) -> None:
        if self._watch is None:
            self._watch = Watch(store, after=GONE_AFTER_S)
        if store.check([self.decided]):
            return
        pending = [peer for peer, key in self.keys.items() if peer != self.who and not store.check([key])]
        for peer in self._watch.gone(pending):
            said = f"{peer}: gone, no heartbeat for {GONE_AFTER_S:.0f}s (seen by {self.who})"
            if store.compare_set(self.keys[peer], "", said) == said.encode():  # (else it posted meanwhile)
                store.set(self.decided, "1")


def round_keys(keys: dict[str, str], who: str, decided: str) -> tuple[str, ...]:
    """The store keys `who` leaves in a round: its verdict, and the round's decision
    and count (which every member may delete once the round is long over)."""
    return keys[who], decided, _count_key(decided)


def _count_key(decided: str) -> str:
    return f"{decided}/count"


def first_refusal(store, keys: dict[str, str], timeout: float, decided: str) -> tuple[str, str, list[str]] | None:
    """Wait until the round is decided (every verdict posted, or a refusal), then read it:
    None when every verdict is "ok" (the round's count says so), else the refusal, read
    from the verdicts: (who, verdict, those not heard from yet). A refusal ends the wait
    at once, even while processes the refuser does not count are missing; silence past
    the timeout raises Silence. The wait blocks in the store, which answers as soon as
    `decided` is set: every update waits here twice, so a waiter that polled would add
    its pause to every update."""
    try:
        store.wait([decided], timedelta(seconds=timeout))
    except DistStoreError:
        raise Silence([o for o in keys if not store.check([keys[o]])]) from None
    if store.add(_count_key(decided), 0) == len(keys):
        return None
    heard = [o for o in keys if store.check([keys[o]])]
    for other, verdict in zip(heard, store.multi_get([keys[o] for o in heard])):
        if verdict != b"ok":
            return other, verdict.decode(), [o for o in keys if o not in heard]
    silent = ", ".join(o for o in keys if o not in heard) or "none"
    raise TransferError(f"{decided} was set with no refusal among the verdicts and too few of them ok "
                        f"(not posted: {silent})")


def _get(store, key: str, what: str, timeout: float) -> bytes:
    try:
        store.wait([key], timedelta(seconds=timeout))
        return store.get(key)
    except RuntimeError:
        raise TransferError(f"connect: no answer for {what} within {timeout:.0f}s (is that process running?)") from None
