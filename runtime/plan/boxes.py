"""Boxes: rectangles of a tensor as ((start, stop), ...) per dimension.

All the runtime's placement logic is arithmetic on these; no tensor is touched.
"""

from __future__ import annotations

Box = tuple[tuple[int, int], ...]


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes of one tensor, or None."""
    if len(a) != len(b):
        raise ValueError(f"boxes of different rank: {a} and {b}")
    common = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b))
    return common if all(start < stop for start, stop in common) else None


def translate(box: Box, src: Box, dst: Box) -> Box:
    """Where `box`, a part of `src`, lands when `src` is placed at `dst` (same extents)."""
    return tuple((start - s0 + d0, stop - s0 + d0) for (start, stop), (s0, _), (d0, _) in zip(box, src, dst))


def numel(box: Box) -> int:
    count = 1
    for start, stop in box:
        count *= stop - start
    return count


def shape(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def inside(box: Box, tensor_shape: tuple[int, ...]) -> bool:
    return len(box) == len(tensor_shape) and all(0 <= s < e <= n for (s, e), n in zip(box, tensor_shape))


def as_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


def fmt(box: Box) -> str:
    return "[" + ", ".join(f"{start}:{stop}" for start, stop in box) + "]"
