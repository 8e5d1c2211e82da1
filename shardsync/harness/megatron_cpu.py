"""DEMO/TEST SUPPORT ONLY: a real megatron-core GPTModel on a CPU-only machine.

megatron-core assumes CUDA in a few places (`torch.cuda.current_device()`, masks
and counters allocated with `device="cuda"`). `cpu_shims()` redirects those to the
CPU for the processes of the demo and the tests; nothing in `runtime/` imports this
module, so the path a GPU trainer uses never sees a shim.

Also here: process-group set-up over gloo and the model built from an HF config,
with the TransformerConfig fields `runtime.integrations.megatron.source` checks.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
from torch.overrides import TorchFunctionMode

from shardsync.runtime.integrations.megatron.source import activation_for, transformer_fields

_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.arange, torch.tensor, torch.empty_like,
              torch.zeros_like, torch.ones_like, torch.randn, torch.rand}


class _CudaToCpu(TorchFunctionMode):
    """Rewrites `device="cuda"` (or an index) to the CPU in tensor factories, and
    makes `tensor.cuda()` a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        kwargs = dict(kwargs or {})
        if func in _FACTORIES and "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


class _NoStream:
    """The CPU runs in order: waiting on an event or a stream is a no-op."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


@contextlib.contextmanager
def cpu_shims():
    """Run megatron-core on the CPU inside this block (demo and test processes only)."""
    patches = {"current_device": lambda: torch.device("cpu"), "synchronize": lambda device=None: None,
               "current_stream": lambda device=None: _NoStream()}
    saved = {name: getattr(torch.cuda, name) for name in patches}
    for name, shim in patches.items():
        setattr(torch.cuda, name, shim)
    try:
        with _CudaToCpu():
            yield
    finally:
        for name, original in saved.items():
            setattr(torch.cuda, name, original)


def init_parallel(rank: int, world_size: int, port: int, tp: int, pp: int, seed: int = 1234,
                  timeout_s: float = 300.0, ep: int = 1, etp: int | None = None) -> None:
    """torch.distributed over gloo, then Megatron's TP/PP/EP/ETP groups and RNG trackers;
    the data-parallel size is what the world leaves (world / (tp x pp))."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size, timeout=timedelta(seconds=timeout_s))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             expert_model_parallel_size=ep, expert_tensor_parallel_size=etp or tp,
                                             distributed_timeout_minutes=max(1, int(timeout_s // 60)))
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)


def build_gpt_model(hf_config: dict, *, make_vocab_size_divisible_by: int = 128, params_dtype=torch.float32,
                    seq_length: int = 256):
    """This rank's GPTModel stage for an HF config, with the local (non-TE) layer spec.

    Dropout is off, so the trainer's forward is comparable with the engine's. An MoE
    model routes tokens with the allgather dispatcher (the one that runs over gloo with
    these shims; alltoall wants CUDA streams) and no auxiliary loss: the demo's loss is
    the policy gradient alone. Expert parallel sizes come from `parallel_state`.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    fields, model_fields = transformer_fields(hf_config, tp, make_vocab_size_divisible_by)
    config = TransformerConfig(
        **fields, activation_func=activation_for(hf_config), hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=params_dtype,
        params_dtype=params_dtype, use_cpu_initialization=True, init_method_std=0.02,
        bf16=params_dtype == torch.bfloat16, **_moe_fields(fields))
    spec = get_gpt_layer_local_spec(num_experts=fields.get("num_moe_experts"), qk_layernorm=fields["qk_layernorm"],
                                    normalization=fields["normalization"])
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=model_fields["vocab_size"],
                    max_sequence_length=seq_length, pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(),
                    share_embeddings_and_output_weights=model_fields["share_embeddings_and_output_weights"],
                    position_embedding_type="rope", rotary_base=model_fields["rotary_base"])


def _moe_fields(fields: dict) -> dict:
    """TransformerConfig fields an MoE model needs on CPU over gloo (none for a dense one)."""
    from megatron.core import parallel_state

    if not fields.get("num_moe_experts"):
        return {}
    return {"expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
            "expert_tensor_parallel_size": parallel_state.get_expert_tensor_parallel_world_size(),
            "moe_token_dispatcher_type": "allgather", "moe_router_load_balancing_type": "none",
            "moe_aux_loss_coeff": 0.0}


def needs_eval_mode(model) -> bool:
    """megatron-core's MoE layer refuses to train with TP > 1 unless sequence parallelism
    is on, and the local spec's torch norms cannot do sequence parallelism; in eval()
    mode it skips that check, and with dropout off a step computes the same gradients.
    So a CPU MoE model at TP > 1 trains in eval() mode (tests and demo only)."""
    from megatron.core import parallel_state

    return bool(getattr(model.config, "num_moe_experts", None)) and \
        parallel_state.get_tensor_model_parallel_world_size() > 1
