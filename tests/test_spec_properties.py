"""Every spec against full-gather output, over drawn model sizes and TP layouts.

The oracle is `tests/reference.py`: plain slicing written from megatron-core's and
vLLM's behaviour, sharing nothing with the specs or the generated code.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import reference as ref
from tests.strategies import engine_tps, hf_configs, seeds, train_tps, vocab_divisible

FAMILIES = ["qwen2", "qwen3", "llama", "mistral", "phi3", "starcoder2"]
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _module(family):
    return importlib.import_module(f"shardsync.generated.{family}")


@st.composite
def equal_tp_cases(draw, family):
    tp = draw(train_tps)
    return draw(hf_configs(family, tp)), tp, draw(vocab_divisible), draw(seeds)


@st.composite
def table_cases(draw, family):
    train_tp = draw(train_tps)
    config = draw(hf_configs(family, train_tp))
    layers = config["num_hidden_layers"]
    pp = draw(st.sampled_from([p for p in (1, 2, 3, 4) if layers % p == 0]))
    valid = engine_tps(config)
    # the largest valid engine TP often exceeds the KV heads: K/V replication
    infer_tp = draw(st.sampled_from(valid) | st.just(valid[-1]))
    return config, train_tp, pp, infer_tp, draw(vocab_divisible), draw(seeds)


@pytest.mark.parametrize("family", FAMILIES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_shard_conversion_equals_full_gather_slice(family, data):
    """(a) convert_to_hf_shard on each shard == the vLLM-layout slice of the full-gather
    conversion, bitwise, biases included; and gather + convert_to_hf == the HF tensors."""
    config, tp, divisible, seed = data.draw(equal_tp_cases(family))
    module, model = _module(family), ref.Model.from_hf(config)
    cfg = module.config_from_hf(config, make_vocab_size_divisible_by=divisible)
    hf = ref.random_hf(model, seed)
    full = ref.megatron_full(model, hf, divisible, tp, seed)
    shards = {name: [ref.megatron_shard(name, t, r, tp) for r in range(tp)] for name, t in full.items()}

    gathered_hf = {}
    for name, per_rank in shards.items():
        for hf_name, tensor in module.convert_to_hf(name, ref.megatron_gather(name, per_rank), cfg, layout="tp1"):
            assert hf_name not in gathered_hf
            gathered_hf[hf_name] = tensor
    assert sorted(gathered_hf) == sorted(hf)
    for hf_name, tensor in hf.items():
        assert torch.equal(gathered_hf[hf_name], tensor), hf_name

    if not module.VLLM_LAYOUT:
        return  # an HF-only spec: no vLLM tensors to compare
    for rank in range(tp):
        expected = ref.vllm_rank(model, gathered_hf, rank, tp)
        for name, per_rank in shards.items():
            [(vllm_name, tensor)] = module.convert_to_hf_shard(name, per_rank[rank], rank, tp, cfg)
            want = expected[vllm_name]
            if name.startswith(("embedding.", "output_layer")):
                # paddings differ, so a vocab shard maps to its own real rows
                per = per_rank[rank].shape[0]
                want = gathered_hf[_vocab_hf_name(vllm_name)][rank * per:(rank + 1) * per]
            assert torch.equal(tensor, want), (name, rank)


def _vocab_hf_name(vllm_name):
    return vllm_name  # vLLM and HF share the embedding and lm_head names


@pytest.mark.parametrize("family", FAMILIES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_shard_tables_rebuild_every_local_tensor(family, data):
    """(b) the shard tables, applied to the full HF tensors, rebuild every Megatron
    shard (any TP, any PP stage) and every vLLM rank tensor (any engine TP) exactly,
    covering each non-padding element once and padding never."""
    config, train_tp, pp, infer_tp, divisible, seed = data.draw(table_cases(family))
    module, model = _module(family), ref.Model.from_hf(config)
    cfg = module.config_from_hf(config, make_vocab_size_divisible_by=divisible)
    hf = ref.random_hf(model, seed)
    full = ref.megatron_full(model, hf, divisible, train_tp, seed)

    for pp_rank in range(pp):
        names = ref.megatron_stage_names(model, list(full), pp_rank, pp)
        for tp_rank in range(train_tp):
            table = module.megatron_shard_table(cfg, tp_rank, train_tp, pp_rank, pp)
            assert [local.name for local in table] == names
            for local in table:
                want = ref.megatron_shard(local.name, full[local.name], tp_rank, train_tp)
                pad = ref.megatron_padding_rows(local.name, model, tp_rank, train_tp, divisible)
                _check_rebuilt(local, hf, want, pad)

    if not module.VLLM_LAYOUT:
        return  # an HF-only spec: no vLLM tables
    for rank in range(infer_tp):
        expected = ref.vllm_rank(model, hf, rank, infer_tp)
        table = module.vllm_shard_table(cfg, rank, infer_tp)
        assert [local.name for local in table] == list(expected)
        for local in table:
            _check_rebuilt(local, hf, expected[local.name], ref.vllm_padding_rows(local.name, model, rank, infer_tp))


def _check_rebuilt(local, hf, want, padding_rows):
    assert tuple(local.shape) == tuple(want.shape), local.name
    rebuilt = torch.full(local.shape, float("nan"))
    covered = torch.zeros(local.shape, dtype=torch.int32)
    for piece in local.pieces:
        dst, src = _slices(piece.local_box), _slices(piece.hf_box)
        rebuilt[dst] = hf[piece.hf_name][src]
        covered[dst] += 1
    real = local.shape[0] - padding_rows
    assert torch.all(covered[:real] == 1), f"{local.name}: an element is covered {covered[:real].max()} times or never"
    assert torch.all(covered[real:] == 0), f"{local.name}: padding rows are written"
    assert torch.equal(rebuilt[:real], want[:real]), local.name
    padded = torch.zeros(local.shape, dtype=torch.int32)
    for box in local.padding:
        padded[_slices(box)] += 1
    assert torch.equal(padded[real:], torch.ones_like(padded[real:])) and not padded[:real].any(), local.name


def _slices(box):
    return tuple(slice(start, stop) for start, stop in box)


SHARDS_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("family", FAMILIES)
@SHARDS_SETTINGS
@given(data=st.data())
def test_shards_convert_to_the_hf_tensors_and_concatenated_shards_are_refused(family, data):
    """(c) every TP rank's shard, as megatron-core holds it, through convert_shards_to_hf
    == the HF tensors; torch.cat of the shards given to the full-tensor form is refused
    unless its TP-1 layout is stated (for TP > 1 it is not that layout)."""
    config, tp, divisible, seed = data.draw(equal_tp_cases(family))
    module, model = _module(family), ref.Model.from_hf(config)
    cfg = module.config_from_hf(config, make_vocab_size_divisible_by=divisible)
    hf = ref.random_hf(model, seed)
    full = ref.megatron_full(model, hf, divisible, tp, seed)

    converted = {}
    for name, tensor in full.items():
        shards = [ref.megatron_shard(name, tensor, r, tp) for r in range(tp)]
        for hf_name, out in module.convert_shards_to_hf(name, shards, cfg):
            assert hf_name not in converted
            converted[hf_name] = out
        with pytest.raises(ValueError, match="convert_shards_to_hf"):
            module.convert_to_hf(name, torch.cat(shards), cfg)
    assert sorted(converted) == sorted(hf)
    for hf_name, tensor in hf.items():
        assert torch.equal(converted[hf_name], tensor), hf_name
