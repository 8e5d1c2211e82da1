"""The flagging pass of the NaN/Inf check on CUDA (`runtime/nonfinite.py`).

Invariant, over drawn sets of tensors (hypothesis: bf16, fp16 and fp32, sizes from
empty to a few tiles and ragged, views that start off 16-byte alignment): the pass
flags a set exactly when some element of it is NaN, +Inf or -Inf, wherever that
element lies, and flags no finite value, the largest included. On CUDA (the GPU
machine) the real kernel runs; here, on the CPU, Triton's interpreter runs the same
kernel in a child process, and without Triton the module is skipped, visibly.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.triton_interpreter import CUDA, DEVICE, needs_kernel, run_under_interpreter, runner_only

pytest.importorskip("triton", reason="Triton is installed by `make` (requirements/lock.txt) and on the GPU machine")

EXAMPLES = 60 if CUDA else 12
runs_here = needs_kernel("test_the_pass_runs_under_the_interpreter")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BAD = (float("nan"), float("inf"), float("-inf"))


@pytest.fixture(scope="module")
def nonfinite():
    return importlib.import_module("shardsync.runtime.nonfinite")


@runner_only
def test_the_pass_runs_under_the_interpreter():
    """On a machine without a GPU: this file's tests, in a child process with Triton's
    interpreter on, must pass (none of them skipped but the runner itself)."""
    run_under_interpreter(__file__, "2 passed, 1 skipped")


@st.composite
def tensor_sets(draw):
    """(tensors, where a bad value was put or None): each tensor is a view of its own
    base, starting 0 or a few elements in (so not always 16-byte aligned)."""
    tile = 8192
    tensors = []
    for _ in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(DTYPES))
        numel = draw(st.sampled_from([0, 1, 7, tile - 1, tile, tile + 3, 2 * tile + 129]))
        skip = draw(st.integers(0, 3))
        seed = draw(st.integers(0, 2**16))
        base = torch.randn(numel + skip, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
        tensors.append(base[skip:])
    bad = None
    holders = [i for i, t in enumerate(tensors) if t.numel()]
    if holders and draw(st.booleans()):
        which = draw(st.sampled_from(holders))
        bad = (which, draw(st.integers(0, tensors[which].numel() - 1)), draw(st.sampled_from(BAD)))
    return tensors, bad


@runs_here
@settings(max_examples=EXAMPLES, deadline=None)
@given(drawn=tensor_sets())
def test_the_pass_flags_a_set_exactly_when_it_holds_a_nan_or_inf(nonfinite, drawn):
    tensors, bad = drawn
    check = nonfinite.NonfiniteCheck()
    assert check.handles(tensors)
    assert not check.any_nonfinite(tensors)
    if bad is not None:
        which, index, value = bad
        tensors[which][index] = value
        assert check.any_nonfinite(tensors), f"{value} at element {index} of tensor {which} was not flagged"
        tensors[which][index] = 0.0
        assert not check.any_nonfinite(tensors)  # the same tables, read again


@runs_here
def test_the_largest_finite_values_pass_and_a_new_set_of_tensors_is_read_from_its_own_addresses(nonfinite):
    check = nonfinite.NonfiniteCheck()
    extremes = [torch.tensor([torch.finfo(d).max, -torch.finfo(d).max, torch.finfo(d).tiny, -0.0], dtype=d,
                             device=DEVICE) for d in DTYPES]
    assert not check.any_nonfinite(extremes)
    others = [torch.zeros(100, dtype=torch.bfloat16, device=DEVICE)]
    others[0][99] = float("inf")
    assert check.any_nonfinite(others)  # not the first set's tables
    assert not check.any_nonfinite(extremes)
    assert not check.any_nonfinite([])
    assert not check.handles([torch.zeros(4, 4, device=DEVICE).t()])  # not contiguous: summed instead
