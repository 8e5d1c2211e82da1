"""A live megatron-core model stage as a sender's tensors.

The trainer keeps its model; this reads its parameters where they are (views, no
copy), under the global-layer Megatron names the shard tables use, after checking
that the model is the one the HF config describes. A mismatch in a shape-changing
field would be caught by the plan's shape check; one that only changes numbers
(norm epsilon, RoPE base, the vocab padding) would not, so each is compared and
refused by name. Works on any device: mixed dtypes (bf16 linears, fp32 norms) are
cast to the wire dtype while packing.

Mixture-of-experts models: router settings that change which experts a token reaches
or how their outputs are weighed are compared too, since the tensors are the same
either way. Experts keep megatron-core's local index (`local_experts.{j}` on EP rank r
is global expert r*E/EP + j, which the shard tables know), and a rank hands them over
only at expert-DP rank 0: elsewhere they are gradient replicas.
"""

from __future__ import annotations

import math

import torch

from shardsync import generated
from shardsync.runtime.errors import ModelMismatchError, TensorError
from shardsync.runtime.plan import Layout
from shardsync.runtime.plan.build import is_expert

_LAYERS = "decoder.layers."
_OUTPUT = "output_layer.weight"


def gelu_pytorch_tanh(x: torch.Tensor) -> torch.Tensor:
    """HF's `gelu_pytorch_tanh` (Starcoder2, Gemma) for a TransformerConfig's activation_func."""
    return torch.nn.functional.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
               "gelu_pytorch_tanh": gelu_pytorch_tanh}
"""HF `hidden_act` -> the function a TransformerConfig's activation_func must be (by name)."""


def activation_for(hf_config: dict):
    """The activation_func of a megatron-core model that computes what the HF model does."""
    act = hf_config.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ModelMismatchError(f"hidden_act={act!r}: no known megatron-core activation_func for it "
                                 f"(known: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[act]


def transformer_fields(hf_config: dict, tp_size: int, make_vocab_size_divisible_by: int = 128) -> tuple[dict, dict]:
    """What a megatron-core GPT model for this HF config has: (TransformerConfig fields,
    GPTModel arguments), as the spec's generated module states them. The source checks a
    live model against these; the demo builds its model from them."""
    module = generated.for_architecture((hf_config.get("architectures") or [None])[0])
    cfg = module.config_from_hf(hf_config, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    embedding = next(f for f in module.families(cfg) if f.stage == "first")
    model = {
        "vocab_size": embedding.megatron_tensor(cfg, None, 0, tp_size).shape[0] * tp_size,
        **module.megatron_model_args(cfg),
    }
    return module.megatron_config(cfg), model


class MegatronSource:
    """One trainer rank's model stage: position from `parallel_state`, tensors by name.

    The rank's dense position (TP, PP, DP) and expert position (EP, ETP, expert DP) are
    read from megatron-core's own groups, so the layout this rank plans with is the one
    the trainer runs. A rank at dense and expert DP rank above 0 holds only replicas:
    it is no sender (`is_sender`), and `sender()` says so."""

    def __init__(self, model, hf_config: dict, make_vocab_size_divisible_by: int = 128):
        from megatron.core import parallel_state as ps

        self.model = unwrap_model(model)
        self.hf_config = hf_config
        self.make_vocab_size_divisible_by = make_vocab_size_divisible_by
        self.tp_rank, self.tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        self.pp_rank, self.pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.ep_rank, self.ep_size = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
        self.etp_rank = ps.get_expert_tensor_parallel_rank()
        self.etp_size = ps.get_expert_tensor_parallel_world_size()
        self.edp_rank = ps.get_expert_data_parallel_rank()
        self.module = generated.for_architecture((hf_config.get("architectures") or [None])[0])
        self.cfg = self.module.config_from_hf(hf_config, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        check_model(self.model, hf_config, self.tp_size, make_vocab_size_divisible_by)
        self._params = self._index()

    def layout(self, infer_tp: int, engines: int, infer_ep: bool = False) -> Layout:
        """The transfer's layout: this trainer's sizes, the engines' as given."""
        return Layout(self.tp_size, self.pp_size, infer_tp, engines, train_ep=self.ep_size, train_etp=self.etp_size,
                      train_dp=self.dp_size, infer_ep=infer_ep)

    @property
    def position(self):
        """This rank in the layout's terms (a `TrainerRank`), checked against megatron-core's
        own expert position: a trainer built with another rank order plans wrong copies."""
        position = self.layout(1, 1).trainer_at(self.pp_rank, self.tp_rank, self.dp_rank)
        theirs = (self.ep_rank, self.etp_rank, self.edp_rank)
        ours = (position.ep, position.etp, position.edp)
        if theirs != ours:
            raise ModelMismatchError(
                f"trainer pp{self.pp_rank} tp{self.tp_rank} dp{self.dp_rank}: megatron-core puts it at expert rank "
                f"(ep, etp, edp) = {theirs}, shardsync's layout at {ours} (shardsync numbers ranks as "
                f"initialize_model_parallel's default order tp-cp-ep-dp-pp does)")
        return position

    @property
    def is_sender(self) -> bool:
        """Whether this rank holds a unique shard (dense DP rank 0 or expert DP rank 0)."""
        return self.dp_rank == 0 or self.edp_rank == 0

    def sender(self, infer_tp: int, engines: int, infer_ep: bool = False, **options):
        """A Sender for this rank; `options` as for `runtime.transfer.Sender`."""
        from shardsync.runtime.errors import PlanError
        from shardsync.runtime.transfer import Sender

        if not self.is_sender:
            raise PlanError(
                f"trainer pp{self.pp_rank} tp{self.tp_rank} dp{self.dp_rank} holds only replicas: its dense "
                f"tensors are dp0's and its experts (ep{self.ep_rank} etp{self.etp_rank}) expert-dp0's, so it "
                f"sends nothing; check `source.is_sender` and create no Sender on it")
        self.position  # noqa: B018 - refuses a rank order other than shardsync's
        return Sender(self.hf_config, self.layout(infer_tp, engines, infer_ep), pp_rank=self.pp_rank,
                      tp_rank=self.tp_rank, dp_rank=self.dp_rank,
                      make_vocab_size_divisible_by=self.make_vocab_size_divisible_by, **options)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The live parameters this rank sends, as detached views (no copy), by global
        Megatron name: the dense ones, and the experts (local index as megatron-core
        names them) if it is at expert DP rank 0."""
        return {name: param.detach() for name, param in self._params.items()
                if self.edp_rank == 0 or not is_expert(self.module, self.cfg, name)}

    def _index(self) -> dict[str, torch.nn.Parameter]:
        table = self.module.megatron_shard_table(self.cfg, self.tp_rank, self.tp_size, self.pp_rank, self.pp_size,
                                                 self.ep_rank, self.ep_size, self.etp_rank, self.etp_size)
        wanted = [local.name for local in table]
        found = global_parameters(self.model)
        if self.cfg.tied and self.pp_size > 1 and self.pp_rank == self.pp_size - 1:
            found.pop(_OUTPUT, None)  # the last stage's copy of the tied embedding: the first stage sends
        missing = [n for n in wanted if n not in found]
        extra = [n for n in found if n not in set(wanted)]
        if missing or extra:
            raise TensorError(
                f"trainer pp{self.pp_rank} tp{self.tp_rank} ep{self.ep_rank}: the model's parameters differ from "
                f"the {self.module.FAMILY} spec: missing {missing[:4]}, unexpected {extra[:4]} (shardsync reads "
                f"megatron-core's local layer spec names; a Transformer-Engine spec fuses norms into linears)")
        wrong = [f"{n} {tuple(found[n].shape)} (spec {tuple(local.shape)})" for n, local in
                 ((local.name, local) for local in table) if tuple(found[n].shape) != tuple(local.shape)]
        if wrong:
            raise TensorError(f"trainer pp{self.pp_rank} tp{self.tp_rank} ep{self.ep_rank}: shapes differ from the "
                              f"{self.module.FAMILY} spec: {', '.join(wrong[:4])}")
        return {name: found[name] for name in wanted}


def check_model(model, hf_config: dict, tp_size: int, make_vocab_size_divisible_by: int = 128) -> None:
    """Refuse a model whose config differs from the HF config, naming the first field."""
    model = unwrap_model(model)
    fields, model_fields = transformer_fields(hf_config, tp_size, make_vocab_size_divisible_by)
    config = model.config
    module = generated.for_architecture((hf_config.get("architectures") or [None])[0])
    for field, expected in fields.items():
        actual = getattr(config, field, None)
        if not _same(actual, expected):
            raise ModelMismatchError(f"TransformerConfig.{field} is {actual!r}; the HF config implies {expected!r}"
                                     f"{_hf_source(module, hf_config, field)}")
    if fields.get("num_moe_experts"):
        _check_routing(config)
    act = getattr(config.activation_func, "__name__", str(config.activation_func))
    wanted = activation_for(hf_config).__name__
    if act != wanted:
        raise ModelMismatchError(f"TransformerConfig.activation_func is {act}; the HF config has hidden_act="
                                 f"{hf_config.get('hidden_act')!r} ({wanted})")
    if model.vocab_size != model_fields["vocab_size"]:
        raise ModelMismatchError(
            f"GPTModel.vocab_size is {model.vocab_size}; vocab_size={hf_config['vocab_size']} padded for TP "
            f"{tp_size} with make_vocab_size_divisible_by={make_vocab_size_divisible_by} gives "
            f"{model_fields['vocab_size']} (pass the trainer's make_vocab_size_divisible_by)")
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    if tied != model_fields["share_embeddings_and_output_weights"]:
        raise ModelMismatchError(f"GPTModel.share_embeddings_and_output_weights is {tied}; the HF config has "
                                 f"tie_word_embeddings={model_fields['share_embeddings_and_output_weights']}")
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is not None and hasattr(rotary, "inv_freq"):
        dim = 2 * rotary.inv_freq.numel()
        base = float(rotary.inv_freq[1].double() ** (-dim / 2)) if rotary.inv_freq.numel() > 1 else None
        if base is not None and not math.isclose(base, model_fields["rotary_base"], rel_tol=1e-3):
            raise ModelMismatchError(f"GPTModel rotary_base is {base:.6g}; the HF config has "
                                     f"rope_theta={model_fields['rotary_base']:.6g}")


_HF_OF = {"num_moe_experts": "experts", "moe_router_topk": "topk", "moe_ffn_hidden_size": "moe_ffn",
          "ffn_hidden_size": "moe_ffn", "moe_router_pre_softmax": "norm_topk",
          "moe_shared_expert_intermediate_size": "shared_ffn"}
"""MoE TransformerConfig field -> the spec config field it comes from (for the message)."""

ROUTING = {"moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False,
           "moe_router_num_groups": None, "moe_router_group_topk": None,
           "moe_router_topk_scaling_factor": (None, 1.0)}
"""Router settings the three HF MoE families share: softmax scores, no expert bias, no
group-limited routing, no scaling of the top-k weights. A router set otherwise picks
or weighs other experts with the same tensors, which no shape check can see."""


def _hf_source(module, hf_config: dict, field: str) -> str:
    """`(from HF num_experts_per_tok=2)`, where the field comes from one HF field."""
    attr = _HF_OF.get(field)
    hf_fields = getattr(getattr(module, "Config", None), "HF_FIELDS", {})
    if attr is None or attr not in hf_fields:
        return ""
    name = hf_fields[attr]
    return f" (from HF {name}={hf_config.get(name)!r})"


def _check_routing(config) -> None:
    for field, allowed in ROUTING.items():
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        actual = getattr(config, field, allowed[0])
        if actual not in allowed:
            raise ModelMismatchError(f"TransformerConfig.{field} is {actual!r}; the HF config's router implies "
                                     f"{allowed[0]!r}")


def _same(actual, expected) -> bool:
    if isinstance(expected, float):
        return isinstance(actual, (int, float)) and math.isclose(actual, expected, rel_tol=1e-9)
    return actual == expected


def unwrap_model(model):
    """The GPTModel inside DDP / Float16Module wrappers (each keeps it as `.module`)."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def global_parameters(model) -> dict[str, torch.nn.Parameter]:
    """A model stage's parameters by global Megatron name: the local layer index in each
    `decoder.layers.{i}` replaced by that layer's own `layer_number` (PP stages count
    their layers from 0)."""
    offsets = _layer_offsets(model)
    return {_global_name(name, offsets): param for name, param in model.named_parameters()}


def _layer_offsets(model) -> dict[int, int]:
    """Local layer index -> global layer index (0-based), from each layer's `layer_number`."""
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    return {index: layer.layer_number - 1 for index, layer in enumerate(layers)}


def _global_name(name: str, offsets: dict[int, int]) -> str:
    if not name.startswith(_LAYERS):
        return name
    local, _, rest = name[len(_LAYERS):].partition(".")
    return f"{_LAYERS}{offsets[int(local)]}.{rest}"
