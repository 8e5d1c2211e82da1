"""What an endpoint checks in the tensors it is handed, before any byte moves.

Each finding is one sentence naming the tensor; the endpoint turns it into its vote
(so every peer refuses the update too) and raises it as a TensorError.
"""

from __future__ import annotations

from typing import Callable, Collection, Iterable, Mapping

import torch

from shardsync.runtime.device_wait import queued_work_not_run, stream_done_within


def as_named(tensors) -> tuple[dict[str, torch.Tensor], str | None]:
    """A mapping, or (name, tensor) pairs in which no name may repeat."""
    if isinstance(tensors, Mapping):
        return dict(tensors), None
    named: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name in named:
            return named, f"{name}: given twice"
        named[name] = tensor
    return named, None


def trainer_names_finding(given: Mapping[str, torch.Tensor], shapes: dict[str, tuple]) -> str | None:
    """A tensor missing from a trainer rank's, or one it should not hand over, or None:
    a look at the names alone, which touches no tensor."""
    return _names("trainer", given, shapes)


def trainer_tensor_findings(given: Mapping[str, torch.Tensor], shapes: dict[str, tuple], device: torch.device,
                            names: Collection[str]) -> str | None:
    """The first problem with the shape, dtype or device of the trainer's tensors of
    `names` (every one in `given`), or None. Every update runs it before a byte of those
    tensors is packed, so each look at a tensor is the cheapest that answers."""
    problem = _shapes(given, shapes, names)
    if problem:
        return problem
    placed = _placed_on(device)
    for name in names:
        tensor = given[name]
        if not tensor.is_floating_point():
            return f"{name}: dtype {_dtype(tensor)} is not a floating-point weight"
        if not placed(tensor):
            return f"{name}: on {tensor.device}, the sender sends from {device}"
    return None


def _placed_on(device: torch.device):
    """Whether a tensor is on `device`'s kind of device, asked without building a
    `torch.device` for each tensor (the attribute for the usual kinds)."""
    if device.type == "cuda":
        return lambda tensor: tensor.is_cuda
    if device.type == "cpu":
        return lambda tensor: tensor.is_cpu
    return lambda tensor: tensor.device.type == device.type


def nonfinite_finding(given: Mapping[str, torch.Tensor], shapes: dict[str, tuple],
                      all_finite: Callable[[], bool]) -> str | None:
    """The first tensor holding NaN or Inf, or None. `all_finite`: the fast answer for
    all of them (a `FiniteCheck` of the tensors, or its `read` of what packs flagged),
    which may raise TimeoutError: a check the device did not get to in time is a
    finding too, so no byte moves on an update nobody could check. Only where it
    found something are the bad values looked for, tensor by tensor."""
    try:
        if all_finite():
            return None
    except TimeoutError as exc:
        return str(exc)
    for name in shapes:
        bad = int((~torch.isfinite(given[name])).sum())
        if bad:
            return (f"{name}: {bad} NaN/Inf value(s) of {given[name].numel()} (pass allow_nonfinite=True to send "
                    f"them anyway)")
    return None


def engine_findings(names: Iterable[str], shape_of, dtype_of, shapes: dict[str, tuple],
                    dtype: torch.dtype) -> str | None:
    """The first problem with an engine rank's write targets, or None."""
    given = {name: _Shape(shape_of(name)) for name in names}
    problem = _names_and_shapes("engine", given, shapes)
    if problem:
        return problem
    for name in shapes:
        found = dtype_of(name)
        if found is not None and found != dtype:
            return f"{name}: dtype {_name(found)}, the update carries {_name(dtype)}"
    return None


class FiniteCheck:
    """Whether every element of a rank's tensors is finite: one pass over them, no
    temporary the size of one, one wait for the device in all (not one a tensor).

    - On CUDA, one launch per dtype reads every tensor and flags exponent bits
      (`runtime/nonfinite`: Qwen3-4B's half on an H200 in 1.24 ms); where Triton is
      missing or a tensor is not contiguous, magnitudes are summed in a few
      multi-tensor launches instead (2.30 ms there; one launch a tensor took 6.7).
    - On the CPU, a NaN or Inf makes a tensor's float32 sum non-finite (weights are far
      too small for a finite sum to overflow; where one did, the exact check below
      clears it).
    Only where something was found are the bad values looked for, tensor by tensor.

    On CUDA the check is queued behind whatever this rank's stream holds, which, on a
    GPU shared with engines, may wait on another process (after a failed update, an
    engine's reads): the host waits for it `timeout` seconds at most, then raises
    TimeoutError saying so."""

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self._kernel = None  # CUDA: the flagging pass, made at first use (None: not tried yet)

    def __call__(self, tensors: list[torch.Tensor]) -> bool:
        if not tensors:
            return True
        if tensors[0].is_cuda:
            kernel = self._cuda_kernel()
            if kernel and kernel.handles(tensors):
                found = kernel.flag_nonfinite(tensors)
            else:
                found = ~torch.isfinite(torch.stack(torch._foreach_norm(tensors, 1, dtype=torch.float32))).all()
            self._wait_for_device(tensors[0].device, "the NaN/Inf check")
            if not bool(found):
                return True
        elif bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in tensors])).all()):
            return True
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def read(self, flag: torch.Tensor) -> bool:
        """Whether `flag` (int32 [1], raised by packs on the CPU where they packed a NaN or
        Inf) says every element was finite, leaving it lowered for the next update's packs.
        (On CUDA the engines' copies are gated by the packs' flags on the device, and the
        trainer reads its own after the vote: `wire.device_gate`.)"""
        raised = bool(flag.item())
        flag.zero_()
        return not raised

    def load(self, device: torch.device) -> None:
        """On CUDA, load the flagging pass for every dtype now (`nonfinite.load_kernels`),
        so that the first update's check loads no module."""
        if device.type == "cuda" and self._cuda_kernel():
            from shardsync.runtime.nonfinite import load_kernels

            with torch.cuda.device(device):
                load_kernels(device)

    def _wait_for_device(self, device: torch.device, what: str) -> None:
        if not stream_done_within(torch.cuda.current_stream(device), self.timeout):
            raise TimeoutError(queued_work_not_run(what, self.timeout))

    def _cuda_kernel(self):
        if self._kernel is None:
            try:
                from shardsync.runtime.nonfinite import NonfiniteCheck
            except ImportError:  # no Triton: the multi-tensor sums
                self._kernel = False
            else:
                self._kernel = NonfiniteCheck()
        return self._kernel


def _names_and_shapes(kind: str, given: Mapping, shapes: dict[str, tuple]) -> str | None:
    return _names(kind, given, shapes) or _shapes(given, shapes, shapes)


def _names(kind: str, given: Mapping, shapes: dict[str, tuple]) -> str | None:
    if given.keys() != shapes.keys():
        missing = [n for n in shapes if n not in given]
        extra = [n for n in given if n not in shapes]
        if missing:
            return f"{missing[0]}: missing from the {kind} tensors ({len(missing)} missing{_and_extra(extra)})"
        return f"{extra[0]}: not a {kind} tensor of this plan ({len(extra)} unexpected)"
    return None


def _shapes(given: Mapping, shapes: dict[str, tuple], names: Collection[str]) -> str | None:
    for name in names:
        shape, found = shapes[name], given[name].shape
        if found != shape and tuple(found) != tuple(shape):  # (a torch.Size equals its tuple: the usual look)
            return f"{name}: expected shape {tuple(shape)}, got {tuple(found)}"
    return None


def _and_extra(extra: list[str]) -> str:
    return f", {len(extra)} unexpected, first {extra[0]}" if extra else ""


def _dtype(tensor: torch.Tensor) -> str:
    return _name(tensor.dtype)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Shape:
    """Stands in for a tensor where only the shape is checked."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
