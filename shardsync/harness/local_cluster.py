"""Running a set of ranks as local processes (spawned), each reporting one result.

For the demo, the benchmarks and the tests: every rank is a real process talking
over real sockets. A rank that dies or hangs is reported, never waited on forever.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import signal
import socket
import threading
import time
import traceback
from typing import Callable


def free_port() -> int:
    """A port free now and outside the kernel's ephemeral range.

    A port from bind(0) is an ephemeral one: between choosing it and binding it for real
    (a rendezvous store, a gloo group started later), an outgoing connection of another
    rank can be given the same port, and the bind fails with EADDRINUSE. Ports below the
    ephemeral range are never handed out that way.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no luck below the range: an ephemeral port, as before
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def run_ranks(ranks: list[tuple[str, Callable, tuple]], deadline_s: float,
              stop: threading.Event | None = None, fail_fast_s: float | None = None) -> dict[str, dict]:
    """Start `fn(*args)` for each (who, fn, args) in its own process; return {who: result}.

    `fn` returns a dict; an exception becomes {"error": traceback}. A rank that has
    not reported by the deadline, or died silently, raises RuntimeError naming it;
    setting `stop` kills the ranks still running and raises too. With `fail_fast_s`,
    ranks still running that long after one reported an error are killed and the
    error is raised (their peers would otherwise wait out their own timeouts).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = {who: ctx.Process(target=_rank_main, args=(who, fn, args, results), name=who) for who, fn, args in ranks}
    for proc in procs.values():
        proc.start()
    collected: dict[str, dict] = {}
    deadline = time.monotonic() + deadline_s
    first_error: float | None = None
    try:
        while len(collected) < len(procs):
            try:
                who, result = results.get(timeout=0.5)
                collected[who] = result
                if "error" in result and first_error is None:
                    first_error = time.monotonic()
            except queue.Empty:
                missing = sorted(set(procs) - set(collected))
                if fail_fast_s is not None and first_error is not None and time.monotonic() - first_error > fail_fast_s:
                    errors = "\n".join(f"{w}: {r['error']}" for w, r in collected.items() if "error" in r)
                    raise RuntimeError(f"{missing} still running {fail_fast_s:.0f}s after a rank failed:\n{errors}") from None
                if stop is not None and stop.is_set():
                    raise RuntimeError(f"stopped while waiting for {missing}") from None
                if time.monotonic() > deadline:
                    _dump_stacks([procs[w] for w in missing])
                    raise RuntimeError(f"ranks did not finish within {deadline_s:.0f}s: {missing} (their stacks "
                                       f"are on stderr)") from None
                dead = [w for w in missing if not procs[w].is_alive() and procs[w].exitcode not in (None, 0)]
                if dead and results.empty():
                    how = ", ".join(f"{w} ({_exit_reason(procs[w].exitcode)})" for w in dead)
                    raise RuntimeError(f"ranks died without reporting: {how}; their stderr says why") from None
    finally:
        for proc in procs.values():
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return collected


def _dump_stacks(procs) -> None:
    """Ask ranks that overran to print every thread's Python stack (`_rank_main`
    registered the signal), so a hang says where it hangs."""
    for proc in procs:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(1.0)


def _exit_reason(code: int) -> str:
    """A process's exit code in words: a signal by name (SIGKILL is often the OOM killer)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _rank_main(who: str, fn: Callable, args: tuple, results) -> None:
    import faulthandler

    faulthandler.enable()  # a crash in native code prints every thread's Python stack to stderr
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # and so does a rank that overran (`_dump_stacks`)
    import torch

    from shardsync import log_lines

    torch.set_num_threads(1)
    log_lines.show()
    try:
        result = fn(*args)
    except BaseException:
        result = {"error": traceback.format_exc()}
    results.put((who, result))
