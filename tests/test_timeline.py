"""`bench --trace`'s timeline: ranks' traces lined up on the host clock, the device's
busy time as the union of every rank's kernels, and its idle spans attributed to the
phase each rank was in."""

from __future__ import annotations

import json

from shardsync.bench.timeline import describe, load


def _trace(path, phases, kernels=(), signals=(), launched=None):
    """`launched`: when the host launched each of `kernels`, µs (None: no launch recorded)."""
    events = [{"ph": "X", "cat": "user_annotation", "name": f"shardsync {name}", "ts": start, "dur": end - start}
              for name, start, end in phases]
    events += [{"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": end - start,
                "args": {"correlation": index}} for index, (name, start, end) in enumerate(kernels)]
    events += [{"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernelEx", "ts": at, "dur": 5,
                "args": {"correlation": index}} for index, at in enumerate(launched or ()) if at is not None]
    events += [{"ph": "X", "cat": "user_annotation", "name": "gloo:broadcast", "ts": start, "dur": end - start}
               for start, end in signals]
    events.append({"ph": "M", "name": "process_name", "ts": 0, "args": {"name": "python"}})
    path.write_text(json.dumps({"traceEvents": events}))


def test_the_device_idles_where_no_rank_has_work_on_it(tmp_path):
    folder = tmp_path / "colocated"
    folder.mkdir()
    # the trainer packs 1000-3000 us, votes until 3500; the engine waits in the vote, then unpacks 4000-6000
    _trace(folder / "trainer.json", [("checks", 1000, 3000), ("vote", 3000, 3500), ("transfer", 3500, 6100)],
           kernels=[("pack", 1100, 2000), ("pack", 2000, 2900)], signals=[(500, 900), (3600, 3700)])
    _trace(folder / "engine.json", [("vote", 1200, 3500), ("transfer", 3500, 6000), ("outcome", 6000, 6200)],
           kernels=[("unpack", 4000, 5000), ("unpack", 4900, 6000)])
    ranks = {r.name: r for r in load(folder)}
    assert ranks["trainer"].signals == 1  # the one before its first phase is the bench's, not the update's
    text = describe(str(tmp_path))
    assert "one update, 5.20 ms" in text  # 1000 -> 6200 us
    assert "device busy 3.80 ms of 5.20 (73%)" in text  # 1100-2900 and 4000-6000, the overlap counted once
    lines = text.splitlines()
    gaps = [line.strip() for line in lines[lines.index(next(l for l in lines if "idle spans" in l)) + 1:]]
    assert gaps[0] == "1.90-  3.00 (1.10 ms): engine vote, trainer vote"  # 2900-4000, longest first
    assert gaps[1] == "5.00-  5.20 (0.20 ms): engine outcome, trainer -"  # the trainer's transfer ended at 6100
    assert gaps[2] == "0.00-  0.10 (0.10 ms): engine -, trainer checks"
    assert gaps[-1] == "in all 3 spans, 1.40 ms"


def test_a_hand_over_between_ranks_counts_from_when_the_device_was_free_and_the_work_launched(tmp_path):
    folder = tmp_path / "colocated-ahead"
    folder.mkdir()
    # trainer: two packs back to back; engine: one unpack launched long before the device was free
    # (starts 150 us after the last pack), one launched after (starts 100 us after its launch)
    _trace(folder / "trainer.json", [("checks", 0, 2000)], kernels=[("pack", 100, 1000), ("pack", 1000, 1900)],
           launched=[50, 60])
    _trace(folder / "engine.json", [("transfer", 0, 4000)], kernels=[("unpack", 2050, 3000), ("unpack", 3500, 3900)],
           launched=[500, 3400])
    # another rank's copy between the engine's two (no launch recorded: a hand-over not counted, though the
    # engine's second, after it, is)
    _trace(folder / "trainer-late.json", [("outcome", 0, 4000)], kernels=[("flag", 3100, 3110)], launched=[None])
    text = describe(str(tmp_path))
    assert text.splitlines()[-1] == ("  2 hand-overs of the device from one rank's work to another's launched work: "
                                     "each started 0.15 (median; 0.10-0.15) ms after the device was free and its "
                                     "launch made")
