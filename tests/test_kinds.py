"""The layout library itself (compiler/_kinds.py, copied to generated/_kinds.py): the
per-rank quantities each kind names, on small cases worked by hand."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest

from shardsync.compiler import _kinds


@dataclasses.dataclass(frozen=True)
class _Config(_kinds.SpecConfig):
    HF_FIELDS: ClassVar[dict[str, str]] = {"heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
                                           "vocab": "vocab_size"}
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 4
    vocab: int = 1000
    hidden: int = 16
    make_vocab_size_divisible_by: int = 128


QKV = _kinds.QKVParallel(megatron="qkv", hf=("q", "k", "v"), vllm="qkv_proj", stage="layer",
                         heads="heads", kv_heads="kv_heads", head_dim="head_dim", cols="hidden")
VOCAB = _kinds.VocabParallel(megatron="emb", hf=("embed",), vllm="embed", stage="first", rows="vocab", cols="hidden")


def test_vocab_ranges_of_megatron_and_vllm_differ_by_their_padding():
    cfg = _Config()
    # Megatron pads 1000 to a multiple of 128 * TP (1024 at TP 2, 1152 at TP 3), vLLM to one of 64 (1024)
    assert VOCAB.megatron_range(cfg, 1, 2) == _kinds.VocabRange(padded=1024, per_rank=512, start=512, real_rows=488)
    assert VOCAB.megatron_range(cfg, 1, 3) == _kinds.VocabRange(padded=1152, per_rank=384, start=384, real_rows=384)
    assert VOCAB.megatron_range(cfg, 2, 3).real_rows == 1000 - 768
    assert VOCAB.vllm_range(cfg, 3, 4) == _kinds.VocabRange(padded=1024, per_rank=256, start=768, real_rows=232)
    with pytest.raises(_kinds.ConfigError, match="tp_size=3 does not divide vLLM's padded vocab_size=1024"):
        VOCAB.vllm_range(cfg, 0, 3)


def test_vllm_heads_replicate_a_kv_head_beyond_the_kv_head_count():
    cfg = _Config()
    assert QKV.vllm_heads(cfg, 1, 2) == _kinds.VllmHeads(q_heads_per_rank=4, kv_heads_per_rank=1,
                                                          kv_head_replicas=1, first_kv_head=1)
    assert [QKV.vllm_heads(cfg, r, 8).first_kv_head for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert QKV.vllm_heads(cfg, 5, 8).kv_head_replicas == 4
    with pytest.raises(_kinds.ConfigError, match="tp_size=3 does not divide num_attention_heads=8"):
        QKV.vllm_heads(cfg, 0, 3)
    assert QKV.megatron_groups(cfg, 1, 2) == _kinds.MegatronGroups(q_heads_per_group=4, groups_per_rank=1,
                                                                   first_group=1)


def test_a_megatron_qkv_rank_interleaves_its_groups():
    local = QKV.megatron_tensor(_Config(), None, 1, 2)
    assert local.shape == (24, 16)  # one group: 4 q heads, one k, one v, head_dim 4
    assert [(p.hf_name, p.hf_box[0], p.local_box[0]) for p in local.pieces] == [
        ("q", (16, 32), (0, 16)), ("k", (4, 8), (16, 20)), ("v", (4, 8), (20, 24))]


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
