"""What megatron-core must be told to build a GPTModel holding a spec's families.

Most of it follows from the families: a linear_fc1 of two stacked parts is a gated linear
unit, a linear_qkv bias family is add_qkv_bias, q/k layernorm families are qk_layernorm,
the sizes are the parts of linear_qkv, linear_proj and linear_fc1. What the layouts cannot
show (the kind of norm, its epsilon, the RoPE base; for a mixture of experts the top-k and
whether the softmax comes before it) the spec's `megatron:` section says. An expert
family's linear_fc1 gives the expert count and size, a shared expert's its size, a
shared-expert gate family the gate. Each fact becomes a Python expression over `cfg`,
rendered into `megatron_config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardsync.compiler import _kinds

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
SECTION = {"normalization": True, "layernorm_epsilon": True, "rotary_base": True, "router_topk": False,
           "router_pre_softmax": False}
MOE_FIELDS = ("router_topk", "router_pre_softmax")  # what a spec with experts must say, and only it

_LAYER = "decoder.layers.{layer}."
QKV = _LAYER + "self_attention.linear_qkv.weight"
PROJ = _LAYER + "self_attention.linear_proj.weight"
FC1 = _LAYER + "mlp.linear_fc1.weight"
LINEAR_BIASES = (_LAYER + "self_attention.linear_proj.bias", _LAYER + "mlp.linear_fc1.bias", _LAYER + "mlp.linear_fc2.bias")
QKV_BIAS = _LAYER + "self_attention.linear_qkv.bias"
QK_NORMS = (_LAYER + "self_attention.q_layernorm.weight", _LAYER + "self_attention.k_layernorm.weight")
OUTPUT = "output_layer.weight"
EXPERT_FC1 = _LAYER + "mlp.experts.local_experts.{expert}.linear_fc1.weight"
SHARED_FC1 = _LAYER + "mlp.shared_experts.linear_fc1.weight"
SHARED_GATE = _LAYER + "mlp.shared_experts.gate_weight"


@dataclass(frozen=True)
class Megatron:
    """TransformerConfig fields and GPTModel arguments, each as a Python expression; the
    switches that add parameters apart, so a probe can turn them all on."""

    sizes: tuple[tuple[str, str], ...]
    switches: tuple[tuple[str, str], ...]
    model: tuple[tuple[str, str], ...]


def megatron_facts(params, normalization: str, epsilon: str, rotary_base: str, topk: str | None = None,
                   pre_softmax: bool | str | None = None) -> Megatron:
    """The facts, from params that already passed `missing_families`; `topk` (a config
    name) and `pre_softmax` (a constant or an expression over cfg) for a spec with experts."""
    by_name = {param.megatron: param for param in params}
    q, k, _ = by_name[QKV].family.parts
    (proj,) = by_name[PROJ].family.parts
    experts = by_name.get(EXPERT_FC1)
    fc1 = (by_name[FC1] if FC1 in by_name else experts).family.parts
    moe = ()
    if experts is not None:
        shared = by_name.get(SHARED_FC1)
        moe = (
            ("num_moe_experts", f"cfg.{experts.family.experts}"),
            ("moe_ffn_hidden_size", f"cfg.{experts.family.parts[0].count}"),
            ("moe_router_topk", f"cfg.{topk}"),
            ("moe_router_pre_softmax", str(pre_softmax)),
            ("moe_shared_expert_intermediate_size", f"cfg.{shared.family.parts[0].count}" if shared else "None"),
            ("moe_shared_expert_gate", _presence(by_name, SHARED_GATE)),
        )
    sizes = (
        ("num_layers", "cfg.layers"),
        ("hidden_size", f"cfg.{proj.count}"),
        ("num_attention_heads", f"cfg.{q.count}"),
        ("num_query_groups", f"cfg.{k.count}"),
        ("kv_channels", f"cfg.{q.unit}"),
        ("ffn_hidden_size", f"cfg.{fc1[0].count}"),
        ("gated_linear_unit", str(len(fc1) == 2)),
        ("normalization", f'"{normalization}"'),
        ("layernorm_epsilon", f"cfg.{epsilon}"),
    ) + moe
    switches = (
        ("add_bias_linear", _together("add_bias_linear", by_name, LINEAR_BIASES)),
        ("add_qkv_bias", _presence(by_name, QKV_BIAS)),
        ("qk_layernorm", _together("qk_layernorm", by_name, QK_NORMS)),
    )
    model = (
        ("share_embeddings_and_output_weights", _negated(_presence(by_name, OUTPUT))),
        ("rotary_base", f"cfg.{rotary_base}"),
    )
    return Megatron(sizes, switches, model)


def missing_families(params) -> list[str]:
    """The families megatron-core's sizes are read from, absent or not laid out as
    megatron-core lays them out, each as `megatron name (what it must be)`."""
    families = {param.megatron: param.family for param in params}
    problems = []
    qkv = families.get(QKV)
    if not (qkv and len(qkv.parts) == 3 and all(part.unit for part in qkv.parts)
            and isinstance(qkv.megatron_layout, _kinds.Interleave) and qkv.parts[1].count == qkv.megatron_layout.groups):
        problems.append(f"{QKV} (q, k, v parts in heads of head_dim rows, interleaved per KV head)")
    proj = families.get(PROJ)
    if not (proj and len(proj.parts) == 1 and proj.megatron_layout == _kinds.Shard(1)):
        problems.append(f"{PROJ} (row-parallel: one part, sharded on dimension 1)")
    fc1 = families.get(FC1) or families.get(EXPERT_FC1)
    if not (fc1 and (len(fc1.parts) == 1 and fc1.megatron_layout == _kinds.Shard(0)
                     or len(fc1.parts) == 2 and fc1.megatron_layout == _kinds.Stack()
                     and fc1.parts[0].count == fc1.parts[1].count)):
        problems.append(f"{FC1} or {EXPERT_FC1} (column-parallel, or gate and up parts of one size stacked)")
    if EXPERT_FC1 in families and not families[EXPERT_FC1].experts:
        problems.append(f"{EXPERT_FC1} (an expert family: experts: NAME)")
    return problems


def _presence(by_name, name: str) -> str:
    """Whether a model has the family, as an expression: its `when`, or a constant."""
    param = by_name.get(name)
    if param is None:
        return "False"
    if param.when is None:
        return "True"
    flag, negated = param.when
    return f"not cfg.{flag}" if negated else f"cfg.{flag}"


def _together(field: str, by_name, names: tuple[str, ...]) -> str:
    """A switch that gives all these families at once: one expression when the spec
    keeps them together, else a check that the config does."""
    present = {name: _presence(by_name, name) for name in names}
    if len(set(present.values())) == 1:
        return next(iter(present.values()))
    entries = "".join(f'\n            "{".".join(name.split(".")[-2:])}": {expr},' for name, expr in present.items())
    return f'_kinds.all_or_none("{field}", {{{entries}\n        }})'


def _negated(expression: str) -> str:
    return {"True": "False", "False": "True"}.get(expression) or (
        expression[4:] if expression.startswith("not ") else f"not {expression}")
