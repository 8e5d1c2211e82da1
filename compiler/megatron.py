"""What megatron-core must be told to build a GPTModel holding a spec's families.

Most of it follows from the families: a `gated` linear_fc1 is a gated linear unit, a
linear_qkv bias family is add_qkv_bias, q/k layernorm families are qk_layernorm, the
sizes are the dims of linear_qkv, linear_proj and linear_fc1. What the layouts cannot
show (the kind of norm, its epsilon, the RoPE base) the spec's `megatron:` section says.
Each fact becomes a Python expression over `cfg`, rendered into `megatron_config`.
"""

from __future__ import annotations

from dataclasses import dataclass

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
SECTION = {"normalization": True, "layernorm_epsilon": True, "rotary_base": True}

_LAYER = "decoder.layers.{layer}."
QKV = _LAYER + "self_attention.linear_qkv.weight"
PROJ = _LAYER + "self_attention.linear_proj.weight"
FC1 = _LAYER + "mlp.linear_fc1.weight"
REQUIRED = {QKV: "qkv", PROJ: "row", FC1: "gated"}
LINEAR_BIASES = (_LAYER + "self_attention.linear_proj.bias", _LAYER + "mlp.linear_fc1.bias", _LAYER + "mlp.linear_fc2.bias")
QKV_BIAS = _LAYER + "self_attention.linear_qkv.bias"
QK_NORMS = (_LAYER + "self_attention.q_layernorm.weight", _LAYER + "self_attention.k_layernorm.weight")
OUTPUT = "output_layer.weight"


@dataclass(frozen=True)
class Megatron:
    """TransformerConfig fields and GPTModel arguments, each as a Python expression."""

    config: tuple[tuple[str, str], ...]
    model: tuple[tuple[str, str], ...]


def megatron_facts(params, normalization: str, epsilon: str, rotary_base: str) -> Megatron:
    """The facts, from params that already passed `missing_families`."""
    by_name = {param.megatron: param for param in params}
    qkv, proj, fc1 = (dict(by_name[name].dims) for name in (QKV, PROJ, FC1))
    config = (
        ("num_layers", "cfg.layers"),
        ("hidden_size", f"cfg.{proj['rows']}"),
        ("num_attention_heads", f"cfg.{qkv['heads']}"),
        ("num_query_groups", f"cfg.{qkv['kv_heads']}"),
        ("kv_channels", f"cfg.{qkv['head_dim']}"),
        ("ffn_hidden_size", f"cfg.{fc1['rows']}"),
        ("gated_linear_unit", "True"),
        ("add_bias_linear", _together("add_bias_linear", by_name, LINEAR_BIASES)),
        ("add_qkv_bias", _presence(by_name, QKV_BIAS)),
        ("qk_layernorm", _together("qk_layernorm", by_name, QK_NORMS)),
        ("normalization", f'"{normalization}"'),
        ("layernorm_epsilon", f"cfg.{epsilon}"),
    )
    model = (
        ("share_embeddings_and_output_weights", _negated(_presence(by_name, OUTPUT))),
        ("rotary_base", f"cfg.{rotary_base}"),
    )
    return Megatron(config, model)


def missing_families(params) -> list[str]:
    """Required families absent or of another kind, as `megatron name (split kind)`."""
    kinds = {param.megatron: param.kind.name for param in params}
    return [f"{name} (split {kind})" for name, kind in REQUIRED.items() if kinds.get(name) != kind]


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
