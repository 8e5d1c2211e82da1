"""The `shardsync` weight-transfer backend for vLLM, running in each vLLM worker.

Users select it with `LLM(..., weight_transfer_config=WeightTransferConfig(
backend="shardsync"))` and drive it with vLLM's own calls:
`init_weight_transfer_engine(init_info)`, then per update `start_weight_update()`,
`update_weights({})`, `finish_weight_update()`. Each worker joins only the channels
that feed its own TP rank and writes into its live parameters by box
(`runtime/integrations/vllm/params.py`). Registered in every vLLM process by the plugin in
`runtime/integrations/vllm/plugin.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo

from shardsync.runtime.plan import Layout
from shardsync.runtime.transfer import DEFAULT_BUCKET_BYTES, Receiver
from shardsync.runtime.integrations.vllm.loader import VllmLoader
from shardsync.runtime.integrations.vllm.params import VllmTargets

logger = logging.getLogger("shardsync")


@dataclass
class ShardsyncInitInfo(WeightTransferInitInfo):
    """What `LLM.init_weight_transfer_engine(init_info)` passes: plain data only."""

    rendezvous: str
    train_tp: int
    engines: int
    engine_index: int
    train_pp: int = 1
    train_ep: int = 1  # megatron-core's expert parallel size
    train_etp: int | None = None  # its expert tensor parallel size (default train_tp)
    train_dp: int | None = None  # its data parallel size (default: the smallest train_ep x train_etp allows)
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout: float = 60.0
    make_vocab_size_divisible_by: int = 128
    method: str = "auto"  # shard where the spec has a vLLM layout table, else gather; "gather" forces the baseline
    verify: bool = False  # a checksum per bucket (both sides must agree)


@dataclass
class ShardsyncUpdateInfo(WeightTransferUpdateInfo):
    """Nothing to pass: the plan says what comes."""


class ShardsyncWeightTransferEngine(WeightTransferEngine[ShardsyncInitInfo, ShardsyncUpdateInfo]):
    init_info_cls = ShardsyncInitInfo
    update_info_cls = ShardsyncUpdateInfo
    supports_draft_weight_update = False

    receiver: Receiver | None = None
    targets: VllmTargets | None = None
    last_report = None

    def init_transfer_engine(self, init_info: ShardsyncInitInfo) -> None:
        """Connect; called again on a connected worker, reconnect (after a failed update,
        or when the trainer restarted): channels re-created, this engine stays stale until
        an update completes."""
        if self.receiver is not None:
            self.receiver.reconnect()
            return
        self.receiver, self.targets = connect_worker(
            self.model, self.model_config, self.parallel_config, self.device, init_info)

    def start_weight_update(self) -> None:
        self._require_init()

    def update_weights(self, update_info: dict) -> None:
        # on a GPU the receiver returns once its copies have run (a bounded wait), so the
        # weights are in place for whatever stream the engine reads them on next
        self.receive_weights(self.parse_update_info(update_info or {}))

    def receive_weights(self, update_info: ShardsyncUpdateInfo) -> None:
        self._require_init()
        self.last_report = self.receiver.update(self.targets)

    def finish_weight_update(self) -> None:
        self._require_init()

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None

    def _require_init(self) -> None:
        if self.receiver is None:
            raise RuntimeError("shardsync: init_weight_transfer_engine was not called on this worker")


def connect_worker(model, model_config, parallel_config, device, init_info: ShardsyncInitInfo):
    """Connect one vLLM worker's Receiver and wrap its live model as write targets."""
    from vllm.distributed import get_tensor_model_parallel_rank

    infer_tp = parallel_config.tensor_parallel_size
    layout = Layout(init_info.train_tp, init_info.train_pp, infer_tp, init_info.engines, train_ep=init_info.train_ep,
                    train_etp=init_info.train_etp, train_dp=init_info.train_dp,
                    infer_ep=bool(parallel_config.enable_expert_parallel) and infer_tp > 1)
    receiver = Receiver(
        checkpoint_config(model_config.hf_config), layout, engine=init_info.engine_index,
        tp_rank=get_tensor_model_parallel_rank(), rendezvous=init_info.rendezvous,
        bucket_bytes=init_info.bucket_bytes, timeout=init_info.timeout, dtype=model_config.dtype, device=device,
        make_vocab_size_divisible_by=init_info.make_vocab_size_divisible_by, method=init_info.method,
        verify=init_info.verify,
    )
    receiver.connect()
    channels = receiver.channels
    if receiver.loads_full_tensors:
        logger.info("shardsync: %s (method %s) joined %d channel(s); full HF tensors go through vLLM's own loader",
                    receiver.who, receiver.method, len(channels))
        return receiver, VllmLoader(model, model_config)
    table = receiver.module.vllm_shard_table(receiver.cfg, receiver.tp_rank, layout.infer_tp, layout.infer_ep)
    targets = VllmTargets(model, receiver.tensor_shapes(), receiver.expected_numel(),
                          {t.name: t.padding for t in table if t.padding})
    modes = targets.mode
    logger.info("shardsync: %s (method %s) joined %d channel(s); %d parameters written in place, %d re-processed "
                "per layer", receiver.who, receiver.method, len(channels), sum(m == "in place" for m in modes.values()),
                sum(m != "in place" for m in modes.values()))
    return receiver, targets


def checkpoint_config(hf_config) -> dict:
    """The engine's transformers config as the checkpoint's config.json names it, which is
    what specs read: `to_dict()` writes an aliased field under transformers' own name
    (Qwen3-MoE's `num_experts` as `num_local_experts`), so each alias is added back."""
    config = hf_config.to_dict()
    for alias, name in getattr(hf_config, "attribute_map", {}).items():
        if alias not in config and name in config:
            config[alias] = config[name]
    return config


def check_engine_fresh(llm) -> None:
    """Raise StaleWeightsError if any worker of this vLLM engine holds an incomplete
    update; call before generating. Needs the engine built with
    `worker_extension_cls=WORKER_EXTENSION` (`runtime/integrations/vllm/extension.py`)."""
    from shardsync.runtime.errors import StaleWeightsError

    reasons = [r for worker in llm.collective_rpc("shardsync_state") for r in worker["stale"] if r is not None]
    if reasons:
        raise StaleWeightsError(f"this vLLM engine holds a mix of old and new weights: {reasons[0]}; a later "
                                f"update must complete before it serves")
