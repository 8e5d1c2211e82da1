"""End-to-end transfers over gloo between trainer and engine processes (plain tensors).

Each case runs every rank as its own process, performs two updates with different
trainer weights, and checks every engine tensor bitwise against plain slicing of
the full HF weights (tests/reference.py), channel reuse, buffer memory and bytes.
"""

from __future__ import annotations

import pytest

from shardsync.presets import model_config
from tests.transfer_harness import Case, exact, run


def _config(preset: str, **changes) -> dict:
    return {**model_config(preset), **changes}


CASES = {
    # (train TP, train PP -> engine TP, engines): what it covers
    "llama 1,1->1,1": Case(_config("llama-tiny"), 1, 1, 1, 1),
    "qwen3 tied qk-norm 2,1->2,2": Case(_config("qwen3-tiny"), 2, 1, 2, 2),
    "qwen2 bias 2,1->4,1 kv-replicated": Case(_config("qwen2-tiny", num_key_value_heads=2), 2, 1, 4, 1),
    "qwen2 bias 4,1->2,1": Case(_config("qwen2-tiny"), 4, 1, 2, 1),
    "llama 2,2->2,1": Case(_config("llama-tiny"), 2, 2, 2, 1),
    "qwen3 kv_heads=1 1,2->2,2": Case(_config("qwen3-tiny-mqa"), 1, 2, 2, 2),
    "llama bf16 4,1->1,1": Case(_config("llama-tiny", num_attention_heads=8, num_key_value_heads=4, head_dim=16), 4, 1, 1, 1,
                                dtype="bfloat16"),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_two_updates_are_exact_and_reuse_channels(case):
    results = run(case)
    trainers, engines = exact(results, case)
    for who, result in results.items():
        # channels are created at connect only: the second update created none
        assert result["groups_created"] == result["channels"] >= 1, who
        assert result["buffer_bytes"] <= 2 * case.bucket_bytes, f"{who}: more than two buckets of buffers"

    # nothing is sent twice: each engine TP rank's real bytes cross the wire once,
    # shared by all replicas through one broadcast
    per_engine = sum(r["real_bytes"] for who, r in engines.items() if who.startswith("engine 0 "))
    for update in range(case.updates):
        assert sum(r["bytes_sent"][update] for r in trainers.values()) == per_engine


GATHER_CASES = {
    "qwen3 tied qk-norm 2,1->2,2": Case(_config("qwen3-tiny"), 2, 1, 2, 2, method="gather"),
    "qwen2 bias 4,1->2,1": Case(_config("qwen2-tiny"), 4, 1, 2, 1, method="gather"),
    "llama 2,2->2,1": Case(_config("llama-tiny"), 2, 2, 2, 1, method="gather"),
    # no vLLM layout table in the spec: "auto" picks gather, full HF tensors go to the loader
    "mistral (HF only, auto) 2,2->2,2": Case(_config("mistral-tiny"), 2, 2, 2, 2),
}


@pytest.mark.parametrize("case", list(GATHER_CASES.values()), ids=list(GATHER_CASES))
def test_the_gather_baseline_delivers_the_same_tensors_holding_whole_ones(case, request):
    """method="gather" (the common path, for comparison) is exact too; its cost shows
    in whole tensors held and in every engine rank receiving the whole stage."""
    if case.method == "auto":
        request.getfixturevalue("hf_only_converters")
    results = run(case)
    for who, result in results.items():
        assert result["method"] == "gather", who
        assert result["groups_created"] == result["channels"] >= 1, who
        assert result["buffer_bytes"] <= 2 * case.bucket_bytes, who
        assert result.get("mismatches", [[]] * case.updates) == [[]] * case.updates, who
    largest_hf = 4 * max(_numel(s) for s in _hf_shapes(case.hf_config).values())
    for pp in range(case.train_pp):
        assert results[f"trainer pp{pp} tp0"]["peak_temp_bytes"] >= largest_hf
        stage_bytes = results[f"trainer pp{pp} tp0"]["bytes_sent"]
        assert all(b > 0 for b in stage_bytes)
        assert all(results[f"trainer pp{pp} tp{t}"]["bytes_sent"] == [0] * case.updates
                   for t in range(1, case.train_tp))
    for who, result in results.items():
        if who.startswith("engine"):
            assert result["peak_temp_bytes"] > 0, who


def test_the_method_follows_the_spec_with_a_reason(hf_only_converters):
    """"auto" takes the shard path where the spec has a vLLM layout table and gather
    where it has none; asking for shard without a table is refused before connecting."""
    from shardsync.runtime.errors import PlanError
    from shardsync.runtime.transfer import Receiver, Sender

    layout = Case(_config("qwen3-tiny"), 1, 1, 1, 1).layout
    assert Sender(_config("qwen3-tiny"), layout, pp_rank=0, tp_rank=0).method == "shard"
    hf_only = Sender(_config("mistral-tiny"), layout, pp_rank=0, tp_rank=0)
    assert hf_only.method == "gather" and "mistral_hf_only spec has no vLLM layout table" in hf_only.method_reason
    with pytest.raises(PlanError, match="method 'shard' needs a vLLM layout table.*mistral_hf_only spec names no vllm"):
        Receiver(_config("mistral-tiny"), layout, engine=0, tp_rank=0, method="shard")
    with pytest.raises(PlanError, match="method 'gahter': expected one of auto, shard, gather"):
        Sender(_config("qwen3-tiny"), layout, pp_rank=0, tp_rank=0, method="gahter")


def _hf_shapes(hf_config: dict) -> dict:
    from shardsync import generated

    module = generated.for_architecture(hf_config["architectures"][0])
    return module.hf_shapes(module.config_from_hf(hf_config))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.mark.parametrize("stalled,waiting,peer_named", [
    ("engine 0 tp0", "trainer pp0 tp0", "engine 0 tp0"),
    ("trainer pp0 tp0", "engine 0 tp0", "trainer pp0 tp0"),
])
def test_a_silent_peer_times_out_naming_channel_peer_and_update(stalled, waiting, peer_named):
    case = Case(_config("qwen3-tiny"), 1, 1, 1, 1, timeout=4.0, stall=stalled, updates=1)
    results = run(case, allow_errors=True)
    assert results[stalled] == {"stalled": True}
    error, seconds = results[waiting]["error"], results[waiting]["seconds"]
    last = error.strip().splitlines()[-1]
    # connected but silent: the vote before the update is where it shows (alive, so not "stopped")
    assert last.startswith(f"shardsync.runtime.errors.TransferError: update 1: no word from {peer_named} before the update"), last
    assert f"{peer_named} still alive" in last, last
    assert seconds < case.timeout + 3, f"took {seconds:.1f}s for a {case.timeout}s timeout"



def _connect_only(kind: str, port: int, bucket_bytes: int) -> dict:
    from shardsync.runtime.errors import PlanError
    from shardsync.runtime.transfer import Receiver, Sender

    config = _config("qwen3-tiny")
    layout = Case(config, 1, 1, 1, 1).layout
    options = {"rendezvous": f"127.0.0.1:{port}", "bucket_bytes": bucket_bytes, "timeout": 20.0}
    end = (Sender(config, layout, pp_rank=0, tp_rank=0, **options) if kind == "trainer"
           else Receiver(config, layout, engine=0, tp_rank=0, **options))
    try:
        end.connect()
    except PlanError as exc:
        return {"refused": str(exc)}
    end.close()
    return {"refused": None}


def test_different_bucket_sizes_are_refused_at_connect_naming_the_field():
    """Plans that differ only in what shapes the wire must not get past connect."""
    from shardsync.harness.local_cluster import free_port, run_ranks

    port = free_port()
    results = run_ranks([("trainer", _connect_only, ("trainer", port, 4096)),
                         ("engine", _connect_only, ("engine", port, 8192))], deadline_s=60)
    for who in ("trainer", "engine"):
        message = results[who].get("refused")
        assert message and "bucket_bytes: trainer pp0 tp0 has 4096, engine 0 tp0 has 8192" in message, results
