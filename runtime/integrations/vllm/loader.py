"""Full HF tensors into a live vLLM model through vLLM's own loader.

For a spec without a vLLM layout table shardsync cannot write vLLM's fused tensors
by box, so each engine rank takes every full HF tensor and lets the model's own
`load_weights` fuse and slice it, wrapped in vLLM's layerwise reload (what vLLM's
NCCL weight-transfer engine does): parameters post-processed after loading (linears
repacked for oneDNN on CPU, quantized kernels) are restored to the loading format
before their layer loads and re-processed after it; a fused-MoE layer is
re-processed as its first load was (`experts_processed_as_first_load`), which vLLM's
reload alone does not do.
"""

from __future__ import annotations

import torch


class VllmLoader:
    def __init__(self, model: torch.nn.Module, model_config):
        self.model = model
        self.model_config = model_config

    def load_weights(self, weights) -> set[str]:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        from shardsync.runtime.integrations.vllm.params import experts_processed_as_first_load

        initialize_layerwise_reload(self.model)
        with experts_processed_as_first_load(self.model):
            loaded = self.model.load_weights(weights)
            finalize_layerwise_reload(self.model, self.model_config)
        return loaded
