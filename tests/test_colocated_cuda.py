"""The colocated method on one GPU: trainer and engine processes share CUDA memory by IPC,
ordered by interprocess events; run on the GPU machine, skipped (visibly) elsewhere.

Four processes on the one GPU, as the colocated deployments the method is for: two
trainer ranks and two engine ranks holding plain CUDA tensors in vLLM's layout, two
updates each checked bitwise against plain slicing of the full HF weights
(tests/reference.py), checksums on, with two slots or with each update packed ahead
of its vote: a CUDA-computed tail checks on the other process;
an engine whose device is busy; and the four chaos scenarios on one GPU.
"""

from __future__ import annotations

import pytest
import torch

from shardsync.presets import model_config
from tests.colocated_faults import SCENARIOS, check_detected_named_and_undone
from tests.transfer_harness import Case, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: run on the GPU machine (bench/RESULTS.md has the command)")

CASES = {
    # (train TP, train PP -> engine TP, engines)
    "qwen3 2,1->2,1": Case(model_config("qwen3-tiny"), 2, 1, 2, 1),
    "qwen3 2,1->1,2 replicas M:N": Case(model_config("qwen3-tiny"), 2, 1, 1, 2),
    "llama bf16 2,1->1,2": Case(model_config("llama-tiny"), 2, 1, 1, 2, dtype="bfloat16", bucket_bytes=1 << 16),
    "qwen3 kv_heads=1 1,2->2,1": Case(model_config("qwen3-tiny-mqa"), 1, 2, 2, 1),
}


@pytest.mark.parametrize("pack_ahead", [False, True], ids=["two slots", "packed ahead"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_four_processes_on_one_gpu_update_exactly_through_cuda_ipc(case, pack_ahead):
    """Also with every update packed ahead of its vote, NaN/Inf flagged by the copy kernel
    (each trainer's flag in memory every engine maps, which gates its copies)."""
    case = Case(**{**vars(case), "method": "colocated", "device": "cuda", "verify": True, "pack_ahead": pack_ahead})
    results = run(case)
    slot = case.bucket_bytes + 16 + 16  # a bucket, its checksum's tail, alignment
    flags = case.train_tp * case.train_pp if pack_ahead else 0
    for who, result in results.items():
        if who.startswith("engine"):  # the slots that feed it, and every trainer's flag
            assert result["mismatches"] == [[]] * case.updates, f"{who}: tensors differ from the reference"
            assert result["mappings_created"] == result["channels"] + flags and result["channels"] >= 1, who
            assert result["buffer_bytes"] == 0, who
        else:  # its slots, each reader's "read" events, and its flag
            assert result["mappings_created"] == 1 + case.engines * result["channels"] + bool(flags), who
            if pack_ahead:
                assert 2 * slot < result["buffer_bytes"] and result["bytes_sent"][0] <= result["buffer_bytes"], who
            else:
                assert 0 < result["buffer_bytes"] <= 2 * (case.bucket_bytes + 16), who


@pytest.mark.parametrize("busy_at, verify", [(1, False), (2, False), (2, True)],
                         ids=["first update", "later update", "with checksums"])
def test_an_engine_whose_copies_do_not_run_within_the_timeout_fails_the_update_and_is_stale(busy_at, verify):
    """The copies are only queued by the method; the update completes once they ran, so
    a device that does not get to them is a failed update with a bounded wait, not a
    weight update reported done while it is still to come, nor a host blocked in a
    wait without a deadline. The first update builds the copies' descriptors (their
    kernels were loaded at connect), a later one reuses them; with checksums the sums
    are read before the update completes. Each finds the engine's stream busy."""
    # the busy engine's own timeout is the shortest, so that its bounded wait, not a peer's, ends the update
    case = Case(model_config("qwen3-tiny"), 2, 1, 2, 1, method="colocated", device="cuda", timeout=8.0,
                timeouts=(("engine 0 tp1", 3.0),), in_place=True, updates=busy_at, verify=verify,
                faults=(("engine 0 tp1", f"busy-device:{busy_at}"),))
    results = run(case, allow_errors=True)
    busy = results["engine 0 tp1"].get("error", "")
    assert f"update {busy_at}: " in busy and "had not run on the device after 3s" in busy, busy
    assert "trainer pp0 tp" in busy, busy  # whose writes it was waiting on
    assert results["engine 0 tp1"]["stale"].startswith(f"update {busy_at} did not complete"), results["engine 0 tp1"]
    for who in ("trainer pp0 tp0", "trainer pp0 tp1"):
        assert f"update {busy_at}" in results[who].get("error", ""), results[who].get("error")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_fault_on_one_gpu_is_detected_named_and_undone(scenario):
    """`shardsync chaos --method colocated --device cuda`: a rank killed mid-update (its
    CUDA memory and events with it), a byte flipped before the copy that checks it, or a
    refused plan: every surviving endpoint raises naming the fault, engines it reached
    are stale, and after a restart and a reconnect an update is exact on every engine."""
    from shardsync.drills.chaos import run_scenario

    result = run_scenario(scenario, train_tp=2, infer_tp=1, engines=2, timeout=6.0, method="colocated",
                          device="cuda", log=lambda *_: None)
    check_detected_named_and_undone(result, scenario, slack=4.0)
    if scenario == "corrupt-bucket":  # found by the copy kernel's own sums
        assert "in the copy that wrote it" in result["errors"]["engine 0 tp0"], result["errors"]
