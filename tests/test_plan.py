"""The planner, pure Python over shapes: no processes, no tensors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardsync.generated import qwen2, qwen3
from shardsync.runtime.errors import PlanError
from shardsync.runtime.plan import boxes
from shardsync.runtime.plan import Layout, build_plan
from shardsync.runtime.plan.check import check_plan
from shardsync.runtime.plan.summary import summarize
from shardsync.presets import model_config
from tests.strategies import engine_tps, hf_configs

QWEN3_4B = qwen3.config_from_hf(model_config("qwen3-4b"))
QWEN3_TINY = qwen3.config_from_hf(model_config("qwen3-tiny"))


def _real_bytes(table, dtype_bytes):
    total = 0
    for local in table:
        numel = 1
        for n in local.shape:
            numel *= n
        for pad in local.padding:
            pad_numel = 1
            for start, stop in pad:
                pad_numel *= stop - start
            numel -= pad_numel
        total += numel * dtype_bytes
    return total


def test_the_plan_and_its_hash_are_deterministic():
    layout = Layout(2, 1, 2, 2)
    first, second = build_plan(qwen3, QWEN3_4B, layout, 2), build_plan(qwen3, QWEN3_4B, layout, 2)
    assert first.channels == second.channels and first.digest == second.digest
    assert build_plan(qwen3, QWEN3_4B, Layout(2, 1, 2, 1), 2).digest != first.digest
    assert build_plan(qwen3, QWEN3_4B, layout, 4).digest != first.digest


def test_equal_tp_is_one_engine_rank_per_trainer_rank_when_vocab_paddings_agree():
    # qwen3-tiny: vocab 1000 pads to 1024 in Megatron (128 * 2) and in vLLM (64)
    plan = build_plan(qwen3, QWEN3_TINY, Layout(2, 1, 2, 2), 2)
    assert [(c.src_rank, c.dst_tp, c.engines) for c in plan.channels] == [(0, 0, 2), (1, 1, 2)]


def test_equal_tp_crosses_ranks_only_for_vocab_rows_the_paddings_put_elsewhere():
    # qwen3-4b: vocab 151936; Megatron rank 0 holds 76032 rows, vLLM rank 0 only 75968
    plan = build_plan(qwen3, QWEN3_4B, Layout(2, 1, 2, 2), 2)
    crossing = [c for c in plan.channels if c.tp != c.dst_tp]
    assert [(c.name, len(c.copies)) for c in crossing] == [("pp0-tp0-to-tp1", 1)]
    [copy] = crossing[0].copies
    assert copy.hf_name == "model.embed_tokens.weight"
    assert copy.src_box == ((75968, 76032), (0, 2560)) and copy.dst_box == ((0, 64), (0, 2560))


def test_each_source_sends_about_half_at_equal_tp():
    summary = summarize(build_plan(qwen3, QWEN3_4B, Layout(2, 1, 2, 2), 2))
    sent = [s["bytes_sent"] for s in summary["src_ranks"]]
    assert summary["gathers"] == 0
    assert abs(sent[0] - sent[1]) / sum(sent) < 0.001


@pytest.mark.parametrize("train_tp,infer_tp", [(4, 2), (2, 4), (4, 1), (1, 4)])
def test_each_engine_rank_receives_exactly_its_shard(train_tp, infer_tp):
    summary = summarize(build_plan(qwen3, QWEN3_4B, Layout(train_tp, 1, infer_tp, 1), 2))
    for dst in summary["dst_ranks"]:
        assert dst["bytes_received"] == _real_bytes(qwen3.vllm_shard_table(QWEN3_4B, dst["tp"], infer_tp), 2)
    assert summary["gathers"] == 0


def test_replicated_tensors_are_spread_over_sources():
    plan = build_plan(qwen3, QWEN3_4B, Layout(4, 1, 1, 1), 2)
    norm_sources = {c.src_rank for c in plan.channels for x in c.copies if "layernorm" in x.src_tensor}
    assert norm_sources == {0, 1, 2, 3}
    sent = [s["bytes_sent"] for s in summarize(plan)["src_ranks"]]
    assert max(sent) - min(sent) < 0.001 * sum(sent)


def test_pipeline_stages_are_more_sources():
    plan = build_plan(qwen3, QWEN3_TINY, Layout(1, 2, 2, 1), 2)
    stage_of = {c.src_rank: c.pp for c in plan.channels}
    assert stage_of == {0: 0, 1: 1}
    first = {x.src_tensor for c in plan.channels if c.pp == 0 for x in c.copies}
    assert "embedding.word_embeddings.weight" in first and "decoder.final_layernorm.weight" not in first


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_valid_layout_plans_and_checks(data):
    config = data.draw(hf_configs("qwen2", data.draw(st.sampled_from([1, 2]))))
    train_tp = data.draw(st.sampled_from([tp for tp in (1, 2) if config["num_key_value_heads"] % tp == 0]))
    pp = data.draw(st.sampled_from([p for p in (1, 2) if config["num_hidden_layers"] % p == 0]))
    infer_tp = data.draw(st.sampled_from(engine_tps(config)))
    cfg = qwen2.config_from_hf(config)
    plan = build_plan(qwen2, cfg, Layout(train_tp, pp, infer_tp, data.draw(st.integers(1, 3))), 4)
    summary = summarize(plan)
    for dst in summary["dst_ranks"]:
        assert dst["bytes_received"] == _real_bytes(qwen2.vllm_shard_table(cfg, dst["tp"], infer_tp), 4)


def _tables(plan, module, cfg):
    return {s: module.vllm_shard_table(cfg, s, plan.layout.infer_tp) for s in range(plan.layout.infer_tp)}


@pytest.mark.parametrize("tamper,message", [
    (lambda copies: copies + copies[-1:], "both write"),
    (lambda copies: copies[:-1], "elements written"),
    (lambda copies: [dataclasses.replace(copies[0], src_box=((0, 10**6),) + copies[0].src_box[1:])] + copies[1:],
     "outside its tensor"),
])
def test_a_wrong_plan_is_refused_when_checked(tamper, message):
    plan = build_plan(qwen3, QWEN3_TINY, Layout(2, 1, 2, 1), 2)
    first = plan.channels[0]
    bad = (dataclasses.replace(first, copies=tuple(tamper(list(first.copies)))),) + plan.channels[1:]
    with pytest.raises(PlanError, match=message):
        check_plan(bad, plan.src_shapes, _tables(plan, qwen3, QWEN3_TINY))


def test_plan_command_json():
    result = subprocess.run([sys.executable, "-m", "shardsync.cli", "plan", "--model", "qwen3-4b", "--train-tp", "2",
                             "--infer-tp", "2", "--engines", "2", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["gathers"] == 0 and len(out["plan_hash"]) == 64
    assert {"plan_hash", "gathers", "channels", "src_ranks", "dst_ranks"} <= set(out)
    assert [c["name"] for c in out["channels"]] == ["pp0-tp0-to-tp0", "pp0-tp0-to-tp1", "pp0-tp1-to-tp1"]
    assert all({"name", "src_rank", "dst_ranks", "copies", "bytes"} <= set(c) for c in out["channels"])
    assert len(out["dst_ranks"]) == 4 and all({"engine", "tp", "bytes_received"} <= set(d) for d in out["dst_ranks"])
    bad = subprocess.run([sys.executable, "-m", "shardsync.cli", "plan", "--model", "qwen3-4b", "--train-tp", "3",
                          "--infer-tp", "2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "num_key_value_heads=8" in bad.stderr and "Traceback" not in bad.stderr


_spans = st.tuples(st.integers(0, 6), st.integers(1, 4)).map(lambda s: (s[0], s[0] + s[1]))


@settings(max_examples=300, deadline=None)
@given(written=st.lists(st.tuples(_spans, _spans, _spans), max_size=8))
def test_the_overlap_sweep_finds_a_shared_element_exactly_when_one_exists(written):
    from shardsync.runtime.plan.check import _first_overlap

    pairwise = any(boxes.intersect(a, b) is not None for i, a in enumerate(written) for b in written[i + 1:])
    found = _first_overlap(written)
    assert (found is not None) == pairwise
    if found is not None:
        assert boxes.intersect(*found) is not None
