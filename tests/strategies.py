"""Hypothesis strategies: model configs and the parallel layouts they admit."""

from __future__ import annotations

from hypothesis import strategies as st

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                 "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM", "starcoder2": "Starcoder2ForCausalLM"}


@st.composite
def hf_configs(draw, family: str, train_tp: int = 1) -> dict:
    """A small HF config.json dict of one family whose KV heads `train_tp` divides."""
    kv_heads = draw(st.sampled_from([1, 2, 3, 4]) if train_tp == 1 else st.sampled_from([train_tp, 2 * train_tp]))
    heads = kv_heads * draw(st.integers(1, 4))
    config = {
        "architectures": [ARCHITECTURES[family]],
        "hidden_size": 8 * draw(st.integers(1, 4)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": 24 * draw(st.integers(1, 2)),  # divisible by every TP drawn
        "vocab_size": draw(st.integers(1, 400)),  # most are multiples of neither 64 nor 128
        "num_hidden_layers": draw(st.integers(1, 4)),
        "tie_word_embeddings": draw(st.booleans()),
    }
    if family in ("qwen3", "llama", "mistral"):
        config["head_dim"] = draw(st.sampled_from([2, 4, 6, 8]))
    if family == "llama":
        config["attention_bias"] = draw(st.booleans())
        config["mlp_bias"] = draw(st.booleans())
    elif family == "qwen3":
        config["attention_bias"] = draw(st.booleans())
    elif family in ("phi3", "starcoder2"):
        # neither config has a head_dim field: both derive it from hidden_size / heads
        config["hidden_size"] = heads * draw(st.sampled_from([2, 4, 8]))
        # token ids inside the smallest vocab drawn (Phi-3's default pad id 32000 is the
        # HF embedding's padding_idx, which must be a row)
        config.update(bos_token_id=0, eos_token_id=0, pad_token_id=0)
        if family == "starcoder2":
            config["use_bias"] = draw(st.booleans())  # biases on every linear (LayerNorm biases always)
    else:
        # Qwen2 derives head_dim from hidden_size / heads
        config["hidden_size"] = heads * draw(st.sampled_from([2, 4, 8]))
    return config


def engine_tps(config: dict) -> list[int]:
    """Engine TP sizes vLLM accepts for this config."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    padded_vocab = -(-config["vocab_size"] // 64) * 64
    return [
        tp for tp in (1, 2, 3, 4, 6, 8)
        if heads % tp == 0 and (kv_heads % tp == 0 or tp % kv_heads == 0)
        and config["intermediate_size"] % tp == 0 and padded_vocab % tp == 0
    ]


train_tps = st.sampled_from([1, 2, 3, 4])
vocab_divisible = st.sampled_from([1, 4, 128])
seeds = st.integers(0, 2**31 - 1)


MOE_ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                     "mixtral": "MixtralForCausalLM"}


@st.composite
def moe_configs(draw, family: str, train_tp: int = 1, ep: int = 1, dense_layers: bool = False) -> dict:
    """A small HF config.json dict of one MoE family ("qwen3_moe", "qwen2_moe", "mixtral").

    KV heads are divisible by `train_tp` (as `hf_configs`); 2..8 experts, a multiple of
    `ep` (megatron-core needs E % EP == 0; vLLM's EP takes any count); top-k 1..E; the
    expert intermediate size is 24, 48, 72 or 96 (divisible by every TP 1, 2, 3, 4, 6, 8,
    and mostly not a multiple of 32, which vLLM's CPU kernel pads to); Qwen2-MoE's shared
    expert 24 or 48. `dense_layers`: Qwen layers may be dense too (mlp_only_layers,
    decoder_sparse_step), with intermediate_size 24 or 48."""
    kv_heads = draw(st.sampled_from([1, 2, 3, 4]) if train_tp == 1 else st.sampled_from([train_tp, 2 * train_tp]))
    heads = kv_heads * draw(st.integers(1, 4))
    layers = draw(st.integers(1, 4))
    experts = draw(st.sampled_from([e for e in range(2, 9) if e % ep == 0]))
    moe_ffn = 24 * draw(st.integers(1, 4))
    config = {
        "architectures": [MOE_ARCHITECTURES[family]],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": draw(st.integers(1, 400)),
        "num_hidden_layers": layers,
        "num_experts_per_tok": draw(st.integers(1, experts)),
        "tie_word_embeddings": draw(st.booleans()),
    }
    if family == "qwen2_moe":
        # Qwen2-MoE derives head_dim from hidden_size / heads
        config["hidden_size"] = heads * draw(st.sampled_from([2, 4, 8]))
    else:
        config["hidden_size"] = 8 * draw(st.integers(1, 4))
        config["head_dim"] = draw(st.sampled_from([2, 4, 6, 8]))
    if family == "mixtral":
        config.update(num_local_experts=experts, intermediate_size=moe_ffn)
        return config
    config.update(num_experts=experts, moe_intermediate_size=moe_ffn, norm_topk_prob=draw(st.booleans()),
                  intermediate_size=24 * draw(st.integers(1, 2)), decoder_sparse_step=1, mlp_only_layers=[])
    if family == "qwen2_moe":
        config["shared_expert_intermediate_size"] = 24 * draw(st.integers(1, 2))
    if dense_layers:
        config["decoder_sparse_step"] = draw(st.sampled_from([1, 2]))
        config["mlp_only_layers"] = draw(st.lists(st.integers(0, layers - 1), unique=True, max_size=layers))
    return config


def moe_engine_tps(config: dict) -> list[int]:
    """Engine TP sizes vLLM accepts for an MoE config (without EP the experts are TP-split)."""
    sizes = [config["moe_intermediate_size" if "moe_intermediate_size" in config else "intermediate_size"],
             config["intermediate_size"], config.get("shared_expert_intermediate_size", 0)]
    return [tp for tp in engine_tps(config) if all(size % tp == 0 for size in sizes)]
