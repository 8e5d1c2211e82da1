"""Probe: what four processes on one GPU lose to each other, outside the runtime
(bench/RESULTS.md has its figures). Run on a GPU machine: `python3 bench/probes/gpu_timeslice.py 256`.

Two producer/consumer pairs (trainer rank i -> engine rank i), each trainer 4 GiB of
bf16 copied in chunks into two IPC-shared slots, each engine copying out of them.
Scenarios (all GPU waits through interprocess events, host signals through shared
CPU counters, host spinning):
  alone     one process does every copy of the update (2 x 2 x 4 GiB), one stream
  indep     four processes each copy 4 GiB at once, no dependencies (pure time-slicing)
  pipe      the runtime's schedule: two slots, pack k+1 while unpack k
  pipe4     the same with four slots: a producer's wait for its readers is on older reads
  chain     one token passes T0 -> E0 -> T1 -> E1 -> T0 ...: one runnable context at a time
            (host enqueues once the previous step was enqueued; the GPU waits the event)
  chainsync the same, but each host waits for the previous step's GPU completion first
  check2    both trainers run the NaN/Inf check over their 4 GiB at once, vs alone
  prepack   (1 GiB chunks: the four slots hold a trainer's whole shard) every chunk packed
            before the vote, whose NaN/Inf flag the pack would compute on the way: each
            trainer packs all, its host waits for its stream (the flag's read), the
            hosts vote through shared counters, then each engine unpacks all
"""
import json
import os
import sys
import time

import torch
import torch.multiprocessing as mp

GIB = 2**30
TOTAL = 4 * GIB // 2  # bf16 elements a trainer sends
ROUNDS = 6
SLOTS = 4


def spin(counter, index, value):
    while counter[index].item() < value:
        pass


def worker(role, pair, q_in, q_out, barrier, flags, chunk_elems, results):
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    n = TOTAL // chunk_elems
    stream = torch.cuda.current_stream()
    if role == "T":
        src = torch.randn(TOTAL, device=dev, dtype=torch.bfloat16)
        slots = torch.empty(SLOTS, chunk_elems, device=dev, dtype=torch.bfloat16)
        ready = [torch.cuda.Event(interprocess=True) for _ in range(SLOTS)]
        tok = torch.cuda.Event(interprocess=True)
        q_out.put((slots, [e.ipc_handle() for e in ready], tok.ipc_handle()))
        read_h, etok_h = q_in.get()
        read = [torch.cuda.Event.from_ipc_handle(dev, h) for h in read_h]
        etok = torch.cuda.Event.from_ipc_handle(dev, etok_h)
    else:
        dst = torch.empty(TOTAL, device=dev, dtype=torch.bfloat16)
        slots, ready_h, ttok_h = q_in.get()
        ready = [torch.cuda.Event.from_ipc_handle(dev, h) for h in ready_h]
        ttok = torch.cuda.Event.from_ipc_handle(dev, ttok_h)
        read = [torch.cuda.Event(interprocess=True) for _ in range(SLOTS)]
        tok = torch.cuda.Event(interprocess=True)
        q_out.put(([e.ipc_handle() for e in read], tok.ipc_handle()))
    # chain tokens: step s = 4k + r, r: T0=0 E0=1 T1=2 E1=3; the previous step's process's
    # event is needed: T_i waits E_{i-1} (E1 for T0), E_i waits T_i
    me = {"T": 0, "E": 1}[role] + 2 * pair
    torch.cuda.synchronize()
    from shardsync.runtime.nonfinite import NonfiniteCheck
    check = NonfiniteCheck() if role == "T" else None
    # the chain's token events of every process, exchanged through the parent
    results.put(("tok", me, tok.ipc_handle()))
    toks = q_in.get()
    tok_ev = {p: (tok if p == me else torch.cuda.Event.from_ipc_handle(dev, h)) for p, h in toks.items()}

    def run(scenario, rnd):
        base = rnd * n * 4 + 8
        if scenario == "indep":
            for k in range(n):
                if role == "T":
                    slots[k % 2].copy_(src[k * chunk_elems:(k + 1) * chunk_elems])
                else:
                    dst[k * chunk_elems:(k + 1) * chunk_elems].copy_(slots[k % 2])
        elif scenario in ("pipe", "pipe4"):
            depth = 2 if scenario == "pipe" else 4
            # flags: [pair*2 + 0] = buckets written (T), [pair*2 + 1] = buckets read-recorded (E)
            for k in range(n):
                s = k % depth
                if role == "T":
                    if k >= depth:
                        spin(flags, pair * 2 + 1, base + k - depth + 1)
                        stream.wait_event(read[s])
                    slots[s].copy_(src[k * chunk_elems:(k + 1) * chunk_elems])
                    ready[s].record(stream)
                    flags[pair * 2] = base + k + 1
                else:
                    spin(flags, pair * 2, base + k + 1)
                    stream.wait_event(ready[s])
                    dst[k * chunk_elems:(k + 1) * chunk_elems].copy_(slots[s])
                    read[s].record(stream)
                    flags[pair * 2 + 1] = base + k + 1
        elif scenario in ("chain", "chainsync"):
            prev = (me - 1) % 4
            for k in range(n):
                step = 4 * k + me
                if step > 0:
                    spin(flags, 4, base + step)  # the previous step was enqueued
                    if scenario == "chainsync":
                        tok_ev[prev].synchronize()
                    else:
                        stream.wait_event(tok_ev[prev])
                s = k % 2
                if role == "T":
                    slots[s].copy_(src[k * chunk_elems:(k + 1) * chunk_elems])
                else:
                    dst[k * chunk_elems:(k + 1) * chunk_elems].copy_(slots[s])
                tok.record(stream)
                flags[4] = base + step + 1
        elif scenario == "prepack":
            if role == "T":
                for k in range(n):
                    slots[k].copy_(src[k * chunk_elems:(k + 1) * chunk_elems])
                    ready[k].record(stream)
                stream.synchronize()
                flags[5 + pair] = base + 1
            else:
                spin(flags, 5, base + 1)
                spin(flags, 6, base + 1)
                for k in range(n):
                    stream.wait_event(ready[k])
                    dst[k * chunk_elems:(k + 1) * chunk_elems].copy_(slots[k])
                    read[k].record(stream)
        elif scenario == "check2":
            if role == "T":
                check.any_nonfinite([src])
        elif scenario == "check1":
            if role == "T" and pair == 0:
                check.any_nonfinite([src])
        torch.cuda.synchronize()

    for scenario in scenarios(n):
        times = []
        for rnd in range(ROUNDS):
            if me == 0:
                flags[4] = rnd * n * 4 + 8  # chain start
            barrier.wait()
            t0 = time.perf_counter()
            run(scenario, rnd)
            barrier.wait()
            times.append(time.perf_counter() - t0)
        results.put((scenario, me, times))
    barrier.wait()


def scenarios(chunks: int) -> tuple[str, ...]:
    return ("indep", "pipe", "pipe4", "chain", "chainsync", "check1", "check2") + (
        ("prepack",) if chunks <= SLOTS else ())


def alone(chunk_elems):
    dev = torch.device("cuda", 0)
    src = torch.randn(TOTAL, device=dev, dtype=torch.bfloat16)
    src2 = torch.randn(TOTAL, device=dev, dtype=torch.bfloat16)
    dst = torch.empty(TOTAL, device=dev, dtype=torch.bfloat16)
    dst2 = torch.empty(TOTAL, device=dev, dtype=torch.bfloat16)
    slots = torch.empty(2, chunk_elems, device=dev, dtype=torch.bfloat16)
    n = TOTAL // chunk_elems
    times = []
    whole = []
    for _ in range(ROUNDS):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for a, b in ((src, dst), (src2, dst2)):
            for k in range(n):
                slots[k % 2].copy_(a[k * chunk_elems:(k + 1) * chunk_elems])
                b[k * chunk_elems:(k + 1) * chunk_elems].copy_(slots[k % 2])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        whole.append(time.perf_counter() - t0)
    del src, src2, dst, dst2, slots
    torch.cuda.empty_cache()
    return times, whole


def main():
    chunk_mb = int(sys.argv[1])
    chunk_elems = chunk_mb * 2**20 // 2
    a, whole = alone(chunk_elems)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    flags = torch.zeros(8, dtype=torch.int64).share_memory_()
    results = ctx.Queue()
    qs = {k: ctx.Queue() for k in ("T0", "E0", "T1", "E1")}
    procs = []
    for pair in (0, 1):
        # T's out-queue is E's in-queue and the other way round
        procs.append(ctx.Process(target=worker, args=("T", pair, qs[f"E{pair}"], qs[f"T{pair}"], barrier, flags,
                                                      chunk_elems, results)))
        procs.append(ctx.Process(target=worker, args=("E", pair, qs[f"T{pair}"], qs[f"E{pair}"], barrier, flags,
                                                      chunk_elems, results)))
    for p in procs:
        p.start()
    toks = {}
    for _ in range(4):
        _, me, h = results.get()
        toks[me] = h
    out = {"chunk_mb": chunk_mb, "alone_s": a, "one_copy_4gib_s": whole}
    got = {}
    for q in qs.values():
        q.put(toks)
    for _ in range(len(scenarios(TOTAL // chunk_elems)) * 4):
        scenario, me, times = results.get()
        got.setdefault(scenario, {})[me] = times
    for p in procs:
        p.join()
    out.update(got)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    one = med(whole)
    print(f"chunk {chunk_mb} MiB: one 4 GiB copy {one*1e3:.2f} ms; update's copies bound (4 x 4 GiB) {4*one*1e3:.2f} ms")
    print(f"  alone (one process, every copy) {med(a)*1e3:.2f} ms -> {4*one/med(a):.2f} of bound")
    for scenario, per in got.items():
        worst = [max(per[p][r] for p in per) for r in range(ROUNDS)][1:]
        m = med(worst)
        ref = (2 * one if scenario.startswith("check") else 4 * one)
        print(f"  {scenario:10s} {m*1e3:7.2f} ms  (rounds {', '.join(f'{x*1e3:.1f}' for x in worst)})"
              + ("" if scenario.startswith("check") else f" -> {ref/m:.2f} of bound"))
    with open(os.path.join(os.environ.get("OUT", "."), f"timeslice-{chunk_mb}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
