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
    """Where `box`, a part of `src`, lands when `src` is placed at `dst` (same extents).

    `dst` may have more dimensions than `src`, leading ones of extent 1: a 2-D expert
    matrix placed in its slot of a stacked [E, ...] tensor keeps that slot.
    """
    extra = len(dst) - len(src)
    if extra < 0 or any(stop - start != 1 for start, stop in dst[:extra]):
        raise ValueError(f"cannot place {fmt(src)} at {fmt(dst)}: extra leading dimensions must have extent 1")
    moved = tuple((start - s0 + d0, stop - s0 + d0) for (start, stop), (s0, _), (d0, _) in zip(box, src, dst[extra:]))
    return dst[:extra] + moved


def numel(box: Box) -> int:
    count = 1
    for start, stop in box:
        count *= stop - start
    return count


def shape(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def same_extent(a: Box, b: Box) -> bool:
    """Equal shapes once leading extent-1 dimensions (an expert's slot) are dropped."""
    def core(box: Box) -> tuple[int, ...]:
        extents = list(shape(box))
        while len(extents) > 1 and extents[0] == 1:
            extents.pop(0)
        return tuple(extents)
    return core(a) == core(b)


def inside(box: Box, tensor_shape: tuple[int, ...]) -> bool:
    return len(box) == len(tensor_shape) and all(0 <= s < e <= n for (s, e), n in zip(box, tensor_shape))


def as_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


def fmt(box: Box) -> str:
    return "[" + ", ".join(f"{start}:{stop}" for start, stop in box) + "]"
