"""Local tensors made from canonical (HF) tensors by a shard table.

Used where a rank's tensors must be produced from a checkpoint-like source: the
demo's random trainers, and checks that compare engine tensors with what the
tables say they should hold. Padding rows are zero, as vLLM leaves them.
"""

from __future__ import annotations

from typing import Mapping

import torch

from shardsync.runtime.plan import boxes


def materialize(table, hf_tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    result = {}
    for local in table:
        any_source = next(iter(hf_tensors.values()))
        tensor = torch.zeros(local.shape, dtype=dtype or any_source.dtype, device=any_source.device)
        for piece in local.pieces:
            tensor[boxes.as_slices(piece.local_box)] = hf_tensors[piece.hf_name][boxes.as_slices(piece.hf_box)]
        result[local.name] = tensor
    return result


def random_hf_tensors(shapes: Mapping[str, tuple[int, ...]], seed: int,
                      device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Random weights by seed; the same seed gives the same tensors on the same kind of device."""
    generator = torch.Generator(device).manual_seed(seed)
    return {name: torch.randn(shape, generator=generator, device=device) * 0.02 for name, shape in shapes.items()}
