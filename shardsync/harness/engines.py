"""vLLM engines in drills, benches and tests: environment, checkpoints, inspection.

`InspectableWorkerExtension` adds `shardsync_dump` to the library's worker
extension: every parameter of a worker, packed matmuls read back as the weight they
compute with, saved for bitwise comparison with another engine (`shardsync verify`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from shardsync.runtime.integrations.vllm.extension import ShardsyncWorkerExtension

# small KV cache, no thread pinning: several engines share this machine's cores
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
INSPECTABLE_EXTENSION = "shardsync.harness.engines.InspectableWorkerExtension"
# a fused-MoE layer's stacked expert weights, live (post-processed) in a dump
EXPERT_WEIGHTS = (".w13_weight", ".w2_weight")


class InspectableWorkerExtension(ShardsyncWorkerExtension):
    def shardsync_dump(self, prefix: str) -> str:
        """Save every parameter of this worker's model, and each packed matmul as
        the weight it computes with (its product with the identity), to
        `{prefix}.tp{rank}.pt`; returns the path."""
        from vllm.distributed import get_tensor_model_parallel_rank

        path = f"{prefix}.tp{get_tensor_model_parallel_rank()}.pt"
        torch.save(engine_state(self.model_runner.get_model()), path)
        return path



@torch.no_grad()
def engine_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, module in model.named_modules(remove_duplicate=False):
        if callable(getattr(module, "cpu_linear", None)):
            from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

            loading = get_layerwise_info(module).restore_metadata[0]["weight"]
            identity = torch.eye(loading.shape[1], dtype=loading.dtype)
            # x @ W^T with x = I gives W^T exactly: each output is one product with 1 (the weight
            # is passed as vLLM passes it: ignored by a packed kernel, used by its torch fallback)
            state[f"{name}.weight (packed)"] = module.cpu_linear(identity, module.weight, None).t().contiguous()
    return state


def write_checkpoint(directory: Path, hf_config: dict, weights: dict | None) -> Path:
    """config.json and model.safetensors (config only where `weights` is None), written
    aside and renamed into place, so a reader never sees half a checkpoint."""
    from safetensors.torch import save_file

    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    for old in (directory, partial):
        shutil.rmtree(old, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text(json.dumps({**hf_config, "torch_dtype": "float32"}, indent=2))
    if weights is not None:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(partial / "model.safetensors"))
    partial.rename(directory)
    return directory


def compare_dumps(prefix: Path, reference: Path, infer_tp: int) -> tuple[list[str], list[str]]:
    """Compare two engines' dumps rank by rank: (tensors checked, those that differ), as
    `tp{rank} {name}`. The fused-MoE layers' w13/w2 are compared as the kernel holds them
    (on CPU padded and prepacked): equal there means equal to what a fresh load computes with."""
    checked, mismatched = [], []
    for rank in range(infer_tp):
        mine = torch.load(f"{prefix}.tp{rank}.pt")
        theirs = torch.load(f"{reference}.tp{rank}.pt")
        for name in sorted(set(mine) | set(theirs)):
            checked.append(f"tp{rank} {name}")
            if name not in mine or name not in theirs or not _same(mine[name], theirs[name]):
                mismatched.append(f"tp{rank} {name}")
    return checked, mismatched


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise, shape and dtype included (torch.equal alone would let 0.0 equal -0.0)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bytes(a), _bytes(b))


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().flatten().contiguous().view(torch.uint8)
