"""The layout vocabulary itself (compiler/_kinds.py, copied to generated/_kinds.py): each
placement's per-rank quantities and boxes, on small cases worked by hand."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

from shardsync.compiler import _kinds
from shardsync.harness.tensors import materialize


@dataclasses.dataclass(frozen=True)
class _Config(_kinds.SpecConfig):
    HF_FIELDS: ClassVar[dict[str, str]] = {"heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
                                           "vocab": "vocab_size", "experts": "num_experts"}
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 4
    vocab: int = 1000
    hidden: int = 16
    ffn: int = 6
    experts: int = 3
    make_vocab_size_divisible_by: int = 128


QKV = _kinds.qkv(megatron="qkv", hf=("q", "k", "v"), vllm="qkv_proj", stage="layer",
                 heads="heads", kv_heads="kv_heads", head_dim="head_dim", cols="hidden")
VOCAB = _kinds.vocab(megatron="emb", hf=("embed",), vllm="embed", stage="first", rows="vocab", cols="hidden")


def _boxes(local: _kinds.LocalTensor) -> list[tuple[str, tuple, tuple]]:
    return [(p.hf_name, p.hf_box[0], p.local_box[0]) for p in local.pieces]


def test_vocab_ranges_of_megatron_and_vllm_differ_by_their_padding():
    cfg = _Config()
    part = VOCAB.parts[0]
    # Megatron pads 1000 to a multiple of 128 * TP (1024 at TP 2, 1152 at TP 3), vLLM to one of 64 (1024)
    megatron, vllm = VOCAB.megatron_layout, VOCAB.vllm_layout
    assert megatron.range(cfg, part, ("hidden",), 1, 2) == _kinds.DimRange(padded=1024, per_rank=512, start=512, real=488)
    assert megatron.range(cfg, part, ("hidden",), 1, 3) == _kinds.DimRange(padded=1152, per_rank=384, start=384, real=384)
    assert megatron.range(cfg, part, ("hidden",), 2, 3).real == 1000 - 768
    assert vllm.range(cfg, part, ("hidden",), 3, 4) == _kinds.DimRange(padded=1024, per_rank=256, start=768, real=232)
    with pytest.raises(_kinds.ConfigError, match="tp_size=3 does not divide vLLM's padded vocab_size=1024"):
        VOCAB.vllm_tensor(cfg, None, 0, 3)
    last = VOCAB.megatron_tensor(cfg, None, 2, 3)
    assert last.shape == (384, 16) and last.padding == (((232, 384), (0, 16)),)


def test_stacked_parts_replicate_a_kv_head_beyond_the_kv_head_count():
    cfg = _Config()
    q, k, _ = QKV.parts
    stack = QKV.vllm_layout
    assert stack.units(cfg, q, 1, 2) == _kinds.UnitRange(first=4, count=4, replicas=1)
    assert stack.units(cfg, k, 1, 2) == _kinds.UnitRange(first=1, count=1, replicas=1)
    assert [stack.units(cfg, k, r, 8).first for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert stack.units(cfg, k, 5, 8).replicas == 4
    with pytest.raises(_kinds.ConfigError, match="tp_size=3 does not divide num_attention_heads=8"):
        QKV.vllm_tensor(cfg, None, 0, 3)
    with pytest.raises(_kinds.ConfigError, match="tp_size=3 does not divide num_key_value_heads=2"):
        _kinds.Stack().units(cfg, k, 0, 3)
    assert _boxes(QKV.vllm_tensor(cfg, None, 5, 8)) == [("q", (20, 24), (0, 4)), ("k", (4, 8), (4, 8)),
                                                          ("v", (4, 8), (8, 12))]


def test_an_interleaved_rank_holds_a_block_of_groups():
    cfg = _Config()
    assert QKV.megatron_layout.group_range(cfg, QKV.parts, 1, 2) == _kinds.GroupRange(first=1, count=1,
                                                                                      units_per_group=(4, 1, 1))
    local = QKV.megatron_tensor(cfg, None, 1, 2)
    assert local.shape == (24, 16)  # one group: 4 q heads, one k, one v, head_dim 4
    assert _boxes(local) == [("q", (16, 32), (0, 16)), ("k", (4, 8), (16, 20)), ("v", (4, 8), (20, 24))]


def test_parts_of_one_fused_hf_tensor_are_its_row_ranges_in_part_order():
    cfg = _Config()
    fused = _kinds.qkv(megatron="qkv", hf=("qkv_proj",) * 3, vllm="qkv_proj", stage="layer",
                       heads="heads", kv_heads="kv_heads", head_dim="head_dim", cols="hidden")
    assert fused.hf_names(None) == ("qkv_proj",)
    assert fused.hf_shape(cfg, "qkv_proj", None) == (48, 16)  # 8 q heads, 2 k, 2 v of 4 rows
    # Megatron rank 1 of 2: group 1 = q heads 4..7 (rows 16..32), k head 1 (32 + 4..8), v head 1 (40 + 4..8)
    assert _boxes(fused.megatron_tensor(cfg, None, 1, 2)) == [
        ("qkv_proj", (16, 32), (0, 16)), ("qkv_proj", (36, 40), (16, 20)), ("qkv_proj", (44, 48), (20, 24))]
    full = torch.arange(48 * 16.0).reshape(48, 16)
    megatron_tp1 = materialize([fused.megatron_tensor(cfg, None, 0, 1)], {"qkv_proj": full})["qkv"]
    [(name, hf)] = _kinds.full_to_hf(cfg, _kinds.Resolved(fused, None), "qkv", megatron_tp1, _kinds.TP1)
    assert name == "qkv_proj" and torch.equal(hf, full)


def test_replicate_holds_a_tensor_of_any_rank_on_every_rank():
    router = _kinds.Family("router", (_kinds.Part("", "gate", "experts"),), _kinds.Replicate(), _kinds.Replicate(),
                           ("gate",), "layer", ("hidden",))
    for rank in range(4):
        local = router.vllm_tensor(_Config(), 0, rank, 4)
        assert local.shape == (3, 16) and _boxes(local) == [("gate", (0, 3), (0, 3))]


def test_a_tensor_per_part_places_each_part_alone():
    cfg = _Config()
    split = _kinds.Family("fc1", (_kinds.Part("gate", "g", "ffn"), _kinds.Part("up", "u", "ffn")), _kinds.Stack(),
                          _kinds.Shard(0), ("g_vllm", "u_vllm"), "layer", ("hidden",))
    tensors = split.vllm_tensors(cfg, 0, 1, 2)
    assert [(t.name, t.shape, _boxes(t)) for t in tensors] == [("g_vllm", (3, 16), [("g", (3, 6), (0, 3))]),
                                                                ("u_vllm", (3, 16), [("u", (3, 6), (0, 3))])]
    shard = torch.arange(6 * 16.0).reshape(6, 16)  # Megatron rank 1: [gate rows 3..6; up rows 3..6]
    (_, gate), (_, up) = split.shard_to_vllm(cfg, 0, shard, 1, 2)
    assert torch.equal(gate, shard[:3]) and torch.equal(up, shard[3:])


def test_flags_that_megatron_switches_together_must_agree():
    assert _kinds.all_or_none("add_bias_linear", {"a": True, "b": True}) is True
    with pytest.raises(_kinds.ConfigError, match="has a but not b"):
        _kinds.all_or_none("add_bias_linear", {"a": True, "b": False})


@pytest.mark.parametrize("value,ok", [(1e-6, True), (10000, True), (0.0, False), ("1e-6", False), (True, False),
                                      (float("nan"), False)])
def test_float_config_values_are_positive_numbers(value, ok):
    if ok:
        assert _kinds.read_float({"eps": value}, "eps") == float(value)
    else:
        with pytest.raises(_kinds.ConfigError, match="eps: expected a positive number"):
            _kinds.read_float({"eps": value}, "eps")
