"""The MoE specs' shard tables against the independent oracle (tests/reference.py), over
drawn model sizes and TP x EP x ETP layouts on the Megatron side and TP with or without
expert parallelism on the vLLM side: every element of every tensor a rank holds is the
oracle's, experts included, and every expert byte has exactly one home per layout."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardsync.harness.tensors import materialize
from tests import reference as ref
from tests.strategies import moe_configs, seeds

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral"]
MOE_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _module(family):
    return importlib.import_module(f"shardsync.generated.{family}")


def _equal_where_real(name, got, want, padding_rows=0):
    rows = got.shape[0] - padding_rows
    assert got.shape == want.shape, (name, tuple(got.shape), tuple(want.shape))
    assert torch.equal(got[:rows], want[:rows]), name


@pytest.mark.parametrize("family", FAMILIES)
@MOE_SETTINGS
@given(data=st.data())
def test_megatron_tables_hold_what_megatron_core_holds_at_any_tp_ep_etp(family, data):
    tp = data.draw(st.sampled_from([1, 2]), label="tp")
    ep = data.draw(st.sampled_from([1, 2, 4]), label="ep")
    config = data.draw(moe_configs(family, tp, ep), label="config")
    etp = data.draw(st.sampled_from([e for e in (1, 2, 3) if config.get("moe_intermediate_size",
                                                                         config.get("intermediate_size")) % e == 0]),
                    label="etp")
    module, model, seed = _module(family), ref.Model.from_hf(config), data.draw(seeds)
    cfg = module.config_from_hf(config, make_vocab_size_divisible_by=1)
    hf = ref.random_hf(model, seed)
    for ep_rank in range(ep):
        tp_rank, etp_rank = data.draw(st.integers(0, tp - 1)), data.draw(st.integers(0, etp - 1))
        table = module.megatron_shard_table(cfg, tp_rank, tp, 0, 1, ep_rank, ep, etp_rank, etp)
        want = ref.megatron_moe_rank(model, hf, tp_rank, tp, ep_rank, ep, etp_rank, etp, vocab_divisible=1,
                                     seed=seed)
        got = materialize(table, hf)
        assert sorted(got) == sorted(want)
        for local in table:
            padding = sum(stop - start for (start, stop), *_ in local.padding)
            _equal_where_real(local.name, got[local.name], want[local.name], padding)


@pytest.mark.parametrize("family", FAMILIES)
@MOE_SETTINGS
@given(data=st.data())
def test_vllm_tables_hold_what_vllms_loader_leaves_with_and_without_expert_parallelism(family, data):
    tp = data.draw(st.sampled_from([1, 2, 3, 4]), label="tp")
    config = data.draw(moe_configs(family, 1), label="config")
    kv, heads = config["num_key_value_heads"], config["num_attention_heads"]
    ffn = config.get("moe_intermediate_size", config.get("intermediate_size"))
    shared = config.get("shared_expert_intermediate_size", tp)
    padded_vocab = -(-config["vocab_size"] // 64) * 64
    if heads % tp or (kv % tp and tp % kv) or ffn % tp or shared % tp or padded_vocab % tp:
        return
    expert_parallel = data.draw(st.booleans(), label="expert_parallel")
    if expert_parallel and tp > config.get("num_experts", config.get("num_local_experts")):
        return
    module, model, seed = _module(family), ref.Model.from_hf(config), data.draw(seeds)
    cfg = module.config_from_hf(config)
    hf = ref.random_hf(model, seed)
    homes: dict[str, int] = {}
    for rank in range(tp):
        table = module.vllm_shard_table(cfg, rank, tp, expert_parallel=expert_parallel)
        want = ref.vllm_moe_rank(model, hf, rank, tp, expert_parallel)
        got = materialize(table, hf)
        assert sorted(got) == sorted(want)
        for name, tensor in got.items():
            assert torch.equal(tensor, want[name]), (name, rank)
        for local in table:
            if "routed_experts" in local.name:
                for piece in local.pieces:
                    homes[piece.hf_name] = homes.get(piece.hf_name, 0) + 1
    # every expert tensor has a home: a slice on each rank when TP-split, one rank under EP
    assert sorted(homes) == sorted(name for name in ref.hf_shapes(model) if ".experts." in name)
    expected = 1 if expert_parallel and tp > 1 else tp
    assert set(homes.values()) == {expected}, homes
