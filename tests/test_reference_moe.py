"""Self-test of the MoE oracle in tests/reference.py: cases worked by hand.

The oracle is what the spec tests trust, so its own slicing is pinned here with small
numbers written out literally (expert placements, which rows of which expert a rank
holds), with the names and per-rank shapes seen on real models (vLLM 0.32's model
classes loaded with their own load_weights at TP 2, TP 2 + EP and TP 4 + EP;
megatron-core 0.19.2 GPTModels with the local spec at TP/EP/ETP 1/1/1, 2/2/1, 2/1/2),
and with invariants that tie the pieces together (shards gather back, the Megatron and
vLLM experts are the same HF rows).
"""

from __future__ import annotations

import pytest
import torch

from shardsync.presets import model_config
from tests import reference as ref

# ---- placements ---------------------------------------------------------------------


def test_vllm_linear_placement_gives_the_first_ranks_the_extra_experts():
    assert ref.expert_placement_vllm(6, 4) == [[0, 1], [2, 3], [4], [5]]
    assert ref.expert_placement_vllm(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert ref.expert_placement_vllm(4, 2) == [[0, 1], [2, 3]]
    assert ref.expert_placement_vllm(5, 1) == [[0, 1, 2, 3, 4]]
    assert ref.expert_placement_vllm(3, 4) == [[0], [1], [2], []]
    assert ref.expert_placement_vllm(6, 4, "round_robin") == [[0, 4], [1, 5], [2], [3]]
    with pytest.raises(ValueError):
        ref.expert_placement_vllm(6, 4, "packed")


def test_megatron_placement_is_even_blocks_and_needs_divisibility():
    assert ref.expert_placement_megatron(6, 2) == [[0, 1, 2], [3, 4, 5]]
    assert ref.expert_placement_megatron(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ref.expert_placement_megatron(4, 1) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        ref.expert_placement_megatron(6, 4)


def test_vllm_expert_parallel_only_with_tp_above_one():
    assert ref.vllm_expert_parallel(1, True) == (1, 1)
    assert ref.vllm_expert_parallel(2, True) == (2, 1)
    assert ref.vllm_expert_parallel(4, False) == (1, 4)


# ---- a hand-sized model -------------------------------------------------------------
# hidden 2, 4 heads of 2, expert intermediate 4, 6 experts, 1 layer; expert e's tensors hold
#   gate_e[i, h] = 1000 e + 10 i + h,  up_e = gate_e + 500,  down_e[h, i] = 1000 e + 10 h + i + 0.5

TINY = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 2, "intermediate_size": 8, "moe_intermediate_size": 4,
        "num_experts": 6, "num_experts_per_tok": 2, "vocab_size": 3, "num_hidden_layers": 1,
        "norm_topk_prob": True, "tie_word_embeddings": False}
P = "model.layers.0.mlp."
D = "decoder.layers.0.mlp."


def _gate(e):
    return torch.tensor([[1000. * e + 10 * i + h for h in range(2)] for i in range(4)])


def _down(e):
    return torch.tensor([[1000. * e + 10 * h + i + 0.5 for i in range(4)] for h in range(2)])


def _hand(config=TINY, shared=False):
    m = ref.Model.from_hf(config)
    hf = ref.random_hf(m, 0)
    for e in range(m.experts):
        hf[f"{P}experts.{e}.gate_proj.weight"] = _gate(e)
        hf[f"{P}experts.{e}.up_proj.weight"] = _gate(e) + 500
        hf[f"{P}experts.{e}.down_proj.weight"] = _down(e)
    return m, hf


def test_the_hand_model_is_read_from_its_config():
    m = ref.Model.from_hf(TINY)
    assert (m.experts, m.top_k, m.moe_ffn, m.ffn, m.moe_layers, m.qk_norm, m.qkv_bias, m.shared_ffn) == \
        (6, 2, 4, 8, (0,), True, False, 0)
    assert ref.moe_block(m) == "mlp" and ref.hf_expert_names(m) == ("gate_proj", "up_proj", "down_proj")


def test_vllm_tp2_w13_holds_each_experts_gate_then_up_rows_of_the_rank():
    m, hf = _hand()
    rank1 = ref.vllm_moe_rank(m, hf, 1, 2, expert_parallel=False)
    w13, w2 = rank1[P + "experts.routed_experts.w13_weight"], rank1[P + "experts.routed_experts.w2_weight"]
    assert w13.shape == (6, 4, 2) and w2.shape == (6, 2, 2)
    # expert 3, rows 2 and 3 of gate, then rows 2 and 3 of up
    assert w13[3].tolist() == [[3020, 3021], [3030, 3031], [3520, 3521], [3530, 3531]]
    # expert 3's down, columns 2 and 3
    assert w2[3].tolist() == [[3002.5, 3003.5], [3012.5, 3013.5]]
    rank0 = ref.vllm_moe_rank(m, hf, 0, 2, expert_parallel=False)
    assert rank0[P + "experts.routed_experts.w13_weight"][0].tolist() == [[0, 1], [10, 11], [500, 501], [510, 511]]
    assert torch.equal(rank1[P + "gate.weight"], hf[P + "gate.weight"])


def test_vllm_ep4_holds_whole_experts_in_contiguous_blocks():
    m, hf = _hand()
    held = []
    for rank in range(4):
        out = ref.vllm_moe_rank(m, hf, rank, 4, expert_parallel=True)
        w13, w2 = out[P + "experts.routed_experts.w13_weight"], out[P + "experts.routed_experts.w2_weight"]
        held.append([int(w13[j, 0, 0]) // 1000 for j in range(w13.shape[0])])
        assert w13.shape[1:] == (8, 2) and w2.shape[1:] == (2, 4)
        for j, e in enumerate(held[-1]):
            assert torch.equal(w13[j], torch.cat([_gate(e), _gate(e) + 500]))
            assert torch.equal(w2[j], _down(e))
        # attention stays TP-split under EP: o_proj [H, 4 heads * head_dim 2 / TP 4]
        assert out["model.layers.0.self_attn.o_proj.weight"].shape == (2, 2)
    assert held == [[0, 1], [2, 3], [4], [5]]


def test_megatron_ep2_rank1_holds_global_experts_3_4_5():
    m, hf = _hand()
    out = ref.megatron_moe_rank(m, hf, 0, 1, 1, 2, 0, 1)
    experts = sorted(k for k in out if ".local_experts." in k)
    assert experts == [f"{D}experts.local_experts.{j}.linear_fc{n}.weight" for j in range(3) for n in (1, 2)]
    for j, g in enumerate((3, 4, 5)):
        assert torch.equal(out[f"{D}experts.local_experts.{j}.linear_fc1.weight"], torch.cat([_gate(g), _gate(g) + 500]))
        assert torch.equal(out[f"{D}experts.local_experts.{j}.linear_fc2.weight"], _down(g))
    assert torch.equal(out[D + "router.weight"], hf[P + "gate.weight"])


def test_megatron_etp2_splits_each_expert_like_a_dense_fc1():
    m, hf = _hand()
    out = ref.megatron_moe_rank(m, hf, 1, 2, 0, 1, 1, 2)  # TP 2, EP 1, ETP rank 1 of 2
    assert out[f"{D}experts.local_experts.5.linear_fc1.weight"].tolist() == \
        [[5020, 5021], [5030, 5031], [5520, 5521], [5530, 5531]]
    assert out[f"{D}experts.local_experts.5.linear_fc2.weight"].tolist() == [[5002.5, 5003.5], [5012.5, 5013.5]]
    with pytest.raises(ValueError):
        ref.megatron_moe_rank(m, hf, 0, 1, 0, 1, 0, 3)  # 4 rows over ETP 3
    with pytest.raises(ValueError):
        ref.megatron_moe_rank(m, hf, 0, 1, 0, 4, 0, 1)  # 6 experts over EP 4


def test_vllm_refuses_an_intermediate_size_tp_does_not_divide():
    m, hf = _hand({**TINY, "moe_intermediate_size": 3})
    with pytest.raises(ValueError):
        ref.vllm_moe_rank(m, ref.random_hf(m, 0), 0, 2, expert_parallel=False)


# ---- Qwen2-MoE's shared expert and Mixtral's names ----------------------------------

def test_qwen2_moe_shared_expert_is_dense_tp_split_and_its_gate_whole():
    config = {**model_config("qwen2-moe-tiny"), "hidden_size": 8, "num_attention_heads": 2,
              "num_key_value_heads": 2, "shared_expert_intermediate_size": 4, "moe_intermediate_size": 4}
    m = ref.Model.from_hf(config)
    assert (m.qkv_bias, m.shared_ffn, m.norm_topk_prob, m.head_dim) == (True, 4, False, 4)
    hf = ref.random_hf(m, 1)
    s = "model.layers.1.mlp.shared_expert."
    hf[s + "gate_proj.weight"] = torch.arange(4.).repeat_interleave(8).reshape(4, 8)  # row i is all i
    hf[s + "up_proj.weight"] = hf[s + "gate_proj.weight"] + 10
    hf[s + "down_proj.weight"] = torch.arange(4.).repeat(8).reshape(8, 4)  # column i is all i
    for ep in (False, True):
        v = ref.vllm_moe_rank(m, hf, 1, 2, expert_parallel=ep)
        assert v[s + "gate_up_proj.weight"][:, 0].tolist() == [2, 3, 12, 13]
        assert v[s + "down_proj.weight"][0].tolist() == [2, 3]
        assert torch.equal(v["model.layers.1.mlp.shared_expert_gate.weight"], hf["model.layers.1.mlp.shared_expert_gate.weight"])
    mg = ref.megatron_moe_rank(m, hf, 1, 2, 1, 2, 0, 1)  # TP rank 1 of 2, EP rank 1 of 2, ETP 1
    d = "decoder.layers.1.mlp.shared_experts."
    assert mg[d + "linear_fc1.weight"][:, 0].tolist() == [2, 3, 12, 13]
    assert mg[d + "linear_fc2.weight"][0].tolist() == [2, 3]
    assert torch.equal(mg[d + "gate_weight"], hf["model.layers.1.mlp.shared_expert_gate.weight"])
    assert mg[d + "gate_weight"].shape == (1, 8)


def test_mixtral_w3_is_up_and_w2_is_down_under_block_sparse_moe():
    m = ref.Model.from_hf(model_config("mixtral-tiny"))
    assert ref.hf_expert_names(m) == ("w1", "w3", "w2") and ref.moe_block(m) == "block_sparse_moe"
    assert (m.qkv_bias, m.qk_norm, m.moe_ffn, m.experts, m.moe_layers) == (False, False, 64, 4, (0, 1))
    hf = ref.random_hf(m, 2)
    b = "model.layers.0.block_sparse_moe."
    v = ref.vllm_moe_rank(m, hf, 0, 1, expert_parallel=False)
    assert torch.equal(v[b + "experts.routed_experts.w13_weight"][2],
                       torch.cat([hf[b + "experts.2.w1.weight"], hf[b + "experts.2.w3.weight"]]))
    assert torch.equal(v[b + "experts.routed_experts.w2_weight"][2], hf[b + "experts.2.w2.weight"])
    assert torch.equal(v[b + "gate.weight"], hf[b + "gate.weight"])
    mg = ref.megatron_moe_rank(m, hf, 0, 1, 0, 1, 0, 1)
    assert torch.equal(mg["decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight"], hf[b + "experts.2.w2.weight"])


# ---- names and shapes seen on the real frameworks ------------------------------------

def _shapes(tensors: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in tensors.items() if k.startswith("model.layers.0.") or
            k.startswith("decoder.layers.0.")}


def test_vllm_names_and_shapes_are_those_vllm_builds():
    """From vLLM 0.32's Qwen3MoeForCausalLM / Qwen2MoeForCausalLM at TP 2 (rank 1):
    named_parameters after load_weights; the values matched this oracle exactly too."""
    m = ref.Model.from_hf(model_config("qwen3-moe-tiny"))
    hf = ref.random_hf(m, 0)
    p = "model.layers.0."
    assert _shapes(ref.vllm_moe_rank(m, hf, 1, 2, expert_parallel=False)) == {
        p + "input_layernorm.weight": (128,), p + "self_attn.qkv_proj.weight": (128, 128),
        p + "self_attn.q_norm.weight": (32,), p + "self_attn.k_norm.weight": (32,),
        p + "self_attn.o_proj.weight": (128, 64), p + "post_attention_layernorm.weight": (128,),
        p + "mlp.gate.weight": (4, 128), p + "mlp.experts.routed_experts.w13_weight": (4, 64, 128),
        p + "mlp.experts.routed_experts.w2_weight": (4, 128, 32)}
    ep = _shapes(ref.vllm_moe_rank(m, hf, 1, 2, expert_parallel=True))
    assert (ep[p + "mlp.experts.routed_experts.w13_weight"], ep[p + "mlp.experts.routed_experts.w2_weight"]) == \
        ((2, 128, 128), (2, 128, 64))
    m6 = ref.Model.from_hf(model_config("qwen3-moe-tiny-6e"))
    w13 = [ref.vllm_moe_rank(m6, ref.random_hf(m6, 0), r, 4, True)[p + "mlp.experts.routed_experts.w13_weight"]
           for r in range(4)]
    assert [tuple(t.shape) for t in w13] == [(2, 128, 128), (2, 128, 128), (1, 128, 128), (1, 128, 128)]
    q2 = ref.Model.from_hf(model_config("qwen2-moe-tiny"))
    shapes = _shapes(ref.vllm_moe_rank(q2, ref.random_hf(q2, 0), 1, 2, expert_parallel=True))
    assert {k: v for k, v in shapes.items() if "shared" in k or "qkv" in k} == {
        p + "self_attn.qkv_proj.weight": (128, 128), p + "self_attn.qkv_proj.bias": (128,),
        p + "mlp.shared_expert.gate_up_proj.weight": (64, 128), p + "mlp.shared_expert.down_proj.weight": (128, 32),
        p + "mlp.shared_expert_gate.weight": (1, 128)}
    pad = ref.Model.from_hf(model_config("qwen3-moe-tiny-pad"))  # loader layout: no padding to 32 yet
    shapes = _shapes(ref.vllm_moe_rank(pad, ref.random_hf(pad, 0), 0, 2, expert_parallel=False))
    assert shapes[p + "mlp.experts.routed_experts.w13_weight"] == (4, 48, 128)
    assert shapes[p + "mlp.experts.routed_experts.w2_weight"] == (4, 128, 24)


def test_megatron_names_and_shapes_are_those_megatron_core_builds():
    """From megatron-core 0.19.2 GPTModel (local spec, SequentialMLP), Qwen2-MoE tiny at
    TP 2, EP 2, ETP 1 (rank 1) and TP 2, EP 1, ETP 2 (rank 0)."""
    m = ref.Model.from_hf(model_config("qwen2-moe-tiny"))
    hf = ref.random_hf(m, 0)
    d = "decoder.layers.0."
    common = {d + "input_layernorm.weight": (128,), d + "self_attention.linear_qkv.weight": (128, 128),
              d + "self_attention.linear_qkv.bias": (128,), d + "self_attention.linear_proj.weight": (128, 64),
              d + "pre_mlp_layernorm.weight": (128,), d + "mlp.router.weight": (4, 128),
              d + "mlp.shared_experts.linear_fc1.weight": (64, 128), d + "mlp.shared_experts.linear_fc2.weight": (128, 32),
              d + "mlp.shared_experts.gate_weight": (1, 128)}
    assert _shapes(ref.megatron_moe_rank(m, hf, 1, 2, 1, 2, 0, 1, vocab_divisible=128)) == {
        **common, **{f"{d}mlp.experts.local_experts.{j}.linear_fc1.weight": (128, 128) for j in range(2)},
        **{f"{d}mlp.experts.local_experts.{j}.linear_fc2.weight": (128, 64) for j in range(2)}}
    assert _shapes(ref.megatron_moe_rank(m, hf, 0, 2, 0, 1, 0, 2, vocab_divisible=128)) == {
        **common, **{f"{d}mlp.experts.local_experts.{j}.linear_fc1.weight": (64, 128) for j in range(4)},
        **{f"{d}mlp.experts.local_experts.{j}.linear_fc2.weight": (128, 32) for j in range(4)}}
    whole = ref.megatron_moe_rank(m, hf, 0, 2, 0, 1, 0, 2, vocab_divisible=128)
    assert whole["embedding.word_embeddings.weight"].shape == (512, 128)  # 1000 padded to 1024, half


# ---- invariants ---------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["qwen3-moe-tiny", "qwen3-moe-tiny-6e", "qwen2-moe-tiny", "mixtral-tiny"])
def test_shards_gather_back_and_both_frameworks_hold_the_same_hf_rows(preset):
    m = ref.Model.from_hf(model_config(preset))
    hf = ref.random_hf(m, 3)
    b = f"model.layers.1.{ref.moe_block(m)}."
    w13, w2 = b + "experts.routed_experts.w13_weight", b + "experts.routed_experts.w2_weight"
    whole = ref.vllm_moe_rank(m, hf, 0, 1, expert_parallel=False)
    # TP 2: the halves of each rank's [gate_r; up_r] interleave back into [gate; up]
    ranks = [ref.vllm_moe_rank(m, hf, r, 2, expert_parallel=False) for r in range(2)]
    halves = [r[w13].chunk(2, dim=1) for r in ranks]
    assert torch.equal(torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=1), whole[w13])
    assert torch.equal(torch.cat([r[w2] for r in ranks], dim=2), whole[w2])
    # EP: the ranks' experts stack back into every expert, in order
    for ep in (2, 4) if m.heads % 4 == 0 else (2,):
        ranks = [ref.vllm_moe_rank(m, hf, r, ep, expert_parallel=True) for r in range(ep)]
        assert torch.equal(torch.cat([r[w13] for r in ranks]), whole[w13])
        assert torch.equal(torch.cat([r[w2] for r in ranks]), whole[w2])
    # megatron-core at EP 2, ETP 1: local expert j of EP rank r is vLLM's expert r * E/2 + j
    for r, experts in enumerate(ref.expert_placement_megatron(m.experts, 2)):
        mg = ref.megatron_moe_rank(m, hf, 0, 1, r, 2, 0, 1)
        for j, g in enumerate(experts):
            assert torch.equal(mg[f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc1.weight"], whole[w13][g])
            assert torch.equal(mg[f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc2.weight"], whole[w2][g])
    # the dense parts are the dense oracle's
    dense = {k: v for k, v in ref.megatron_moe_rank(m, hf, 1, 2, 0, 1, 1, 2, 4, 9).items() if ".mlp." not in k}
    full = ref.megatron_full(m, hf, 4, 2, 9)
    assert dense.keys() == full.keys()
    assert all(torch.equal(dense[k], ref.megatron_shard(k, full[k], 1, 2)) for k in dense)


def test_dense_layers_of_an_moe_model_are_plain_mlps():
    hf = {**model_config("qwen3-moe-tiny"), "num_hidden_layers": 4, "mlp_only_layers": [2], "decoder_sparse_step": 2}
    m = ref.Model.from_hf(hf)
    assert m.moe_layers == (1, 3)
    h = ref.random_hf(m, 0)
    assert h["model.layers.0.mlp.gate_proj.weight"].shape == (384, 128)
    v = ref.vllm_moe_rank(m, h, 0, 2, expert_parallel=True)
    assert v["model.layers.2.mlp.gate_up_proj.weight"].shape == (384, 128)
    assert "model.layers.2.mlp.gate.weight" not in v and "model.layers.3.mlp.gate.weight" in v
    mg = ref.megatron_moe_rank(m, h, 0, 2, 0, 2, 0, 1)
    assert mg["decoder.layers.0.mlp.linear_fc1.weight"].shape == (384, 128)
    assert "decoder.layers.1.mlp.router.weight" in mg and "decoder.layers.1.mlp.linear_fc1.weight" not in mg


def test_qwen3_moe_attention_bias_is_refused_for_the_engines():
    m = ref.Model.from_hf({**model_config("qwen3-moe-tiny"), "attention_bias": True})
    assert (m.qkv_bias, m.o_bias) == (True, True)  # transformers biases o_proj too
    assert "model.layers.0.self_attn.o_proj.bias" in ref.hf_shapes(m)
    hf = ref.random_hf(m, 0)
    with pytest.raises(ValueError):
        ref.vllm_moe_rank(m, hf, 0, 1, expert_parallel=False)
    with pytest.raises(ValueError):
        ref.megatron_moe_rank(m, hf, 0, 1, 0, 1, 0, 1)
