"""A vLLM model's live parameters as write targets, one layer at a time.

Two cases, chosen per layer:

- used as loaded (norms; unquantized linears and embeddings on CUDA): each piece is
  written straight into the live parameter;
- post-processed after loading (vLLM on CPU repacks linears and the lm_head matmul
  for oneDNN and leaves an empty `[0]` weight; quantized kernels on GPU): before the
  layer's first piece its loading-format parameters are restored with vLLM's own
  reload helpers (`vllm.model_executor.model_loader.reload`), the TP-local pieces
  are written into them by box, and after its last piece vLLM's
  `process_weights_after_loading` runs for that layer alone, so extra memory is
  about one layer. Nothing goes through a checkpoint-format (full) tensor.

A fused-MoE layer is one such layer (`routed_experts`: w13/w2 for all its local
experts); its post-processing is run as the engine's first load ran it, experts'
own step included (`_process_as_first_load`), so the result equals a fresh load.

Writing into a post-processed layer's parameter in place would change nothing the
kernels read (or only a copy of it, as with the CPU embedding, whose packed lm_head
matmul is separate), which is why the rule is per layer and not per shape.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from shardsync.runtime.plan import boxes
from shardsync.runtime.errors import PlanError, TransferError


class VllmTargets:
    """Write targets over a live vLLM model (this worker's TP rank).

    `shapes`, `expected` and `padding` come from the receiver's plan: the vLLM
    names this rank holds, the elements each receives per update, and the padding
    boxes (vocab rows) that a restored parameter must hold as zeros.
    """

    def __init__(self, model: torch.nn.Module, shapes: dict, expected: dict, padding: dict):
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        self.model = model
        self.shapes = shapes
        self.padding = padding
        # a parameter the plan never writes would silently keep old weights
        unplanned = sorted(name for name, _ in model.named_parameters() if name not in shapes)
        if unplanned:
            raise PlanError(f"vLLM parameters no spec family writes: {unplanned[:5]}"
                            f"{f' and {len(unplanned) - 5} more' if len(unplanned) > 5 else ''}")
        self.owner: dict[str, tuple[torch.nn.Module, str]] = {}
        self.layer_numel: dict[torch.nn.Module, int] = {}
        for name in shapes:
            module_name, _, attr = name.rpartition(".")
            try:
                layer = model.get_submodule(module_name)
            except AttributeError:
                raise PlanError(f"{name}: the vLLM model has no module {module_name!r}") from None
            self.owner[name] = (layer, attr)
            self.layer_numel[layer] = self.layer_numel.get(layer, 0) + expected.get(name, 0)
        self.reprocessed = {layer for layer in self.layer_numel if needs_reprocessing(layer)}
        self.aliases = _tied_aliases(model, self.owner)
        self.params_of: dict[torch.nn.Module, list[str]] = {}  # layer -> its attrs the plan writes
        for layer, attr in self.owner.values():
            self.params_of.setdefault(layer, []).append(attr)
        for name, (layer, attr) in self.owner.items():
            if layer in self.reprocessed:
                loading = get_layerwise_info(layer).restore_metadata[0]
                # vLLM's reload leaves a bias live (never repacked): it is written in place
                live = getattr(layer, attr, None)
                shape = tuple(loading[attr].shape) if attr in loading else (tuple(live.shape) if live is not None else None)
                for other in loading:
                    if other not in self.params_of[layer]:
                        raise PlanError(f"{name.rpartition('.')[0]}.{other}: a loading-format parameter the plan "
                                        f"does not write; re-processing the layer would read garbage")
            else:
                param = getattr(layer, attr, None)
                shape = tuple(param.shape) if param is not None else None
            if shape != tuple(shapes[name]):
                raise PlanError(f"{name}: the engine's loading-format shape is {shape}, the plan's {tuple(shapes[name])}")
        self.remaining: dict[torch.nn.Module, int] = {}
        self.open: dict[torch.nn.Module, object] = {}
        self.layers_reprocessed = 0

    def names(self) -> set[str]:
        return set(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.shapes[name])

    def dtype(self, name: str) -> None:
        """Not checked: vLLM loaded the model in the dtype the receiver was given."""
        return None

    def begin_update(self) -> None:
        self.remaining = dict(self.layer_numel)
        self.layers_reprocessed = 0

    def tensor(self, name: str) -> torch.Tensor:
        layer, attr = self.owner[name]
        if layer in self.reprocessed and layer not in self.open:
            self.open[layer] = _restore_loading_format(layer)
            prefix = name.rpartition(".")[0]
            for other_attr in self.params_of[layer]:
                for box in self.padding.get(f"{prefix}.{other_attr}", ()):
                    getattr(layer, other_attr).data[boxes.as_slices(box)] = 0
        return getattr(layer, attr).data

    def written(self, name: str, numel: int) -> None:
        layer, _ = self.owner[name]
        self.remaining[layer] -= numel
        if self.remaining[layer] == 0:
            if layer in self.open:
                _process(layer, self.open.pop(layer))
                self.layers_reprocessed += 1
            for alias in self.aliases.get(layer, ()):
                # a tied module (lm_head sharing the embedding) keeps its own packed copy
                alias.quant_method.process_weights_after_loading(alias)
                self.layers_reprocessed += 1

    def finish_update(self) -> None:
        if self.open:
            names = sorted(n.rpartition(".")[0] for n, (layer, _) in self.owner.items() if layer in self.open)
            raise TransferError(f"layers restored but not completed by the update: {names[:5]}")

    @property
    def mode(self) -> dict[str, str]:
        """Per parameter: 'in place' or 're-processed'."""
        return {n: ("re-processed" if layer in self.reprocessed else "in place") for n, (layer, _) in self.owner.items()}


def _tied_aliases(model: torch.nn.Module, owner: dict) -> dict:
    """Modules that share a written parameter with its owner and post-process it
    themselves (a tied lm_head): they must be re-processed when the owner changes."""
    owned = {id(getattr(layer, attr)): layer for layer, attr in owner.values()}
    aliases: dict[torch.nn.Module, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            layer = owned.get(id(param))
            if layer is not None and module is not layer and needs_reprocessing(module):
                aliases.setdefault(layer, []).append(module)
    return aliases


def needs_reprocessing(layer: torch.nn.Module) -> bool:
    """Whether vLLM transforms this layer's parameters after loading on this platform."""
    from vllm.platforms import current_platform

    method = getattr(layer, "quant_method", None)
    if method is None:
        return False
    if current_platform.is_cpu():
        return True  # linears and the lm_head matmul are repacked (oneDNN / sgl kernels)
    return type(method).__name__ not in ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")


def _restore_loading_format(layer: torch.nn.Module):
    """Put back the layer's loading-format parameters (empty), as vLLM's layerwise
    reload does, keeping the kernel tensors to copy the processed result into."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.meta import materialize_layer, restore_layer_on_meta
    from vllm.model_executor.model_loader.reload.utils import get_layer_params_buffers

    info = get_layerwise_info(layer)
    info.kernel_tensors = get_layer_params_buffers(layer)
    info.kernel_non_persistent_buffers = set(layer._non_persistent_buffers_set)
    restore_layer_on_meta(layer, info)
    materialize_layer(layer, info)
    return info


def _process(layer: torch.nn.Module, info) -> None:
    """Run the layer's post-processing and copy the result into its kernel tensors."""
    from vllm.model_executor.model_loader.reload.layerwise import _copy_and_restore_kernel_tensors

    if hasattr(layer, "_already_called_process_weights_after_loading"):
        delattr(layer, "_already_called_process_weights_after_loading")
    _process_as_first_load(layer)
    if hasattr(layer, "update_param_tp_status"):
        layer.update_param_tp_status()
    _copy_and_restore_kernel_tensors(layer, info)
    info.reset()


def _process_as_first_load(layer: torch.nn.Module, process=None) -> None:
    """The layer's post-processing, transforming the weights as the engine's first load did.

    A fused-MoE method whose kernel is already built treats the call as a weight
    update and skips its experts' own step (`fused_experts.process_weights_after_loading`:
    on CPU, padding the intermediate to a multiple of 32 and prepacking w13/w2),
    so the kernel would read raw loading-format weights. That step is run here
    when the method skipped it. The kernel itself, and with it the expert map and
    routing tables it was built with, is kept: rebuilding it is what a first load
    does beyond transforming weights, and the engine's expert placement must not move.
    `process` is the method's own post-processing where its attribute is wrapped.
    """
    method = layer.quant_method
    process = process or method.process_weights_after_loading
    experts = getattr(getattr(method, "moe_kernel", None), "fused_experts", None)
    if experts is None:
        process(layer)
        return
    own_step = experts.process_weights_after_loading
    ran = []

    def watched(module: torch.nn.Module) -> None:
        ran.append(True)
        own_step(module)

    experts.process_weights_after_loading = watched  # an instance attribute, removed below
    try:
        process(layer)
    finally:
        del experts.process_weights_after_loading
    if not ran:
        own_step(layer)


@contextmanager
def experts_processed_as_first_load(model: torch.nn.Module):
    """While vLLM's own layerwise reload runs (full HF tensors through `load_weights`):
    each fused-MoE layer's post-processing runs as in `_process_as_first_load`, which
    that reload, calling the method directly, would otherwise skip the experts' step of."""
    wrapped = []
    for layer in model.modules():
        method = getattr(layer, "quant_method", None)
        if getattr(getattr(method, "moe_kernel", None), "fused_experts", None) is None or method in wrapped:
            continue
        process = method.process_weights_after_loading
        method.process_weights_after_loading = partial(_process_with, process)
        wrapped.append(method)
    try:
        yield
    finally:
        for method in wrapped:
            del method.process_weights_after_loading


def _process_with(process, layer: torch.nn.Module) -> None:
    _process_as_first_load(layer, process)
