"""What a trainer rank's tensors are checked for before any byte moves: a NaN or an
Inf anywhere is found and named, on the CPU and on CUDA (where one kernel flags them),
and finite weights pass; on CUDA a check the device does not get to in time is a
finding, reached within the timeout."""

from __future__ import annotations

import time

import pytest
import torch

from shardsync.runtime.tensor_checks import (FiniteCheck, nonfinite_finding, trainer_names_finding,
                                             trainer_tensor_findings)
from tests.triton_interpreter import compiled_variants

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="CUDA: on the GPU machine"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_nonfinite_value_in_any_tensor_is_found_and_named(device, bad):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": (torch.randn(37, 64, generator=generator) * 100).to(dtype).to(device)
               for i, dtype in enumerate([torch.bfloat16, torch.float32, torch.bfloat16])}
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    assert _named_and_placed(tensors, shapes, device) is None
    assert _nonfinite(tensors) is None
    tensors["w1"][5, 7] = bad
    assert _named_and_placed(tensors, shapes, device) is None  # names, shapes, dtypes, device only
    finding = _nonfinite(tensors)
    assert finding is not None and finding.startswith("w1: 1 NaN/Inf value(s) of 2368")


def _named_and_placed(tensors: dict, shapes: dict, device: str) -> str | None:
    """The checks a sender runs before NaN/Inf: names, then shapes, dtypes and device."""
    return trainer_names_finding(tensors, shapes) or trainer_tensor_findings(tensors, shapes, torch.device(device),
                                                                             shapes)


def _nonfinite(tensors: dict, check: FiniteCheck | None = None) -> str | None:
    """What a sender that packs as its buckets go finds: one check over the tensors."""
    check = check or FiniteCheck()
    return nonfinite_finding(tensors, {name: tuple(t.shape) for name, t in tensors.items()},
                             lambda: check(list(tensors.values())))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: on the GPU machine")
def test_a_check_the_device_does_not_get_to_within_the_timeout_is_a_finding():
    """The check is queued behind this rank's stream, as after a failed colocated update
    an engine's reads may be: the host waits a bounded time, then the rank refuses."""
    tensors = {"w": torch.randn(64, 64, device="cuda")}
    check = FiniteCheck(timeout=0.5)
    assert _nonfinite(tensors, check) is None  # its kernel loaded
    _refused_in_time_behind_a_busy_stream(tensors, check)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: on the GPU machine")
def test_a_check_of_new_tensors_behind_a_busy_stream_loads_nothing_and_waits_only_its_timeout():
    """Loading the pass's module, or uploading a table of tiles from pageable memory, would
    wait for the device: once a trainer is connected (`FiniteCheck.load`) the check of
    tensors it never saw, of every dtype, queued behind 4 s of other work, still ends
    within its timeout, and compiles nothing new."""
    from shardsync.runtime import nonfinite

    nonfinite._flag_nonfinite.device_caches.clear()  # forget what earlier tests loaded
    check = FiniteCheck(timeout=0.5)
    check.load(torch.device("cuda"))
    loaded = compiled_variants(nonfinite._flag_nonfinite)
    tensors = {f"w{i}": torch.randn(65, 33, device="cuda").to(dtype)[1:]  # at an offset of one row
               for i, dtype in enumerate([torch.bfloat16, torch.float32, torch.float16])}
    _refused_in_time_behind_a_busy_stream(tensors, check)
    assert compiled_variants(nonfinite._flag_nonfinite) == loaded


def _refused_in_time_behind_a_busy_stream(tensors: dict, check: FiniteCheck) -> None:
    """Queued behind 4 s of other work, a check with a 0.5 s timeout is a finding within
    2 s; once the device is through, the same tensors pass."""
    torch.cuda._sleep(int(4 * 2e9))  # cycles: at least 4 s of other work at the H200's clocks
    started = time.monotonic()
    finding = _nonfinite(tensors, check)
    waited = time.monotonic() - started
    torch.cuda.synchronize()
    assert finding is not None and finding.startswith("the NaN/Inf check had not run on the device after 0.5s"), finding
    assert waited < 2.0, f"waited {waited:.1f}s for a check with a 0.5s timeout"
    assert _nonfinite(tensors, check) is None


def test_reading_the_flag_of_packs_lowers_it_for_the_next_update():
    """A trainer that packs ahead on the CPU reads the flag its packs raised, and the read
    leaves it lowered for the next update's packs. (On CUDA flags only grow, to the
    update's number: test_batched_copy and the gated faults in test_faults.)"""
    check = FiniteCheck(timeout=10.0)
    flag = torch.zeros(1, dtype=torch.int32)
    assert check.read(flag)
    flag.fill_(1)  # what a pack that found a NaN leaves
    assert not check.read(flag)
    assert flag.item() == 0 and check.read(flag)
