"""Where one update's time goes, read from the profiler traces `bench --trace` records.

Every rank's trace is on the host's monotonic clock, so the ranks' traces line up
without adjustment. Per rank: its phases (the endpoint's `PhaseClock` ranges), its
time in signal collectives, and its device work (kernels and copies). Over all
ranks: how busy the device was while the update ran, and the spans it stood idle
longer than `IDLE_US`, with the phase each rank was in meanwhile. What the phase
clocks cannot show is exactly this: whose host the device was waiting for. And
where the device passed from one rank's work to another's, how long it took to start
work that was already queued (a hand-over between processes without MPS: time the
device spends switching, not waiting for any host).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

PHASE_PREFIX = "shardsync "
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
IDLE_US = 50.0  # a device gap shorter than this is a launch's, not a wait's
SHOWN_GAPS = 12


@dataclass
class RankTrace:
    name: str
    phases: list[tuple[str, float, float]] = field(default_factory=list)  # (phase, start, end), µs
    signals_us: float = 0.0  # in gloo collectives, as the host saw them
    signals: int = 0
    # (kernel, start, end, when the host launched it or None), µs
    device: list[tuple[str, float, float, float | None]] = field(default_factory=list)

    def phase_at(self, t: float) -> str:
        for phase, start, end in self.phases:
            if start <= t < end:
                return phase
        return "-"


def load(folder: Path) -> list[RankTrace]:
    ranks = []
    for path in sorted(folder.glob("*.json")):
        events = json.loads(path.read_text())["traceEvents"]
        rank = RankTrace(path.stem)
        signals, launches, device = [], {}, []
        for event in events:
            if event.get("ph") != "X":
                continue
            start, end = event["ts"], event["ts"] + event.get("dur", 0.0)
            name, category = event["name"], event.get("cat")
            correlation = (event.get("args") or {}).get("correlation")
            if category == "user_annotation" and name.startswith(PHASE_PREFIX):
                rank.phases.append((name[len(PHASE_PREFIX):], start, end))
            elif category == "user_annotation" and name.startswith("gloo:"):
                signals.append((start, end))
            elif category in DEVICE_CATEGORIES:
                device.append((name, start, end, correlation))
            elif category in ("cuda_runtime", "cuda_driver") and "Launch" in name and correlation is not None:
                launches[correlation] = start
        rank.device = [(name, start, end, launches.get(correlation)) for name, start, end, correlation in device]
        rank.phases.sort(key=lambda p: p[1])
        rank.device.sort(key=lambda d: d[1])
        if rank.phases:
            begin, end = rank.phases[0][1], rank.phases[-1][2]  # not the bench's barrier before them
            within = [(s, e) for s, e in signals if begin <= s < end]
            rank.signals, rank.signals_us = len(within), sum(e - s for s, e in within)
            ranks.append(rank)
    return ranks


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def describe_method(method: str, ranks: list[RankTrace]) -> str:
    begin = min(r.phases[0][1] for r in ranks)
    end = max(r.phases[-1][2] for r in ranks)
    ms = lambda t: (t - begin) / 1e3  # noqa: E731 - a position on the update's time axis
    lines = [f"{method}: one update, {(end - begin) / 1e3:.2f} ms from the first rank's first phase to the last "
             f"rank's outcome (times in ms from its start)"]
    for rank in ranks:
        phases = "  ".join(f"{p} {ms(s):.2f}-{ms(e):.2f}" for p, s, e in rank.phases)
        lines.append(f"  {rank.name}: {phases}")
        work = [(s, e) for _, s, e, _ in rank.device if e > begin and s < end]  # (not the profiler's warm-up)
        busy = sum(e - s for s, e in work)
        device = (f"; device: {len(work)} kernels/copies, {busy / 1e3:.2f} ms busy, "
                  f"{ms(work[0][0]):.2f}-{ms(work[-1][1]):.2f}") if work else ""
        lines.append(f"    {rank.signals} signal collectives, {rank.signals_us / 1e3:.2f} ms in them{device}")
    spans = _union([(max(s, begin), min(e, end)) for r in ranks for _, s, e, _ in r.device if e > begin and s < end])
    if not spans:
        return "\n".join(lines)
    busy = sum(e - s for s, e in spans)
    lines.append(f"  device busy {busy / 1e3:.2f} ms of {(end - begin) / 1e3:.2f} ({busy / (end - begin):.0%}); "
                 f"idle spans over {IDLE_US:.0f} us, longest first, with each rank's phase meanwhile:")
    edges = [(begin, begin)] + spans + [(end, end)]
    gaps = [(b[0] - a[1], a[1], b[0]) for a, b in zip(edges, edges[1:]) if b[0] - a[1] > IDLE_US]
    for length, start, stop in sorted(gaps, reverse=True)[:SHOWN_GAPS]:
        middle = (start + stop) / 2
        where = ", ".join(f"{r.name} {r.phase_at(middle)}" for r in ranks)
        lines.append(f"    {ms(start):6.2f}-{ms(stop):6.2f} ({length / 1e3:.2f} ms): {where}")
    idle = sum(g[0] for g in gaps)
    lines.append(f"    in all {len(gaps)} spans, {idle / 1e3:.2f} ms")
    handovers = _handovers(ranks, begin, end)
    if handovers:
        lines.append(f"  {len(handovers)} hand-overs of the device from one rank's work to another's launched "
                     f"work: each started {_spread(handovers)} ms after the device was free and its launch made")
    return "\n".join(lines)


def _handovers(ranks: list[RankTrace], begin: float, end: float) -> list[float]:
    """For each piece of device work that followed another rank's without overlapping
    it: how long after the later of the device being free and its own launch it
    started, µs. Work without a recorded launch (a copy) is not counted."""
    work = sorted(((s, e, launched, r.name) for r in ranks for _, s, e, launched in r.device if e > begin and s < end),
                  key=lambda w: w[:2])
    delays, free, last = [], None, None
    for start, stop, launched, who in work:
        if free is not None and who != last and start >= free and launched is not None:
            delays.append(start - max(free, launched))
        if free is None or stop > free:
            free, last = stop, who
    return delays


def _spread(values: list[float]) -> str:
    ordered = sorted(values)
    low, middle, high = ordered[0], ordered[len(ordered) // 2], ordered[-1]
    return f"{middle / 1e3:.2f} (median; {low / 1e3:.2f}-{high / 1e3:.2f})"


def describe(trace_dir: str) -> str:
    """A timeline per method traced under `trace_dir`."""
    parts = []
    for folder in sorted(p for p in Path(trace_dir).iterdir() if p.is_dir()):
        ranks = load(folder)
        if ranks:
            parts.append(describe_method(folder.name, ranks))
    return "\n\n".join(parts) if parts else f"no traces under {trace_dir}"
