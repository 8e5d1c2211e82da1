"""A vLLM worker extension, for users who drive workers with `collective_rpc`.

    LLM(..., worker_extension_cls=WORKER_EXTENSION)  # this class, by its import path
    llm.collective_rpc("shardsync_init", args=({"rendezvous": "10.0.0.1:29555",
                       "train_tp": 2, "engines": 2, "engine_index": 0},))
    llm.collective_rpc("shardsync_update")        # once per trainer update
    llm.collective_rpc("shardsync_close")

Arguments are plain data (collective_rpc cannot carry tensors). A worker may hold
one connection per method (`"method": "gather"` in the init info connects the
baseline too; `shardsync_update(method="gather")` uses it), for benchmarks. The same
`connect_worker` serves the registered `shardsync` weight-transfer backend.
"""

from __future__ import annotations

from shardsync.runtime.integrations.vllm.backend import ShardsyncInitInfo, connect_worker

WORKER_EXTENSION = "shardsync.runtime.integrations.vllm.extension.ShardsyncWorkerExtension"


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
        return {"stale": [r.stale for r in receivers], "updates": [r.updates for r in receivers],
                "mappings_created": [r.mappings_created for r in receivers]}

    def shardsync_close(self) -> None:
        for receiver, _ in getattr(self, "_shardsync", {}).values():
            receiver.close()
