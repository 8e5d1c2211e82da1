"""The gather path, as an oracle: a live megatron-core model as full HF tensors.

Every rank sends its shards, with the global offsets megatron-core's own
`sharded_state_dict()` gives them (its checkpoint format, independent of the shard
tables), to global rank 0, which assembles full Megatron tensors in the TP-1 layout
whatever the trainer's TP, and converts them with the generated `convert_to_hf`. This
is the full-gather sync; `shardsync verify --source megatron` loads its output into a
fresh vLLM engine to judge the shard-to-shard transfer. Not for the hot path: rank 0
holds the model.

Experts come the same way: megatron-core's state dict gives each local expert its
global (layer, expert) offset, so every EP and ETP position lands in its place, once
(its main replica: expert-DP rank 0), whatever the trainer's expert layout.
"""

from __future__ import annotations

import re

import torch

from shardsync.runtime.integrations.megatron.source import unwrap_model

_LAYERS = "decoder.layers."
_LOCAL_EXPERT = re.compile(r"\.local_experts\.\d+\.")


def gather_hf_state(model, module, cfg) -> dict[str, torch.Tensor] | None:
    """Full HF tensors on global rank 0 (None on the others). A collective: every rank calls it."""
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    model = unwrap_model(model)
    pieces = []
    for name, sharded in model.sharded_state_dict().items():
        for tensor in _built(sharded):
            if not is_main_replica(tensor.replica_id):
                continue
            prepend = tensor.prepend_axis_num
            global_name = _global_name(name, tensor.global_offset[:prepend])
            pieces.append((global_name, tuple(tensor.global_shape[prepend:]), tuple(tensor.global_offset[prepend:]),
                           tensor.data.detach().cpu().clone()))
    gathered = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(pieces, gathered, dst=0)
    if gathered is None:
        return None
    full: dict[str, torch.Tensor] = {}
    for name, shape, offset, data in (piece for rank_pieces in gathered for piece in rank_pieces):
        target = full.setdefault(name, torch.zeros(shape, dtype=data.dtype))
        target[tuple(slice(o, o + n) for o, n in zip(offset, data.shape))] = data
    hf: dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        if name == "output_layer.weight" and cfg.tied:
            continue  # the last stage's copy of the tied embedding
        hf.update(module.convert_to_hf(name, tensor, cfg, layout="tp1"))  # sharded_state_dict assembles TP 1
    return hf


def _built(sharded) -> list:
    """ShardedTensors of one state-dict entry: factories (SwiGLU's fc1) are built into
    theirs; objects (extra state) have none."""
    kind = type(sharded).__name__
    if kind == "ShardedTensor":
        return [sharded]
    if kind == "ShardedTensorFactory":
        built = sharded.build()
        built = built.values() if isinstance(built, dict) else built
        return [t for t in built if type(t).__name__ == "ShardedTensor"]
    return []


def _global_name(name: str, prepended: tuple[int, ...]) -> str:
    """`decoder.layers.<local>.rest` with megatron-core's global layer number, and an
    expert's local index with its global one (the second prepended axis)."""
    if not name.startswith(_LAYERS) or not prepended:
        return name
    _, _, rest = name[len(_LAYERS):].partition(".")
    if len(prepended) > 1 and _LOCAL_EXPERT.search(rest):
        rest = _LOCAL_EXPERT.sub(f".local_experts.{prepended[1]}.", rest, count=1)
    return f"{_LAYERS}{prepended[0]}.{rest}"
