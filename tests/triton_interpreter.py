"""How a Triton kernel's tests run on a machine without a GPU: the same test file, in a
child process with Triton's interpreter on (it must be on before Triton is first
imported, so not in this process). On the GPU machine they run for real.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # this is the child
DEVICE = torch.device("cuda" if CUDA else "cpu")
runner_only = pytest.mark.skipif(CUDA or INTERPRETED,
                                 reason="the kernel runs for real here (GPU) or this is the child")


def needs_kernel(runner: str):
    """Marks a test that needs the kernel: skipped, naming `runner`, where it runs in the child instead."""
    return pytest.mark.skipif(not (CUDA or INTERPRETED),
                              reason=f"no GPU: runs in a child process under Triton's interpreter (see {runner})")


def run_under_interpreter(test_file: str, expected: str) -> None:
    """Run `test_file` in a child with the interpreter on; it must pass with the summary
    `expected` ("N passed, M skipped": none skipped but the runner and GPU-only tests)."""
    result = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", "-rs"],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert expected in result.stdout, result.stdout[-2000:]


def compiled_variants(jitted) -> set:
    """A Triton kernel's compiled variants, on every device (Triton's cache, keyed by the
    constants and the specialization of the arguments): what a test compares before and
    after launches that must load nothing new."""
    return {key for caches in jitted.device_caches.values() for key in caches[0]}
