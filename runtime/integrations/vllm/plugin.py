"""vLLM plugin entry point (`vllm.general_plugins`): registers the `shardsync`
weight-transfer backend in every vLLM process, engine core and workers alike.

Lazy: vLLM imports the backend module only when a config selects it.
"""


def register() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if "shardsync" not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(
            "shardsync", "shardsync.runtime.integrations.vllm.backend", "ShardsyncWeightTransferEngine")
