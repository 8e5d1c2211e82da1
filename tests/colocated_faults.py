"""What a colocated fault drill must show, on the CPU or on one GPU: the same
invariants whatever holds the shared buffers."""

from __future__ import annotations

SCENARIOS = ["kill-receiver", "kill-sender", "corrupt-bucket", "config-mismatch"]


def check_detected_named_and_undone(result: dict, scenario: str, slack: float) -> None:
    """Every surviving endpoint raised naming the fault: within its timeout where an
    engine died, within the timeout plus `slack` where the store's host died (naming the
    silent peer watches heartbeats for a while); the engines it reached are stale and
    refuse to serve; after recovery an update is exact on every engine; nothing hung."""
    assert result["detected"] and result["recovered"] and not result["hung"], result
    errors = result["errors"]
    if scenario == "config-mismatch":
        assert all("config.layers: trainer pp0 tp0 has 2, engine 1 tp0 has 3" in e for e in errors.values()), errors
        return
    assert result["engine_state_after_fault"] == "stale", result
    if scenario == "kill-receiver":
        # the producer hears each reader directly: a dead one is named within the heartbeat window
        assert "update 2" in errors["trainer pp0 tp0"] and "engine 1 tp0" in errors["trainer pp0 tp0"], errors
        assert result["seconds_to_error"] < result["timeout"] + slack, result
        # the survivors hear that the update failed: none waits out its timeout for a signal that will not come
        assert all("engine 1 tp0" in e for e in errors.values()), errors
        assert result["seconds_until_all_raised"] < result["timeout"], result
        assert result["engine_states"] == {"engine 0": "stale", "engine 1": "killed"}, result
    elif scenario == "kill-sender":
        assert all("trainer pp0 tp0" in e and "update 2" in e for who, e in errors.items() if who.startswith("engine"))
        assert result["seconds_until_all_raised"] < result["timeout"] + slack, result
    else:
        assert "failed its checksum" in errors["engine 0 tp0"], errors
