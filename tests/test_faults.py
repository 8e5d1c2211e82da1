"""Failures are prompt, precise and recoverable: refused plans, killed ranks, corrupted
buckets, bad tensors, and a long run that must not leak.

The processes are real (spawned ranks over gloo and a real TCPStore), the faults
real too: SIGKILL in the middle of an update, a flipped byte in a received bucket.
Timeouts are short so the suite stays quick.
"""

from __future__ import annotations

import pytest
import torch

from shardsync.runtime.errors import PlanError
from shardsync.runtime.plan import Layout
from shardsync.runtime.transfer import Receiver, Sender
from shardsync.drills.chaos import run_scenario
from shardsync.harness.local_cluster import free_port
from shardsync.presets import model_config
from shardsync.harness.rank_actors import RankProcess, RankSpec, call, collect
from shardsync.drills.soak import run_soak

TIMEOUT = 4.0
SLACK = 4.0  # naming the silent peer watches heartbeats for 2 s; process scheduling on 2 busy cores


@pytest.mark.parametrize("scenario", ["kill-receiver", "kill-sender", "corrupt-bucket", "config-mismatch"])
def test_a_fault_is_detected_named_and_undone(scenario):
    result = run_scenario(scenario, train_tp=2, infer_tp=1, engines=2, timeout=TIMEOUT, log=lambda *_: None)
    assert result["detected"] and not result["hung"], result
    assert result["recovered"], result
    errors = result["errors"]
    if scenario == "config-mismatch":
        assert result["engine_state_after_fault"].startswith("refused at connect"), result
        assert all("config.layers: trainer pp0 tp0 has 2, engine 1 tp0 has 3" in e for e in errors.values()), errors
        assert result["seconds_until_all_raised"] < TIMEOUT, result  # nobody waited out a timeout
        return
    assert result["engine_state_after_fault"] == "stale", result
    if scenario == "kill-receiver":
        # every sender raises within the timeout, naming the channel, the peer and the update
        for who in ("trainer pp0 tp0", "trainer pp0 tp1"):
            assert "update 2" in errors[who] and "engine 1 tp0" in errors[who], errors[who]
        assert "channel pp0-tp0-to-tp0" in errors["trainer pp0 tp0"] or "channel pp0-tp1-to-tp0" in errors[
            "trainer pp0 tp0"], errors
        assert result["seconds_to_error"] < TIMEOUT + SLACK, result
        # the survivors hear that the update failed: none waits out its timeout for a signal that will not come
        assert all("engine 1 tp0" in e for e in errors.values()), errors
        assert result["seconds_until_all_raised"] < TIMEOUT, result
        assert result["engine_states"] == {"engine 0": "stale", "engine 1": "killed"}, result
        assert result["channels_recreated"] == 2, result  # both channels hold the restarted engine
    elif scenario == "kill-sender":
        assert all("trainer pp0 tp0" in e and "update 2" in e for who, e in errors.items() if who.startswith("engine"))
        assert result["seconds_until_all_raised"] < TIMEOUT + SLACK, result
    else:
        assert "failed its checksum" in errors["engine 0 tp0"], errors
        assert result["engine_states"] == {"engine 0": "stale", "engine 1": "fresh"}, result


def test_a_killed_store_host_is_detected_and_undone_with_experts_on_a_dense_dp_replica():
    """TP 1 x EP 2: the second sender is dense DP rank 1, there for its experts; the first
    (the store's host) is killed mid-update, every engine names it, and the restarted
    trainer, both ranks, brings every engine back exact."""
    result = run_scenario("kill-sender", model="qwen3-moe-tiny", train_tp=1, train_ep=2, infer_tp=2, engines=1,
                          timeout=TIMEOUT, log=lambda *_: None)
    assert result["detected"] and result["recovered"] and not result["hung"], result
    assert result["train_dp"] == 2 and result["engine_state_after_fault"] == "stale", result
    assert all("trainer pp0 tp0" in e and "update 2" in e for who, e in result["errors"].items()
               if who.startswith("engine")), result["errors"]
    assert result["channels_recreated"] == 4, result  # each sender's channel to each engine TP rank


def _connect(role: str, hf_config: dict, layout: Layout, port: int, **extra) -> RankProcess:
    position = (0, 0)
    who = "trainer pp0 tp0" if role == "trainer" else "engine 0 tp0"
    options = {"rendezvous": f"127.0.0.1:{port}", "timeout": 20.0, **extra}
    return RankProcess(RankSpec(who, role, hf_config, layout, options, position))


@pytest.mark.parametrize("trainer_layout, engine_layout, trainer_options, engine_options, expected", [
    (Layout(1, 1, 1, 1), Layout(2, 1, 1, 1), {}, {}, "train_tp: trainer pp0 tp0 has 1, engine 0 tp0 has 2"),
    (Layout(1, 1, 1, 1), Layout(1, 1, 1, 2), {}, {}, "engines: trainer pp0 tp0 has 1, engine 0 tp0 has 2"),
    (Layout(1, 1, 1, 1), Layout(1, 1, 1, 1), {"verify": True}, {}, "verify: trainer pp0 tp0 has True, engine 0 tp0 has False"),
    (Layout(1, 1, 1, 1), Layout(1, 1, 1, 1), {}, {"dtype": "bfloat16"},
     "dtype: trainer pp0 tp0 has 'float32', engine 0 tp0 has 'bfloat16'"),
])
def test_parallelisms_or_wire_settings_that_differ_are_refused_at_connect(trainer_layout, engine_layout,
                                                                          trainer_options, engine_options, expected):
    """Each side counts different peers, so no group could ever form: both refuse at
    once, naming the field and both values, instead of waiting for peers that never come."""
    port, config = free_port(), model_config("qwen3-tiny")
    ranks = [_connect("trainer", config, trainer_layout, port, **trainer_options),
             _connect("engine", config, engine_layout, port, **engine_options)]
    try:
        replies = call(ranks, "connect", timeout=30)
    finally:
        for rank in ranks:
            rank.kill()
    for who, reply in replies.items():
        assert reply.get("error_type") == "PlanError" and expected in reply["error"], (who, reply)
        assert reply["seconds"] < 10, (who, reply["seconds"])


def test_an_unknown_architecture_or_an_impossible_tp_is_refused_before_connecting():
    config = model_config("qwen3-tiny")
    with pytest.raises(PlanError, match="no spec for architecture 'FooForCausalLM'"):
        Sender({**config, "architectures": ["FooForCausalLM"]}, Layout(1, 1, 1, 1), pp_rank=0, tp_rank=0)
    # checked while planning, before the store is reached (nothing listens on this port)
    with pytest.raises(ValueError, match="tp_size=3 does not divide num_key_value_heads=2"):
        Sender(config, Layout(3, 1, 1, 1), pp_rank=0, tp_rank=0, rendezvous="127.0.0.1:1").connect()
    six_heads = {**config, "num_attention_heads": 6, "num_key_value_heads": 6}
    with pytest.raises(ValueError, match="tp_size=3 does not divide vLLM's padded vocab_size=1024"):
        Receiver(six_heads, Layout(1, 1, 3, 1), engine=0, tp_rank=0, rendezvous="127.0.0.1:1").connect()


TRAINER_FAULTS = [
    ("nan", "NaN/Inf value(s)"),
    ("inf", "NaN/Inf value(s)"),
    ("missing", "missing from the trainer tensors"),
    ("extra", "decoder.layers.99.mlp.linear_fc9.weight: not a trainer tensor"),
    ("shape", "expected shape"),
    ("dtype", "dtype int32 is not a floating-point weight"),
    ("duplicate", "given twice"),
]


@pytest.mark.parametrize("method", [
    {}, {"method": "colocated", "pack_ahead": True},
    pytest.param({"method": "colocated", "pack_ahead": True, "device": "cuda"},
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: on the GPU machine"))],
    ids=["shard", "colocated packed ahead", "colocated packed ahead on one GPU"])
def test_bad_tensors_are_refused_everywhere_before_any_byte_moves(method):
    """Each bad input, on one trainer rank or on the engine: that rank raises naming the
    tensor, every other endpoint raises UpdateRefused at once, the engine keeps its
    weights and is not stale, and the next good update goes through on the same channels.
    Packed ahead, the trainers' packs flag the NaN and Inf themselves (no pass of their
    own) and the engine, whose slots already hold the bad update, reads none of it. On a
    GPU the vote does not wait for the packs: their flags close the gate the engine's
    copies read on the device, and the trainer that found the NaN or Inf fails the update
    in its outcome, which the others hear (UpdateFailedElsewhere), its words and all."""
    gated = method.get("device") == "cuda"
    config, layout, port = model_config("qwen3-tiny"), Layout(2, 1, 1, 1), free_port()
    options = {"rendezvous": f"127.0.0.1:{port}", "timeout": 20.0, "verify": True, "bucket_bytes": 1 << 16, **method}
    ranks = [RankProcess(RankSpec(f"trainer pp0 tp{tp}", "trainer", config, layout, options, (0, tp)))
             for tp in range(2)]
    engine = RankProcess(RankSpec("engine 0 tp0", "engine", config, layout, options, (0, 0)))
    ranks.append(engine)
    bad = ranks[1]
    try:
        assert not any(r.get("error") for r in call(ranks, "connect", timeout=60).values())
        assert not any(r.get("error") for r in call(ranks, "update", 1, timeout=30).values())
        for fault, words in TRAINER_FAULTS + [("engine dtype", "dtype float64, the update carries float32")]:
            if fault == "engine dtype":
                replies = _update_with(ranks, engine, 2, "dtype")
            else:
                replies = _update_with(ranks, bad, 2, fault)
            refuser = engine.who if fault == "engine dtype" else bad.who
            assert replies[refuser]["error_type"] == "TensorError" and words in replies[refuser]["error"], replies
            heard_as = "UpdateFailedElsewhere" if gated and fault in ("nan", "inf") else "UpdateRefused"
            for who, reply in replies.items():
                assert reply["seconds"] < 5, (fault, who, reply)
                if who != refuser:
                    assert reply["error_type"] == heard_as and refuser in reply["error"], (fault, who, reply)
                    assert words in reply["error"], (fault, who, reply)
            assert call([engine], "check", 1, timeout=30)[engine.who]["mismatched"] == [], fault  # untouched
            assert call([engine], "state", timeout=30)[engine.who]["stale"] is None, fault
        # allowed by an option: NaN goes through and lands in the engine
        replies = _update_with(ranks, bad, 3, "nan-allowed")
        assert not any(r.get("error") for r in replies.values()), replies
        assert call([engine], "nonfinite", timeout=30)[engine.who]["names"], "the NaN was not delivered"
        assert not any(r.get("error") for r in call(ranks, "update", 4, timeout=30).values())
        assert call([engine], "check", 4, timeout=30)[engine.who]["mismatched"] == []
    finally:
        for rank in ranks:
            rank.kill()


def _update_with(ranks, faulty, seed, fault):
    for rank in ranks:
        rank.send("update", seed, fault if rank is faulty else None)
    return collect(ranks, 30)


def test_two_hundred_updates_with_checksums_are_exact_and_leak_nothing():
    result = run_soak("qwen3-tiny", train_tp=2, infer_tp=1, engines=2, updates=200)
    print({k: result[k] for k in ("seconds", "after_first_update", "at_end", "growth")})
    assert result["exact_updates"] == 200
    assert result["channels_created_at_connect"] > 0 and result["channels_created_during_updates"] == 0
    for who, growth in result["growth"].items():
        assert growth["threads"] <= 0 and growth["fds"] <= 0, (who, growth)
        assert growth["rss"] <= 16 << 20, (who, growth)
    assert result["ok"]


def test_the_store_listens_on_loopback_only_unless_given_an_address():
    import psutil

    from shardsync.runtime.session import Session, local_address

    port = free_port()
    session = Session("trainer pp0 tp0", ["trainer pp0 tp0"], "trainer pp0 tp0", "127.0.0.1", port, 5.0)
    session.open()
    try:
        listening = [c.laddr for c in psutil.Process().net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
    finally:
        session.close()
    assert local_address("127.0.0.1") == "127.0.0.1"


def test_the_store_host_closes_promptly_after_an_engine_was_killed():
    """The host's close keeps the store up for peers still reading the last update, but
    not for one that is gone: an engine killed mid-update holds it for about the time
    its heartbeat takes to be missed, not for the timeout."""
    from shardsync.runtime.session.liveness import SILENT_AFTER_S

    timeout = 10.0
    assert SILENT_AFTER_S + SLACK < timeout
    config, layout, port = model_config("qwen3-tiny"), Layout(1, 1, 1, 2), free_port()
    options = {"rendezvous": f"127.0.0.1:{port}", "timeout": timeout}
    trainer = RankProcess(RankSpec("trainer pp0 tp0", "trainer", config, layout, options, (0, 0)))
    engines = [RankProcess(RankSpec(f"engine {e} tp0", "engine", config, layout, options, (e, 0))) for e in range(2)]
    ranks, victim = [trainer] + engines, engines[1]
    try:
        assert not any(r.get("error") for r in call(ranks, "connect", timeout=60).values())
        assert not any(r.get("error") for r in call(ranks, "update", 1, timeout=30).values())
        for rank in (trainer, engines[0]):
            rank.send("update", 2)
        victim.send("update", 2, "die")
        assert victim.reached_mid_update(30)
        victim.kill()
        replies = collect([trainer, engines[0]], 3 * timeout)
        assert all("update 2" in r.get("error", "") for r in replies.values()), replies
        closed = call([trainer, engines[0]], "close", timeout=30)
        assert not any(r.get("error") for r in closed.values()), closed
        assert closed[trainer.who]["seconds"] < SILENT_AFTER_S + SLACK, closed
        assert closed[engines[0].who]["seconds"] < SLACK, closed
    finally:
        for rank in ranks:
            rank.kill()
