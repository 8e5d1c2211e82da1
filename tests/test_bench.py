"""`shardsync bench` runs the methods on the same processes and reports what it says.

No timing is asserted (the machine is shared and noisy): only that the run is
complete, that every method leaves the engines with the same bytes, and that the
memory and byte counts have the shape the methods imply.
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_compares_every_method_on_the_same_processes(tmp_path):
    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    command = [sys.executable, "-m", "shardsync.cli", "bench", "--model", "qwen3-tiny", "--train-tp", "2",
               "--infer-tp", "2", "--engines", "2", "--repeat", "2", "--bucket-mb", "0.25", "--json", str(out),
               "--plot", str(plot)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "engines hold the same bytes after every method: yes" in result.stdout
    report = json.loads(out.read_text())
    assert plot.stat().st_size > 0
    assert report["methods"] == ["shard", "gather", "colocated"]  # every method the spec allows, by default
    for key in ("update_s", "speedup_vs_gather", "trainer_peak_extra_bytes", "engine_peak_extra_bytes",
                "bytes_sent_per_trainer_rank"):
        assert set(report[key]) == set(report["methods"]), key
    assert report["speedup_vs_gather"]["gather"] == 1.0
    assert report["engines_equal"] is True
    assert all(len(report["update_s_each"][m]) == 2 for m in report["methods"])
    for method in report["methods"]:  # where each update's time went, phase by phase, on both sides
        for role in ("trainer", "engine"):
            phases = report["phase_s"][method][role]
            assert list(phases) == ["checks", "vote", "transfer", "outcome"], (method, role)
            assert all(seconds > 0 for seconds in phases.values()), (method, role)
        assert report["phase_s"][method]["trainer"]["transfer"] <= max(report["update_s_each"][method])
    assert "colocated phases (slowest rank, median): trainer checks" in result.stdout
    bucket = report["bucket_bytes"]
    # the shard path holds its two buffers and nothing else; the baseline holds whole tensors
    assert all(b <= 2 * bucket for b in report["trainer_peak_extra_bytes"]["shard"])
    assert report["trainer_peak_extra_bytes"]["gather"][0] > 2 * bucket
    # colocated: two shared slots per trainer rank, and nothing at all on the engine side
    assert all(0 < b <= 2 * bucket for b in report["trainer_peak_extra_bytes"]["colocated"])
    assert report["engine_peak_extra_bytes"]["colocated"] == [0] * 4
    assert report["bytes_sent_per_trainer_rank"]["colocated"] == report["bytes_sent_per_trainer_rank"]["shard"]
    # shard to shard: both trainer ranks send; the baseline: TP rank 0 sends everything
    shard_sent = report["bytes_sent_per_trainer_rank"]["shard"]
    gather_sent = report["bytes_sent_per_trainer_rank"]["gather"]
    assert min(shard_sent) > 0 and gather_sent[1] == 0
    # the whole model either way (counted once per broadcast), but the norms, which
    # every engine TP rank holds whole, go once per engine TP rank on the shard path
    assert 0 < sum(shard_sent) - gather_sent[0] < 0.01 * gather_sent[0]


def test_bench_takes_expert_parallel_layouts(tmp_path):
    """TP 2 x EP 2 (expert TP 1): each rank sends its own experts shard to shard; the
    baseline's rank 0 gathers every expert over EP and sends the whole model. Traced
    (`--trace`): one more update of each method, recorded on every rank."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "shardsync.cli", "bench", "--model", "qwen3-moe-tiny", "--train-tp", "2",
               "--train-ep", "2", "--train-etp", "1", "--infer-tp", "2", "--engines", "2", "--repeat", "1",
               "--bucket-mb", "0.25", "--methods", "shard,gather", "--json", str(out),
               "--trace", str(tmp_path / "trace")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trainer TP 2 PP 1 EP 2 ETP 1 DP 1" in result.stdout
    # one more update of each method traced on every rank, and where its time went
    ranks = {"trainer-pp0-tp0", "trainer-pp0-tp1"} | {f"engine-{e}-tp{t}" for e in range(2) for t in range(2)}
    for method in ("shard", "gather"):
        assert {p.stem for p in (tmp_path / "trace" / method).glob("*.json")} == ranks, method
        assert f"{method}: one update, " in result.stdout
    assert "  engine-1-tp1: checks " in result.stdout and " vote " in result.stdout
    report = json.loads(out.read_text())
    assert report["methods"] == ["shard", "gather"]
    assert (report["train_ep"], report["train_etp"], report["train_dp"]) == (2, 1, 1)
    assert report["trainer_ranks"] == ["trainer pp0 tp0", "trainer pp0 tp1"]
    assert report["engines_equal"] is True
    bucket = report["bucket_bytes"]
    assert all(b <= 2 * bucket for b in report["trainer_peak_extra_bytes"]["shard"])
    assert all(b > 2 * bucket for b in report["trainer_peak_extra_bytes"]["gather"])  # both gather experts
    shard_sent, gather_sent = (report["bytes_sent_per_trainer_rank"][m] for m in ("shard", "gather"))
    assert min(shard_sent) > 0 and gather_sent[1] == 0 and gather_sent[0] > 0
