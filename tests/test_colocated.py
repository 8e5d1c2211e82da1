"""The colocated method end to end: trainer and engine processes on this host share
buffers (CPU shared memory), no byte crosses a socket.

Each case runs every rank as its own process and two updates with different trainer
weights, every engine tensor checked bitwise against plain slicing of the full HF
weights (tests/reference.py). Also: what is mapped and when, what memory it takes,
a slow reader with checksums on, and a producer made to reuse a slot too early.
"""

from __future__ import annotations

import pytest

from shardsync.drills.chaos import run_scenario
from shardsync.drills.soak import run_soak
from shardsync.presets import model_config
from tests.colocated_faults import SCENARIOS, check_detected_named_and_undone
from tests.transfer_harness import Case, exact, run


def _config(preset: str, **changes) -> dict:
    return {**model_config(preset), **changes}


CASES = {
    # (train TP, train PP -> engine TP, engines): what it covers
    "qwen3 tied qk-norm 2,1->2,2 replicas share slots": Case(_config("qwen3-tiny"), 2, 1, 2, 2),
    "qwen2 bias 2,1->4,1 kv-replicated": Case(_config("qwen2-tiny", num_key_value_heads=2), 2, 1, 4, 1),
    "qwen2 bias 4,1->2,1": Case(_config("qwen2-tiny"), 4, 1, 2, 1),
    "llama 2,2->2,1": Case(_config("llama-tiny"), 2, 2, 2, 1),
    "qwen3 kv_heads=1 1,2->2,2 checksums": Case(_config("qwen3-tiny-mqa"), 1, 2, 2, 2, verify=True),
    "llama bf16 4,1->1,1": Case(_config("llama-tiny", num_attention_heads=8, num_key_value_heads=4,
                                                   head_dim=16), 4, 1, 1, 1, dtype="bfloat16"),
}


PACKED_AHEAD = ["qwen3 tied qk-norm 2,1->2,2 replicas share slots", "qwen2 bias 4,1->2,1",
                "qwen3 kv_heads=1 1,2->2,2 checksums"]


def _colocated(case: Case, **changes) -> Case:
    return Case(**{**vars(case), "method": "colocated", **changes})


@pytest.mark.parametrize("case", [_colocated(c) for c in CASES.values()], ids=list(CASES))
def test_two_updates_are_exact_through_shared_buffers_mapped_once(case):
    results = run(case)
    trainers, engines = exact(results, case)
    for who, result in engines.items():
        # each engine rank maps the slots of each trainer rank that feeds it, once, and holds no buffer
        assert result["mappings_created"] == result["channels"] == result["groups_created"] >= 1, who
        assert result["buffer_bytes"] == 0 and result["peak_temp_bytes"] == 0, who
    for who, result in trainers.items():
        assert result["method"] == "colocated"
        assert result["mappings_created"] == 1, who  # its slots, made at connect, whatever its channels
        tail = 16 if case.verify else 0
        assert result["buffer_bytes"] <= 2 * (case.bucket_bytes + tail), f"{who}: more than two buckets"
    per_engine = sum(r["real_bytes"] for who, r in engines.items() if who.startswith("engine 0 "))
    for update in range(case.updates):
        assert sum(r["bytes_sent"][update] for r in trainers.values()) == per_engine


@pytest.mark.parametrize("case", [_colocated(CASES[name], pack_ahead=True) for name in PACKED_AHEAD],
                         ids=PACKED_AHEAD)
def test_updates_packed_ahead_of_the_vote_are_exact_from_slots_that_hold_a_whole_update(case):
    """A trainer that packs each update whole before the vote (`pack_ahead`) holds one
    slot a bucket, mapped once like two; its engines read them where the plan puts
    them once the vote is in."""
    results = run(case)
    trainers, engines = exact(results, case)
    for who, result in trainers.items():
        assert result["mappings_created"] == 1, who
        slot = case.bucket_bytes + (16 if case.verify else 0) + 16  # a bucket, its checksum's tail, alignment
        sent = result["bytes_sent"][0]
        assert sent <= result["buffer_bytes"] <= (sent // case.bucket_bytes + result["channels"]) * slot, who
        assert result["buffer_bytes"] > 2 * slot, f"{who}: the case must need more slots than two"


@pytest.mark.parametrize("pack_ahead", [False, True], ids=["two slots", "packed ahead"])
def test_a_slow_reader_with_checksums_on_gets_every_bucket_intact(pack_ahead):
    """Engine 1 takes 10 ms before each piece it writes: the producer's slots stay in use
    that long, the producer waits for them (packed ahead: the next update's packs wait
    for the last one's closing acknowledgement), and every checksum holds."""
    case = _colocated(CASES["qwen3 tied qk-norm 2,1->2,2 replicas share slots"], verify=True, bucket_bytes=16384,
                      faults=(("engine 1 tp0", "slow-reader"), ("engine 1 tp1", "slow-reader")),
                      pack_ahead=pack_ahead)
    results = run(case)
    for who, result in results.items():
        if who.startswith("engine"):
            assert result["mismatches"] == [[]] * case.updates, who


def test_a_slot_written_again_before_its_readers_are_done_is_caught():
    """The producer trainer pp0 tp0 writes each slot again without waiting for its
    readers (injected), while engine 0 reads slowly: engine 0 finds a bucket that changed
    while it was read, and every member of that channel fails the update."""
    case = _colocated(CASES["qwen3 tied qk-norm 2,1->2,2 replicas share slots"], verify=True, bucket_bytes=16384,
                      updates=1, faults=(("trainer pp0 tp0", "reuse-slots-early"), ("engine 0 tp0", "slow-reader")))
    results = run(case, allow_errors=True)
    error = results["engine 0 tp0"].get("error", "")
    assert "changed while it was read" in error or "failed its checksum" in error, results["engine 0 tp0"]
    assert "update 1: channel pp0-tp0-to-tp0" in results["trainer pp0 tp0"].get("error", ""), results
    # the acknowledgement names a reader that caught it (engine 1 may race the producer too)
    assert "tp0 received a bucket that failed its checksum" in results["trainer pp0 tp0"]["error"]
    assert all("error" in r for r in results.values()), results  # the update failed everywhere, and said so


TIMEOUT = 4.0
SLACK = 4.0  # naming the silent peer watches heartbeats for 2 s; process scheduling on 2 busy cores


@pytest.mark.parametrize("scenario,pack_ahead", [(s, False) for s in SCENARIOS] + [
    (s, True) for s in SCENARIOS if s != "config-mismatch"])  # (refused at connect: no update to pack)
def test_a_fault_in_a_colocated_transfer_is_detected_named_and_undone(scenario, pack_ahead):
    """`shardsync chaos --method colocated [--pack-ahead]`: every surviving endpoint raises
    naming the fault, engines it reached are stale and refuse to serve, a reconnect
    brings every engine back exact, and afterwards the live processes map one segment per
    sending trainer rank (its slots) and nothing that a dead or closed endpoint held.
    Packed ahead, engines read every slot once the vote is in, with no signal a bucket:
    a peer lost mid-update is named by the closing acknowledgement instead."""
    result = run_scenario(scenario, train_tp=2, infer_tp=1, engines=2, timeout=TIMEOUT, method="colocated",
                          pack_ahead=pack_ahead, log=lambda *_: None)
    check_detected_named_and_undone(result, scenario, SLACK)
    assert result["shared_memory_released"], result["shared_segments"]


def test_two_hundred_colocated_updates_are_exact_and_leak_nothing():
    """`shardsync soak --method colocated`: buffers mapped once at connect, every update
    exact, and no rank's file descriptors, threads, memory or mapped segments grow."""
    result = run_soak("qwen3-tiny", train_tp=2, infer_tp=1, engines=2, updates=200, method="colocated")
    assert result["exact_updates"] == 200, result
    assert result["buffers_mapped_at_connect"] == 2 + 4 and result["buffers_mapped_during_updates"] == 0, result
    for who, growth in result["growth"].items():
        assert growth["fds"] <= 0 and growth["shm_segments"] <= 0 and growth["threads"] <= 0, (who, growth)
    for who, resources in result["at_end"].items():
        # a trainer rank maps its own slots; an engine rank (TP 1) those of both trainer ranks
        assert resources["shm_segments"] == (1 if who.startswith("trainer") else 2), (who, resources)
    assert result["ok"], result


def test_slots_that_do_not_fit_in_shared_memory_are_refused_at_once_not_at_first_touch():
    import torch

    from shardsync.runtime.errors import TransferError
    from shardsync.runtime.wire.shared import create_slots

    with pytest.raises(TransferError, match="cannot reserve .* MiB of shared memory in .*--shm-size"):
        create_slots(1 << 40, 2, torch.float32, torch.device("cpu"))


def test_a_reader_elsewhere_is_refused_naming_the_producer():
    import dataclasses

    import torch

    from shardsync.runtime.errors import TransferError
    from shardsync.runtime.wire.shared import create_slots, map_slots

    slots = create_slots(64, 2, torch.float32, torch.device("cpu"))
    try:
        mapped = map_slots(slots.handle, torch.device("cpu"), "trainer pp0 tp0")
        slots[1].fill_(3.0)  # the same memory, seen from both mappings
        assert torch.equal(mapped[1], torch.full((64,), 3.0))
        mapped.close()
        elsewhere = dataclasses.replace(slots.handle, host="another-host")
        with pytest.raises(TransferError, match="trainer pp0 tp0 is on host 'another-host'.*use method 'shard'"):
            map_slots(elsewhere, torch.device("cpu"), "trainer pp0 tp0")
        on_gpu = dataclasses.replace(slots.handle, device_type="cuda")
        with pytest.raises(TransferError, match="trainer pp0 tp0's buffers are cuda memory"):
            map_slots(on_gpu, torch.device("cpu"), "trainer pp0 tp0")
    finally:
        slots.close()
