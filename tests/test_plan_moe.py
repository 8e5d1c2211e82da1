"""Plans for mixture-of-experts models: megatron-core's TP x EP x ETP x DP x PP into vLLM's
TP with or without expert parallelism, shard to shard.

The property runs a plan's copies between tensors built by the independent oracle
(tests/reference.py), not by the shard tables the plan came from: every engine rank
must end up holding what vLLM's loader leaves, every expert byte must come from a rank
at expert-DP rank 0 that holds that expert, and nothing may be gathered. The fixed
layouts pin the placements the issue names, with balanced senders.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shardsync.presets import model_config
from shardsync.runtime.errors import PlanError
from shardsync.runtime.plan import Layout, boxes, build_plan
from shardsync.runtime.plan.summary import summarize
from tests import reference as ref
from tests.strategies import moe_configs, seeds

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral"]


def _module(family):
    return importlib.import_module(f"shardsync.generated.{family}")


def _is_expert(name: str) -> bool:
    return ".local_experts." in name


def _run_plan(plan, model, hf, vocab_divisible, seed):
    """Each source rank's tensors from the oracle; the plan's copies executed into zeros."""
    layout = plan.layout
    sources = {}
    for src in layout.senders:
        held = ref.megatron_moe_rank(model, hf, src.tp, layout.train_tp, src.ep, layout.train_ep, src.etp,
                                     layout.train_etp, vocab_divisible=vocab_divisible, seed=seed)
        sources[src.rank] = {n: held[n] for n in ref.megatron_stage_names(model, list(held), src.pp, layout.train_pp)}
    engines = {tp: {n: torch.zeros(s) for n, s in shapes.items()} for tp, shapes in plan.dst_shapes.items()}
    for channel in plan.channels:
        for copy in channel.copies:
            piece = sources[channel.src_rank][copy.src_tensor][boxes.as_slices(copy.src_box)]
            engines[channel.dst_tp][copy.dst_tensor][boxes.as_slices(copy.dst_box)] = piece.reshape(
                boxes.shape(copy.dst_box))
    return engines


def _expert_of_source(layout: Layout, experts: int, src, local_index: int) -> int:
    return src.ep * (experts // layout.train_ep) + local_index


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_moe_layout_leaves_every_engine_rank_what_vllms_loader_leaves(family, data):
    train_tp = data.draw(st.sampled_from([1, 2]), label="train_tp")
    train_ep = data.draw(st.sampled_from([1, 2, 4]), label="train_ep")
    config = data.draw(moe_configs(family, train_tp, train_ep), label="config")
    model = ref.Model.from_hf(config)
    ffn = model.moe_ffn
    train_etp = data.draw(st.sampled_from([e for e in (1, 2, 3) if ffn % e == 0]), label="train_etp")
    train_pp = data.draw(st.sampled_from([p for p in (1, 2) if model.layers % p == 0]), label="train_pp")
    infer_tp = data.draw(st.sampled_from([1, 2, 4]), label="infer_tp")
    infer_ep = infer_tp > 1 and data.draw(st.booleans(), label="infer_ep")
    kv, heads = config["num_key_value_heads"], config["num_attention_heads"]
    assume(heads % infer_tp == 0 and (kv % infer_tp == 0 or infer_tp % kv == 0))
    assume(infer_ep or ffn % infer_tp == 0)
    assume(not infer_ep or infer_tp <= model.experts)  # vLLM's EP leaves a rank without experts: refused here
    assume(model.shared_ffn % infer_tp == 0 and model.shared_ffn % train_tp == 0)
    layout = Layout(train_tp, train_pp, infer_tp, 1, train_ep=train_ep, train_etp=train_etp, infer_ep=infer_ep)
    module, seed = _module(family), data.draw(seeds)
    cfg = module.config_from_hf(config, make_vocab_size_divisible_by=1)
    plan = build_plan(module, cfg, layout, 4)
    hf = ref.random_hf(model, seed)
    got = _run_plan(plan, model, hf, 1, seed)
    for tp in range(infer_tp):
        want = ref.vllm_moe_rank(model, hf, tp, infer_tp, infer_ep)
        assert sorted(got[tp]) == sorted(want)
        for name, tensor in want.items():
            padding = ref.vllm_padding_rows(name, model, tp, infer_tp)
            rows = tensor.shape[0] - padding if tensor.dim() else None
            assert torch.equal(got[tp][name][:rows], tensor[:rows]), (tp, name)

    experts = model.experts
    for channel in plan.channels:
        for copy in channel.copies:
            if _is_expert(copy.src_tensor):
                assert channel.src.edp == 0, (channel.name, copy.src_tensor)
                local_index = int(copy.src_tensor.split(".local_experts.")[1].split(".")[0])
                expert = _expert_of_source(layout, experts, channel.src, local_index)
                assert f".experts.{expert}." in copy.hf_name, (channel.name, copy.src_tensor, copy.hf_name)
    assert summarize(plan)["gathers"] == 0


def _expert_bytes(plan) -> dict[int, int]:
    sent = {src.rank: 0 for src in plan.layout.senders}
    for channel in plan.channels:
        sent[channel.src_rank] += sum(c.numel for c in channel.copies if _is_expert(c.src_tensor)) * plan.dtype_bytes
    return sent


def _assert_every_expert_byte_once_per_engine_rank(plan, module, cfg):
    """Each engine rank's expert tensors, element by element, written by exactly one copy."""
    for dst_tp, shapes in plan.dst_shapes.items():
        for name, shape in shapes.items():
            if "routed_experts" not in name:
                continue
            count = torch.zeros(shape, dtype=torch.int32)
            for channel in plan.channels_of_engine_rank(dst_tp):
                for copy in channel.copies:
                    if copy.dst_tensor == name:
                        count[boxes.as_slices(copy.dst_box)] += 1
            assert bool((count == 1).all()), (dst_tp, name)


LAYOUTS = {
    # (model, Layout): the four placements the issue names
    "tp2-ep2-etp1-to-tp2": ("qwen3-moe-tiny", Layout(2, 1, 2, 1, train_ep=2, train_etp=1)),
    "tp1-ep4-to-tp4-with-ep": ("qwen3-moe-tiny", Layout(1, 1, 4, 1, train_ep=4, infer_ep=True)),
    "tp2-etp2-pp2-to-tp1": ("qwen3-moe-tiny", Layout(2, 2, 1, 1, train_etp=2)),
    "ep2-6-experts-to-tp4-with-ep": ("qwen3-moe-tiny-6e", Layout(1, 1, 4, 1, train_ep=2, infer_ep=True)),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_named_moe_layouts_move_each_expert_byte_once_from_expert_dp_0_with_balanced_senders(case):
    preset, layout = LAYOUTS[case]
    module = _module("qwen3_moe")
    cfg = module.config_from_hf(model_config(preset))
    plan = build_plan(module, cfg, layout, 2)
    summary = summarize(plan)
    assert summary["gathers"] == 0
    _assert_every_expert_byte_once_per_engine_rank(plan, module, cfg)
    for channel in plan.channels:
        if any(_is_expert(c.src_tensor) for c in channel.copies):
            assert channel.src.edp == 0, channel.name
    experts = _expert_bytes(plan)
    holding = [b for b in experts.values() if b]
    assert max(holding) == min(holding), experts  # Megatron places E / EP experts on every EP rank
    sent = [s["bytes_sent"] for s in summary["src_ranks"]]
    assert max(sent) <= 1.1 * min(sent), summary["src_ranks"]


def test_six_experts_over_four_engine_ranks_give_the_first_two_ranks_two():
    module = _module("qwen3_moe")
    cfg = module.config_from_hf(model_config("qwen3-moe-tiny-6e"))
    plan = build_plan(module, cfg, LAYOUTS["ep2-6-experts-to-tp4-with-ep"][1], 2)
    w13 = "model.layers.0.mlp.experts.routed_experts.w13_weight"
    assert [plan.dst_shapes[tp][w13][0] for tp in range(4)] == [2, 2, 1, 1]
    # engine rank 1 holds experts 2 and 3: expert 2 from Megatron EP rank 0, expert 3 from EP rank 1
    feeding = {c.src.ep for c in plan.channels_of_engine_rank(1) for x in c.copies if x.dst_tensor == w13}
    assert feeding == {0, 1}


def test_ep_ranks_are_numbered_as_megatron_cores_rank_generator_numbers_them():
    # tp 2, ep 2, etp 1: dp is 1 and the world 2; rank r is TP rank r and EP rank r
    layout = Layout(2, 1, 2, 1, train_ep=2, train_etp=1)
    assert layout.train_dp == 1
    assert [(t.rank, t.tp, t.dp, t.ep, t.etp, t.edp) for t in layout.senders] == [(0, 0, 0, 0, 0, 0), (1, 1, 0, 1, 0, 0)]
    # tp 1, ep 4: dp 4; every rank is expert-DP 0, only rank 0 is dense-DP 0
    layout = Layout(1, 1, 4, 1, train_ep=4)
    assert layout.train_dp == 4
    assert [(t.dp, t.ep) for t in layout.senders] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    # tp 2, ep 1, etp 1, pp 2: rank = tp + 2 * pp; both TP ranks hold every expert whole, expert-DP 0 sends them
    layout = Layout(2, 2, 1, 1, train_etp=1)
    assert [(t.rank, t.pp, t.tp, t.edp, t.sends_experts) for t in layout.senders] == [
        (0, 0, 0, 0, True), (1, 0, 1, 1, False), (2, 1, 0, 0, True), (3, 1, 1, 1, False)]
    # tp 2, dp 4, ep 4, etp 1: expert-DP 2; ranks 4..7 are dense DP 2, 3 and expert DP 1: replicas only
    layout = Layout(2, 1, 2, 1, train_ep=4, train_etp=1, train_dp=4)
    assert [t.rank for t in layout.senders] == [0, 1, 2, 3]


def test_layouts_megatron_core_would_refuse_are_refused():
    with pytest.raises(PlanError, match="must divide train_tp x train_dp"):
        Layout(2, 1, 2, 1, train_ep=4, train_etp=1, train_dp=1)
    with pytest.raises(PlanError, match="train_ep must be at least 1"):
        Layout(2, 1, 2, 1, train_ep=0)
    with pytest.raises(PlanError, match="infer_ep needs infer_tp of at least 2"):
        Layout(2, 1, 1, 1, infer_ep=True)


def test_expert_parallelism_for_a_dense_model_is_refused():
    qwen3 = _module("qwen3")
    cfg = qwen3.config_from_hf(model_config("qwen3-tiny"))
    with pytest.raises(PlanError, match=r"qwen3 has no experts.*train_ep=2"):
        build_plan(qwen3, cfg, Layout(2, 1, 2, 1, train_ep=2), 2)


def test_the_qwen3_30b_plan_shows_bytes_per_rank():
    module = _module("qwen3_moe")
    cfg = module.config_from_hf(model_config("qwen3-30b-a3b"))
    layout = Layout(4, 1, 4, 2, train_ep=8)
    summary = summarize(build_plan(module, cfg, layout, 2))
    assert summary["gathers"] == 0
    # ETP defaults to TP: 8 x 4 expert ranks per stage, so dp 8 and 32 ranks, all at expert-DP 0
    assert (layout.train_etp, layout.train_dp, layout.world) == (4, 8, 32)
    assert len(summary["src_ranks"]) == 32
    experts_bytes = cfg.layers * cfg.experts * 3 * cfg.hidden * cfg.moe_ffn * 2
    assert sum(s["bytes_sent"] for s in summary["src_ranks"]) >= experts_bytes
    assert summary["bytes_per_engine"] * 2 == sum(s["bytes_received"] for s in summary["dst_ranks"])
