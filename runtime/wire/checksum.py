"""A cheap per-bucket checksum, carried in the bucket's own message (`verify=True`).

Two sums over the bucket's bytes read as integer words (32-bit, or 16-bit when the byte
count is not a multiple of 4), both modulo 2**32: the plain sum catches a changed
value, the sum weighted by position (the word's index plus one) a moved one. Two words
that trade places change it by their difference times their distance, so no distance
is blind, as multiples of the period of a repeating weight would be. One pass, no
extra message: the sender writes them into a tail of TAIL_BYTES after the packed data
and the receiver recomputes them over what arrived.
Sums modulo 2**32 cost one multiply-add a word on a GPU (the batched copy kernel
computes them while it copies, `wire.batched_copy`) and come out the same on every
device, so a CPU sender and a GPU receiver agree.
"""

from __future__ import annotations

import torch

TAIL_BYTES = 16  # the two sums, each as an int64 in [0, 2**32)
CHUNK = 1 << 20  # words summed at a time on the host
MODULUS = 1 << 32

_weights: dict[torch.device, torch.Tensor] = {}


def tail_elements(dtype: torch.dtype) -> int:
    """Buffer elements of `dtype` the tail takes."""
    return TAIL_BYTES // torch.empty((), dtype=dtype).element_size()


def compute(data: torch.Tensor) -> torch.Tensor:
    """The two sums over `data` (a flat buffer slice), as an int64 tensor of 2."""
    raw = data.view(torch.uint8)
    words = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw.view(torch.int16)
    plain = words.sum(dtype=torch.int64)
    return torch.stack([plain, _weighted(words, _weights_for(words.device))]) % MODULUS


def write(buffer: torch.Tensor, numel: int) -> torch.Tensor:
    """Checksum `buffer[:numel]` into the tail after it; returns the slice to send. The
    tail is written as bytes: after an odd count of 2-byte elements it is not aligned
    for int64."""
    _tail(buffer, numel).copy_(compute(buffer[:numel]).view(torch.uint8))
    return buffer[:numel + tail_elements(buffer.dtype)]


def check(buffer: torch.Tensor, numel: int) -> tuple[list[int], list[int]] | None:
    """None when `buffer[:numel]` matches the tail, else (sent, computed)."""
    written = sent(buffer, numel)
    computed = compute(buffer[:numel])
    if torch.equal(written, computed):
        return None
    return written.tolist(), computed.tolist()


def sent(buffer: torch.Tensor, numel: int) -> torch.Tensor:
    """The sums the sender wrote after `buffer[:numel]`, copied out of the buffer."""
    return _tail(buffer, numel).clone().view(torch.int64)


def matches(buffer: torch.Tensor, numel: int, sums: torch.Tensor) -> bool:
    """Whether `buffer[:numel]` still sums to `sums` (what `sent` read earlier): a
    buffer shared with its writer can change after its tail was read."""
    return torch.equal(compute(buffer[:numel]), sums)


def _tail(buffer: torch.Tensor, numel: int) -> torch.Tensor:
    return buffer[numel:numel + tail_elements(buffer.dtype)].view(torch.uint8)


def _weights_for(device: torch.device) -> torch.Tensor:
    """One weight vector per device (8 MiB), sliced for shorter buckets."""
    if device not in _weights:
        _weights[device] = torch.arange(1, CHUNK + 1, device=device, dtype=torch.int64)
    return _weights[device]


def _weighted(words: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum, CHUNK words at a time (bounded temporaries): the chunk starting
    at word `start` weighs its words `start` more each than the first chunk does, so it
    adds its sum with the first chunk's weights plus `start` times its plain sum. int64
    wraps modulo 2**64, which keeps the sum right modulo 2**32."""
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), CHUNK):
        chunk = words[start:start + CHUNK].to(torch.int64)
        total += (chunk * weights[:chunk.numel()]).sum() + start * chunk.sum()
    return total
