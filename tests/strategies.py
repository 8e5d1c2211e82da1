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
