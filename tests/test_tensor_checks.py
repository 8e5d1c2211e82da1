"""What a trainer rank's tensors are checked for before any byte moves: a NaN or an
Inf anywhere is found and named, on the CPU and on CUDA (where the sums run as
multi-tensor launches), and finite weights pass."""

from __future__ import annotations

import pytest
import torch

from shardsync.runtime.tensor_checks import trainer_findings

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="CUDA: on the GPU machine"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_nonfinite_value_in_any_tensor_is_found_and_named(device, bad):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": (torch.randn(37, 64, generator=generator) * 100).to(dtype).to(device)
               for i, dtype in enumerate([torch.bfloat16, torch.float32, torch.bfloat16])}
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    assert trainer_findings(tensors, shapes, torch.device(device), allow_nonfinite=False) is None
    tensors["w1"][5, 7] = bad
    finding = trainer_findings(tensors, shapes, torch.device(device), allow_nonfinite=False)
    assert finding is not None and finding.startswith("w1: 1 NaN/Inf value(s) of 2368")
    assert trainer_findings(tensors, shapes, torch.device(device), allow_nonfinite=True) is None
