"""Reference layouts written from the frameworks' documented behaviour, not from specs.

These are the oracles of the property tests: plain slicing of full HF tensors into
what megatron-core holds per TP rank and what vLLM holds per TP rank. They share
no code with `compiler/` or `generated/`, so a wrong spec cannot agree with them
by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VLLM_VOCAB_PAD = 64


@dataclass(frozen=True)
class Model:
    """Sizes and switches of a decoder-only model, straight from an HF config."""

    arch: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    layers: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf(cls, hf: dict) -> "Model":
        arch = hf["architectures"][0]
        heads = hf["num_attention_heads"]
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            arch=arch,
            hidden=hf["hidden_size"],
            heads=heads,
            kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            ffn=hf["intermediate_size"],
            vocab=hf["vocab_size"],
            layers=hf["num_hidden_layers"],
            tied=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias,
            o_bias=arch == "LlamaForCausalLM" and attention_bias,
            mlp_bias=arch == "LlamaForCausalLM" and bool(hf.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
        )


def hf_shapes(m: Model) -> dict[str, tuple[int, ...]]:
    """Every HF parameter of the model (tied lm_head omitted), in model order."""
    shapes = {"model.embed_tokens.weight": (m.vocab, m.hidden)}
    for i in range(m.layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (m.hidden,)
        for proj, rows in (("q", m.heads), ("k", m.kv_heads), ("v", m.kv_heads)):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (rows * m.head_dim, m.hidden)
            if m.qkv_bias:
                shapes[p + f"self_attn.{proj}_proj.bias"] = (rows * m.head_dim,)
        if m.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (m.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (m.head_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (m.hidden, m.heads * m.head_dim)
        if m.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (m.hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (m.hidden,)
        for proj in ("gate", "up"):
            shapes[p + f"mlp.{proj}_proj.weight"] = (m.ffn, m.hidden)
            if m.mlp_bias:
                shapes[p + f"mlp.{proj}_proj.bias"] = (m.ffn,)
        shapes[p + "mlp.down_proj.weight"] = (m.hidden, m.ffn)
        if m.mlp_bias:
            shapes[p + "mlp.down_proj.bias"] = (m.hidden,)
    shapes["model.norm.weight"] = (m.hidden,)
    if not m.tied:
        shapes["lm_head.weight"] = (m.vocab, m.hidden)
    return shapes


def random_hf(m: Model, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in hf_shapes(m).items()}


# ---- megatron-core ----------------------------------------------------------------

def megatron_full(m: Model, hf: dict[str, torch.Tensor], vocab_divisible: int, tp: int, seed: int) -> dict[str, torch.Tensor]:
    """The full (TP-gathered) Megatron tensors: qkv interleaved per query group,
    fc1 as [gate; up], vocab padded at the end to vocab_divisible * tp with junk rows."""
    gen = torch.Generator().manual_seed(seed + 1)
    padded = -(-m.vocab // (vocab_divisible * tp)) * vocab_divisible * tp

    def vocab_rows(t):
        return torch.cat([t, torch.randn(padded - m.vocab, t.shape[1], generator=gen)])

    full = {"embedding.word_embeddings.weight": vocab_rows(hf["model.embed_tokens.weight"])}
    for i in range(m.layers):
        h, d = f"model.layers.{i}.", f"decoder.layers.{i}."
        full[d + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
        for suffix in ("weight", "bias") if m.qkv_bias else ("weight",):
            q, k, v = (hf[h + f"self_attn.{x}_proj.{suffix}"] for x in "qkv")
            per = m.heads // m.kv_heads
            rows = []
            for g in range(m.kv_heads):
                rows += [q[g * per * m.head_dim:(g + 1) * per * m.head_dim],
                         k[g * m.head_dim:(g + 1) * m.head_dim],
                         v[g * m.head_dim:(g + 1) * m.head_dim]]
            full[d + f"self_attention.linear_qkv.{suffix}"] = torch.cat(rows)
        if m.qk_norm:
            full[d + "self_attention.q_layernorm.weight"] = hf[h + "self_attn.q_norm.weight"]
            full[d + "self_attention.k_layernorm.weight"] = hf[h + "self_attn.k_norm.weight"]
        full[d + "self_attention.linear_proj.weight"] = hf[h + "self_attn.o_proj.weight"]
        if m.o_bias:
            full[d + "self_attention.linear_proj.bias"] = hf[h + "self_attn.o_proj.bias"]
        full[d + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"]
        for suffix in ("weight", "bias") if m.mlp_bias else ("weight",):
            full[d + f"mlp.linear_fc1.{suffix}"] = torch.cat([hf[h + f"mlp.gate_proj.{suffix}"], hf[h + f"mlp.up_proj.{suffix}"]])
        full[d + "mlp.linear_fc2.weight"] = hf[h + "mlp.down_proj.weight"]
        if m.mlp_bias:
            full[d + "mlp.linear_fc2.bias"] = hf[h + "mlp.down_proj.bias"]
    full["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not m.tied:
        full["output_layer.weight"] = vocab_rows(hf["lm_head.weight"])
    return full


def megatron_shard(name: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """What TP rank `rank` holds of a full Megatron tensor."""
    if name.endswith(("layernorm.weight", "linear_proj.bias", "linear_fc2.bias")):
        return full
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(tp, dim=1)[rank]
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    # linear_qkv (contiguous block of query groups), embedding, output layer
    return full.chunk(tp)[rank]


def megatron_gather(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of megatron_shard: what a TP all-gather reassembles."""
    if name.endswith(("layernorm.weight", "linear_proj.bias", "linear_fc2.bias")):
        return shards[0]
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return torch.cat(shards, dim=1)
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        halves = [s.chunk(2) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards)


def megatron_stage_names(m: Model, names: list[str], pp_rank: int, pp: int) -> list[str]:
    per = m.layers // pp
    keep = []
    for name in names:
        if name.startswith("decoder.layers."):
            layer = int(name.split(".")[2])
            if pp_rank * per <= layer < (pp_rank + 1) * per:
                keep.append(name)
        elif name.startswith("embedding."):
            if pp_rank == 0:
                keep.append(name)
        elif pp_rank == pp - 1:
            keep.append(name)
    return keep


def megatron_padding_rows(name: str, m: Model, rank: int, tp: int, vocab_divisible: int) -> int:
    """Rows at the end of a Megatron vocab shard with no HF partner (0 for others)."""
    if not name.startswith(("embedding.", "output_layer")):
        return 0
    per = -(-m.vocab // (vocab_divisible * tp)) * vocab_divisible
    return per - max(0, min(per, m.vocab - rank * per))


# ---- vLLM -------------------------------------------------------------------------

def vllm_rank(m: Model, hf: dict[str, torch.Tensor], rank: int, tp: int) -> dict[str, torch.Tensor]:
    """What vLLM's TP rank `rank` holds after loading these HF tensors (padding rows zero)."""
    out: dict[str, torch.Tensor] = {}
    padded = -(-m.vocab // VLLM_VOCAB_PAD) * VLLM_VOCAB_PAD
    per_rank = padded // tp

    def vocab_rows(t):
        block = torch.zeros(per_rank, t.shape[1])
        start = rank * per_rank
        real = max(0, min(per_rank, m.vocab - start))
        block[:real] = t[start:start + real]
        return block

    q_heads = m.heads // tp
    if tp >= m.kv_heads:
        kv_heads, first_kv = 1, rank // (tp // m.kv_heads)
    else:
        kv_heads, first_kv = m.kv_heads // tp, rank * (m.kv_heads // tp)

    def qkv(q, k, v):
        d = m.head_dim
        return torch.cat([q[rank * q_heads * d:(rank + 1) * q_heads * d],
                          k[first_kv * d:(first_kv + kv_heads) * d],
                          v[first_kv * d:(first_kv + kv_heads) * d]])

    def rows(t):
        return t.chunk(tp)[rank]

    out["model.embed_tokens.weight"] = vocab_rows(hf["model.embed_tokens.weight"])
    for i in range(m.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        for suffix in ("weight", "bias") if m.qkv_bias else ("weight",):
            out[p + f"self_attn.qkv_proj.{suffix}"] = qkv(*(hf[p + f"self_attn.{x}_proj.{suffix}"] for x in "qkv"))
        if m.qk_norm:
            out[p + "self_attn.q_norm.weight"] = hf[p + "self_attn.q_norm.weight"]
            out[p + "self_attn.k_norm.weight"] = hf[p + "self_attn.k_norm.weight"]
        out[p + "self_attn.o_proj.weight"] = hf[p + "self_attn.o_proj.weight"].chunk(tp, dim=1)[rank]
        if m.o_bias:
            out[p + "self_attn.o_proj.bias"] = hf[p + "self_attn.o_proj.bias"]
        out[p + "post_attention_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        for suffix in ("weight", "bias") if m.mlp_bias else ("weight",):
            out[p + f"mlp.gate_up_proj.{suffix}"] = torch.cat([rows(hf[p + f"mlp.gate_proj.{suffix}"]), rows(hf[p + f"mlp.up_proj.{suffix}"])])
        out[p + "mlp.down_proj.weight"] = hf[p + "mlp.down_proj.weight"].chunk(tp, dim=1)[rank]
        if m.mlp_bias:
            out[p + "mlp.down_proj.bias"] = hf[p + "mlp.down_proj.bias"]
    out["model.norm.weight"] = hf["model.norm.weight"]
    if not m.tied:
        out["lm_head.weight"] = vocab_rows(hf["lm_head.weight"])
    return out


def vllm_padding_rows(name: str, m: Model, rank: int, tp: int) -> int:
    if not name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return 0
    per = -(-m.vocab // VLLM_VOCAB_PAD) * VLLM_VOCAB_PAD // tp
    return per - max(0, min(per, m.vocab - rank * per))
