"""Generated converters on fixed cases: the seed's QKV-bias bug, config refusals."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest
import torch

from shardsync import generated
from shardsync.generated import qwen2, qwen3
from shardsync.presets import model_config, preset_names


def test_qkv_bias_comes_out_fused_as_qkv_proj_bias_in_q_k_v_order():
    """The seed returned q/k/v biases separately where vLLM expects one fused
    `qkv_proj.bias`: here the bias follows its weight, [q | k | v] per rank."""
    hf = {**model_config("qwen2-tiny"), "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 8}
    cfg = qwen2.config_from_hf(hf)  # head_dim 2, two query heads per group
    # Megatron rows per group: [q heads of g, k_g, v_g]; label each row by its role
    q = [100 + i for i in range(8)]
    k = [200 + i for i in range(4)]
    v = [300 + i for i in range(4)]
    full = torch.tensor(q[0:4] + k[0:2] + v[0:2] + q[4:8] + k[2:4] + v[2:4], dtype=torch.float32)
    name = "decoder.layers.1.self_attention.linear_qkv.bias"
    for rank in range(2):
        shard = full.chunk(2)[rank]
        [(vllm_name, fused)] = qwen2.convert_to_hf_shard(name, shard, rank, 2, cfg)
        assert vllm_name == "model.layers.1.self_attn.qkv_proj.bias"
        assert fused.tolist() == q[4 * rank:4 * rank + 4] + k[2 * rank:2 * rank + 2] + v[2 * rank:2 * rank + 2]
    converted = dict(qwen2.convert_to_hf(name, full, cfg, layout="tp1"))
    assert converted["model.layers.1.self_attn.q_proj.bias"].tolist() == q
    assert converted["model.layers.1.self_attn.k_proj.bias"].tolist() == k
    assert converted["model.layers.1.self_attn.v_proj.bias"].tolist() == v


@pytest.mark.parametrize("change,field", [
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 must divide num_attention_heads=4"),
    ({"hidden_size": None}, "hidden_size: missing"),
    ({"vocab_size": "1000"}, "vocab_size: expected a positive integer"),
    ({"num_hidden_layers": 0}, "num_hidden_layers: expected a positive integer"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings: expected true or false"),
    ({"architectures": ["MixtralForCausalLM"]}, "architectures=['MixtralForCausalLM']"),
])
def test_an_inconsistent_config_is_refused_naming_the_field(change, field):
    hf = {**model_config("qwen3-tiny"), **change}
    hf = {k: v for k, v in hf.items() if v is not None}
    with pytest.raises(qwen3.ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        qwen3.config_from_hf(hf)


@pytest.mark.parametrize("call,message", [
    (lambda cfg: qwen3.megatron_shard_table(cfg, 0, 3), "tp_size=3 does not divide num_key_value_heads=2"),
    (lambda cfg: qwen3.megatron_shard_table(cfg, 0, 4), "tp_size=4 does not divide num_key_value_heads=2"),
    (lambda cfg: qwen3.vllm_shard_table(cfg, 0, 3), "tp_size=3 does not divide vLLM's padded vocab_size=1024"),
    (lambda cfg: qwen3.LINEAR_QKV.vllm_tensor(cfg, 0, 0, 3), "tp_size=3 does not divide num_attention_heads=4"),
    (lambda cfg: qwen3.megatron_shard_table(cfg, 0, 1, 0, 3), "pp_size=3 does not divide num_hidden_layers=2"),
    (lambda cfg: qwen3.megatron_shard_table(cfg, 2, 2), "tp_rank=2 is not in range for tp_size=2"),
])
def test_a_tp_or_pp_the_model_cannot_take_is_refused_naming_the_field(call, message):
    cfg = qwen3.config_from_hf(model_config("qwen3-tiny"))
    with pytest.raises(qwen3.ConfigError, match=message):
        call(cfg)


def test_vllm_replicates_a_kv_head_when_tp_exceeds_kv_heads():
    cfg = qwen3.config_from_hf({**model_config("qwen3-tiny"), "num_key_value_heads": 1})
    heads_of_rank = []
    for rank in range(4):
        [_, k, _] = qwen3.LINEAR_QKV.vllm_tensor(cfg, 0, rank, 4).pieces
        heads_of_rank.append(k.hf_box[0])
    assert heads_of_rank == [(0, 32)] * 4


def test_wrong_shard_shape_and_unknown_names_are_refused():
    cfg = qwen3.config_from_hf(model_config("qwen3-tiny"))
    with pytest.raises(ValueError, match=r"linear_fc2.weight: expected shape \(128, 192\), got \(128, 384\)"):
        qwen3.convert_to_hf_shard("decoder.layers.0.mlp.linear_fc2.weight", torch.zeros(128, 384), 0, 2, cfg)
    with pytest.raises(KeyError, match="layer 7 out of range"):
        qwen3.convert_to_hf("decoder.layers.7.mlp.linear_fc2.weight", torch.zeros(128, 384), cfg, layout="tp1")
    with pytest.raises(KeyError, match="output_layer.weight: not a parameter"):  # tied embeddings
        qwen3.convert_to_hf("output_layer.weight", torch.zeros(1024, 128), cfg, layout="tp1")


def test_concatenated_tp2_shards_of_linear_fc1_cannot_be_split_wrongly():
    """torch.cat of TP-2 linear_fc1 shards, [g0; u0; g1; u1], has the TP-1 shape of [gate; up]:
    the full-tensor form refuses it unless its layout is stated, and the shards form converts it."""
    cfg = qwen3.config_from_hf(model_config("qwen3-tiny"))
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    gate, up = torch.randn(384, 128), torch.randn(384, 128)
    shards = [torch.cat([gate[:192], up[:192]]), torch.cat([gate[192:], up[192:]])]
    with pytest.raises(ValueError, match=r"layout='tp1'.*convert_shards_to_hf"):
        qwen3.convert_to_hf(name, torch.cat(shards), cfg)
    with pytest.raises(TypeError):
        qwen3.convert_to_hf(name, torch.cat(shards), cfg, "tp1")
    converted = dict(qwen3.convert_shards_to_hf(name, shards, cfg))
    assert torch.equal(converted["model.layers.0.mlp.gate_proj.weight"], gate)
    assert torch.equal(converted["model.layers.0.mlp.up_proj.weight"], up)
    tp1 = dict(qwen3.convert_to_hf(name, torch.cat([gate, up]), cfg, layout="tp1"))
    assert torch.equal(tp1["model.layers.0.mlp.up_proj.weight"], up)
    with pytest.raises(ValueError, match=r"shard 0 of 1: expected shape \(768, 128\)"):
        qwen3.convert_shards_to_hf(name, [shards[0]], cfg)
    with pytest.raises(ValueError, match="sequence of every TP rank's shard"):
        qwen3.convert_shards_to_hf(name, torch.cat(shards), cfg)


def test_every_module_raises_one_config_error_class():
    from shardsync.generated import _kinds, llama, mistral

    assert qwen3.ConfigError is qwen2.ConfigError is llama.ConfigError is mistral.ConfigError is _kinds.ConfigError
    assert qwen3.Piece is llama.Piece and qwen3.LocalTensor is mistral.LocalTensor
    with pytest.raises(qwen2.ConfigError):  # caught by another module's name
        qwen3.config_from_hf({**model_config("qwen3-tiny"), "hidden_size": 0})


def test_megatron_config_follows_the_spec_families():
    qwen3_fields = qwen3.megatron_config(qwen3.config_from_hf(model_config("qwen3-tiny")))
    assert qwen3_fields == {
        "num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 32,
        "ffn_hidden_size": 384, "gated_linear_unit": True, "add_bias_linear": False, "add_qkv_bias": False,
        "qk_layernorm": True, "normalization": "RMSNorm", "layernorm_epsilon": 1e-6}
    from shardsync.generated import llama

    llama_tiny = model_config("llama-tiny")
    biased = llama.config_from_hf({**llama_tiny, "attention_bias": True, "mlp_bias": True})
    assert llama.megatron_config(biased)["add_bias_linear"] and llama.megatron_config(biased)["add_qkv_bias"]
    assert not llama.megatron_config(biased)["qk_layernorm"]
    assert llama.megatron_model_args(biased) == {"share_embeddings_and_output_weights": False,
                                                 "rotary_base": float(llama_tiny.get("rope_theta", 10000.0))}
    # megatron-core gives linear_proj, linear_fc1 and linear_fc2 a bias together
    with pytest.raises(llama.ConfigError, match="add_bias_linear switches.*has linear_proj.bias but not linear_fc1.bias"):
        llama.megatron_config(llama.config_from_hf({**llama_tiny, "attention_bias": True}))
    with pytest.raises(qwen3.ConfigError, match="rms_norm_eps: expected a positive number, got 'small'"):
        qwen3.config_from_hf({**model_config("qwen3-tiny"), "rms_norm_eps": "small"})


def test_every_preset_has_a_converter_and_a_valid_config():
    assert {"qwen3-tiny", "qwen2-tiny", "llama-tiny", "qwen3-4b", "qwen3-8b", "qwen2.5-7b", "llama3-8b",
            "qwen3-tiny-mqa"} <= set(preset_names())
    for name in preset_names():
        hf = model_config(name)
        module = generated.for_architecture(hf["architectures"][0])
        module.config_from_hf(hf)


def test_tables_command_shows_where_rank_zero_pieces_go():
    result = subprocess.run([sys.executable, "-m", "shardsync.cli", "tables", "--model", "qwen3-4b",
                             "--train-tp", "2", "--infer-tp", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Megatron pads qwen3-4b's vocab to 152064 and vLLM to 151936: rank 0's last 64 real
    # rows belong to vLLM's rank 1 even at equal TP
    assert "[75968:76032, 0:2560]  -> vllm tp1 model.embed_tokens.weight[0:64, 0:2560]" in result.stdout
    assert "-> vllm tp0 model.layers.0.self_attn.qkv_proj.weight[2048:2176, 0:2560]   (k_proj[0:128, 0:2560])" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "shardsync.cli", "tables", "--model", "qwen3-4b", "--train-tp", "3"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "num_key_value_heads=8" in bad.stderr


@pytest.mark.parametrize("preset", ["qwen3-tiny", "qwen2-tiny", "llama-tiny", "mistral-tiny"])
def test_a_config_read_back_from_transformers_is_the_same_config(preset):
    """An engine reads its HF config as transformers 5 writes it (`rope_parameters`
    holds rope_theta), a trainer often from config.json (top level): the two must give
    one Config, or the plan agreement refuses a connect over a spelling."""
    import transformers

    hf = model_config(preset)
    written = transformers.AutoConfig.for_model(**hf).to_dict()
    assert "rope_theta" not in written or "rope_parameters" not in written  # one spelling each
    module = generated.for_architecture(hf["architectures"][0])
    assert module.config_from_hf(written) == module.config_from_hf(hf)
    clash = {**hf, "rope_parameters": {"rope_theta": hf.get("rope_theta", 10000.0) * 2}}
    with pytest.raises(module.ConfigError, match="rope_theta: .* at the top level but .* in rope_parameters"):
        module.config_from_hf(clash)


@pytest.mark.parametrize("family,preset", [("qwen3_moe", "qwen3-moe-tiny"), ("qwen2_moe", "qwen2-moe-tiny")])
@pytest.mark.parametrize("field,value", [("mlp_only_layers", [1]), ("decoder_sparse_step", 2)])
def test_qwen_moe_configs_with_dense_layers_are_refused_not_misconverted(family, preset, field, value):
    module = importlib.import_module(f"shardsync.generated.{family}")
    config = model_config(preset)
    module.config_from_hf(config)  # the preset itself: every layer a mixture of experts
    with pytest.raises(module.ConfigError, match=re.escape(f"{field}={value!r}: these converters need")):
        module.config_from_hf({**config, field: value})
