"""A vLLM worker extension, for users who drive workers with `collective_rpc`.

    LLM(..., worker_extension_cls="runtime.vllm_extension.ShardsyncWorkerExtension")
    llm.collective_rpc("shardsync_init", args=({"rendezvous": "10.0.0.1:29555",
                       "train_tp": 2, "engines": 2, "engine_index": 0},))
    llm.collective_rpc("shardsync_update")        # once per trainer update
    llm.collective_rpc("shardsync_close")

Arguments are plain data (collective_rpc cannot carry tensors). A worker may hold
one connection per method (`"method": "gather"` in the init info connects the
baseline too; `shardsync_update(method="gather")` uses it), for benchmarks. The same
`connect_worker` serves the registered `shardsync` weight-transfer backend.
`shardsync_dump` writes the worker's post-processed parameters to a file, packed
weights unpacked, for bitwise comparison with another engine (`shardsync verify`).
"""

from __future__ import annotations

import torch

from runtime.vllm_backend import ShardsyncInitInfo, connect_worker


class ShardsyncWorkerExtension:
    def shardsync_init(self, init_info: dict) -> str:
        model = self.model_runner.get_model()
        info = ShardsyncInitInfo(**init_info)
        if not hasattr(self, "_shardsync"):
            self._shardsync = {}
        receiver, targets = connect_worker(model, self.vllm_config.model_config, self.vllm_config.parallel_config,
                                           self.device, info)
        self._shardsync[receiver.method] = receiver, targets  # keyed by the method chosen ("auto" resolved)
        return receiver.who

    def shardsync_update(self, method: str | None = None) -> dict:
        """One update; `method` picks a connection where a worker holds more than one."""
        if method is None and len(self._shardsync) == 1:
            method = next(iter(self._shardsync))
        receiver, targets = self._shardsync[method or "shard"]
        report = receiver.update(targets)
        return {"update": report.update, "bytes": report.bytes,
                "layers_reprocessed": getattr(targets, "layers_reprocessed", None),  # None: vLLM's loader did it
                "tracked_bytes": receiver.buffer_bytes + receiver.peak_temp_bytes}

    def shardsync_reconnect(self) -> None:
        """After a failed update or a trainer restart: every connection's channels anew."""
        for receiver, _ in getattr(self, "_shardsync", {}).values():
            receiver.reconnect()

    def shardsync_state(self) -> dict:
        """Why this worker's weights are stale (None: they are not), per receiver it
        holds: the registered backend's and this extension's own connections."""
        receivers = [receiver for receiver, _ in getattr(self, "_shardsync", {}).values()]
        backend = getattr(self, "weight_transfer_engine", None)
        if getattr(backend, "receiver", None) is not None:
            receivers.append(backend.receiver)
        return {"stale": [r.stale for r in receivers], "updates": [r.updates for r in receivers]}

    def shardsync_close(self) -> None:
        for receiver, _ in getattr(self, "_shardsync", {}).values():
            receiver.close()

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
