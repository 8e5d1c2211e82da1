"""Waiting for a CUDA stream's queued work, with a deadline.

Colocated on one GPU, the copies queued on an engine rank's stream wait on a trainer
process's interprocess events (and over NCCL, on its peers). A host wait for that
stream (`synchronize`, `.item()`, `.tolist()`) is then a wait on another process,
and like every such wait it gets a deadline, so the caller can name whom it was
waiting for instead of hanging with it.
"""

from __future__ import annotations

import time

import torch

SPIN_S = 0.05


def stream_done_within(stream: torch.cuda.Stream, timeout: float) -> bool:
    """Whether everything queued on `stream` so far ran within `timeout` seconds."""
    done = torch.cuda.Event()
    done.record(stream)
    return event_done_within(done, timeout)


def event_done_within(event: torch.cuda.Event, timeout: float) -> bool:
    """Whether `event` (recorded) completed within `timeout` seconds: polled, spinning for
    the first SPIN_S (an update's waits are a few to tens of ms, and a look half a
    millisecond late is that much more of its time), then sleeping half a millisecond
    between looks."""
    started = time.monotonic()
    deadline, spin_until = started + timeout, started + SPIN_S
    while not event.query():
        now = time.monotonic()
        if now > deadline:
            return False
        time.sleep(0 if now < spin_until else 0.0005)
    return True


def queued_work_not_run(what: str, timeout: float) -> str:
    """What a rank says when `what`, queued on its own stream, had not run within `timeout`."""
    return (f"{what} had not run on the device after {timeout:g}s: it waits on the work queued before it on this "
            f"rank's stream, which may wait on another process")


def copies_not_run(copies: str, timeout: float, writers: str) -> str:
    """What a receiver says when `copies` (queued on its stream) had not run within
    `timeout`: what they wait on, naming the ranks whose writes they follow."""
    return (f"{copies} had not run on the device after {timeout:g}s: they wait on the work queued before them on "
            f"this rank's stream and on the writes of {writers}")
