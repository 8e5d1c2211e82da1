"""Memory two processes on one host (or one GPU) both map: the colocated method's buffers.

A producer allocates its bucket slots once and describes them in a small picklable
handle; a consumer maps them from the handle once, at connect. Nothing is mapped
per update.

- CPU: a tmpfs file (`/dev/shm`) that is unlinked as soon as it is created, so that
  no name is ever left behind, whoever crashes: the producer keeps it open and
  consumers open it through `/proc/<producer pid>/fd/<fd>`. The memory goes when
  the last process mapping it unmaps it or exits.
- CUDA: memory shared by CUDA IPC (`torch.multiprocessing.reductions`), and
  interprocess events to order the producer's writes before the consumers' reads and
  their reads before the next write, without the host waiting on the device.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass

import torch

from shardsync.runtime.errors import TransferError

SHM_DIR = "/dev/shm"
SHM_PREFIX = "shardsync-"


@dataclass(frozen=True)
class SlotsHandle:
    """What a consumer needs to map a producer's slots: plain data, sent through the store."""

    host: str
    device_type: str
    dtype: str
    numel: int  # elements per slot
    count: int  # slots
    pid: int = 0  # CPU: the producer's process and the descriptor of its unlinked file
    fd: int = -1
    cuda: tuple = ()  # CUDA: the rebuild arguments of the slots' one tensor
    ready_events: tuple[bytes, ...] = ()  # CUDA: the producer's "slot written" event per slot


class Slots:
    """`count` slots of `numel` elements, one allocation: the producer's own, or mapped."""

    def __init__(self, tensor: torch.Tensor, count: int, handle: SlotsHandle, fd: int = -1,
                 ready_events: tuple = ()):
        self.tensor = tensor
        self.count = count
        self.handle = handle
        self._fd = fd  # the producer's descriptor of its unlinked file (CPU), else -1
        self.ready_events = ready_events  # CUDA: recorded by the producer, waited on by consumers
        self._views = tuple(tensor[slot] for slot in range(count))  # cut once, not at every bucket

    def __getitem__(self, slot: int) -> torch.Tensor:
        return self._views[slot]

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def close(self) -> None:
        """Drop this process's mapping (the memory goes when the last one is dropped)."""
        self.tensor = None
        self._views = ()
        self.ready_events = ()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


SLOT_ALIGNMENT = 16  # bytes: the batched copy's vector and word accesses need a bucket to start here


def create_slots(numel: int, count: int, dtype: torch.dtype, device: torch.device) -> Slots:
    """A producer's slots, in memory its consumers on this host or GPU can map: at least
    `numel` elements each, every slot starting on a `SLOT_ALIGNMENT` boundary."""
    element = torch.empty((), dtype=dtype).element_size()
    numel = -(-numel * element // SLOT_ALIGNMENT) * SLOT_ALIGNMENT // element
    if device.type == "cuda":
        return _cuda_slots(numel, count, dtype, device)
    if device.type != "cpu":
        raise TransferError(f"colocated buffers on {device.type}: only CPU shared memory and CUDA IPC are supported")
    return _cpu_slots(numel, count, dtype)


def map_slots(handle: SlotsHandle, device: torch.device, producer: str) -> Slots:
    """Map a producer's slots in this process; refused, naming the producer, where they
    cannot be reached from here (another host, another kind of device)."""
    here = socket.gethostname()
    if handle.host != here:
        raise TransferError(f"colocated: {producer} is on host {handle.host!r} and this process on {here!r}; "
                            f"colocated buffers are shared on one host only (use method 'shard')")
    if handle.device_type != device.type:
        raise TransferError(f"colocated: {producer}'s buffers are {handle.device_type} memory and this endpoint's "
                            f"device is {device.type}: both ends of a colocated transfer use the same kind")
    dtype = getattr(torch, handle.dtype)
    if device.type == "cuda":
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        tensor = rebuild_cuda_tensor(*handle.cuda)
        events = tuple(torch.cuda.Event.from_ipc_handle(tensor.device, h) for h in handle.ready_events)
        return Slots(tensor, handle.count, handle, ready_events=events)
    path = f"/proc/{handle.pid}/fd/{handle.fd}"
    try:
        tensor = torch.from_file(path, shared=True, size=handle.numel * handle.count, dtype=dtype)
    except RuntimeError as exc:
        raise TransferError(f"colocated: cannot map {producer}'s shared buffer ({path}): "
                            f"{str(exc).splitlines()[0]}") from None
    return Slots(tensor.view(handle.count, handle.numel), handle.count, handle)


def interprocess_event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=False, blocking=False, interprocess=True)


def open_event(handle: bytes, device: torch.device) -> torch.cuda.Event:
    return torch.cuda.Event.from_ipc_handle(device, handle)


def _cpu_slots(numel: int, count: int, dtype: torch.dtype) -> Slots:
    element = torch.empty((), dtype=dtype).element_size()
    fd, path = tempfile.mkstemp(dir=SHM_DIR if os.path.isdir(SHM_DIR) else None, prefix=SHM_PREFIX)
    os.unlink(path)  # nameless from the start: nothing in /dev/shm outlives its processes
    nbytes = max(1, numel * count * element)
    try:
        # reserved now, not as pages are first touched: a full /dev/shm is an error here,
        # not a SIGBUS in the middle of an update
        os.posix_fallocate(fd, 0, nbytes)
        tensor = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=numel * count, dtype=dtype)
    except OSError as exc:
        os.close(fd)
        raise TransferError(f"colocated: cannot reserve {nbytes / 2**20:.1f} MiB of shared memory in "
                            f"{os.path.dirname(path)}: {exc.strerror}; give it more room (a container's "
                            f"--shm-size) or use smaller buckets") from None
    except BaseException:
        os.close(fd)
        raise
    handle = SlotsHandle(socket.gethostname(), "cpu", str(dtype).removeprefix("torch."), numel, count,
                         pid=os.getpid(), fd=fd)
    return Slots(tensor.view(count, numel), count, handle, fd=fd)


def _cuda_slots(numel: int, count: int, dtype: torch.dtype, device: torch.device) -> Slots:
    from torch.multiprocessing.reductions import reduce_tensor

    tensor = torch.empty(count, numel, dtype=dtype, device=device)
    _, cuda_args = reduce_tensor(tensor)
    events = tuple(interprocess_event() for _ in range(count))
    handle = SlotsHandle(socket.gethostname(), "cuda", str(dtype).removeprefix("torch."), numel, count,
                         cuda=tuple(cuda_args), ready_events=tuple(bytes(e.ipc_handle()) for e in events))
    return Slots(tensor, count, handle, ready_events=events)
