"""One copy kernel per bucket on CUDA: a batched gather (pack) or scatter (unpack) that
walks every piece of the bucket, with the bucket's checksum computed on the way.

A bucket holds 15-60 pieces of a few MB each; one copy kernel per piece cannot keep
the device busy (each is too short to reach the HBM rate, and they run one after
another). Here every piece is cut into tiles of TILE_ROWS x TILE_COLS elements, and
one launch runs every tile of the bucket: a program loads its tile's piece
descriptor, copies the tile (casting to the destination dtype) and adds its share of
the checksum. Descriptors are plain int64 tables built once per bucket and set of
tensor addresses, and kept on the device.

A piece is a box of a strided tensor on one side and a contiguous run of the bucket
on the other. Its box is reduced to rows x cols with a row and a column stride
(extent-1 dimensions dropped, contiguous dimensions merged, any further leading
dimensions split into pieces of their own); a piece contiguous in its tensor is
copied as rows of TILE_COLS. So row-parallel column blocks (M:N) and stacked experts
take the same kernel as whole rows.

The checksum is `wire.checksum`'s, element by element: the bucket read as 32-bit
words (16-bit when its byte count is not a multiple of 4), a word's value and its
position weight, summed with int64 wrap-around, so a CUDA sum checks equal on the
CPU and the other way round. A 16-bit element is the low or the high half of its
word: its contribution is its unsigned bits, or its signed bits times 2**16.

Triton is imported only here, and this module only on CUDA: the CPU path and CI
never need it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from shardsync.runtime.plan import boxes
from shardsync.runtime.wire import checksum

TILE_ROWS = 8
TILE_COLS = 512
_FIELDS = 7  # per piece: tensor address (bytes), rows, cols, row stride, col stride, bucket offset, elements
_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _checksum_terms(values, position, mask, WORDS: tl.constexpr, CHUNK: tl.constexpr, PERIOD: tl.constexpr):
    """Each element's share of the plain and the position-weighted sum (int64)."""
    if values.dtype.primitive_bitwidth == 32:
        word = values.to(tl.int32, bitcast=True).to(tl.int64)
        index = position
    else:
        half = values.to(tl.int16, bitcast=True).to(tl.int64)
        if WORDS == 4:
            word = tl.where(position % 2 == 0, half & 0xFFFF, half * 65536)
            index = position // 2
        else:
            word = half
            index = position
    weight = (index % CHUNK) % PERIOD + 1
    weight = weight * (index // CHUNK + 1)
    word = tl.where(mask, word, 0)
    return tl.sum(tl.sum(word, axis=1), axis=0), tl.sum(tl.sum(word * weight, axis=1), axis=0)


@triton.jit
def _tile_copy(pieces, tiles, bucket, partials, TENSOR_DTYPE: tl.constexpr, TO_BUCKET: tl.constexpr,
               CHECKSUM: tl.constexpr, WORDS: tl.constexpr, CHUNK: tl.constexpr, PERIOD: tl.constexpr,
               ROWS: tl.constexpr, COLS: tl.constexpr):
    tile = tl.program_id(0)
    piece = tl.load(tiles + tile * 3)
    row0 = tl.load(tiles + tile * 3 + 1)
    col0 = tl.load(tiles + tile * 3 + 2)
    desc = pieces + piece * 7
    address = tl.load(desc)
    rows = tl.load(desc + 1)
    cols = tl.load(desc + 2)
    row_stride = tl.load(desc + 3)
    col_stride = tl.load(desc + 4)
    offset = tl.load(desc + 5)
    count = tl.load(desc + 6)
    r = row0 + tl.arange(0, ROWS)[:, None]
    c = col0 + tl.arange(0, COLS)[None, :]
    linear = r * cols + c
    mask = (r < rows) & (c < cols) & (linear < count)
    tensor = address.to(tl.pointer_type(TENSOR_DTYPE)) + r * row_stride + c * col_stride
    position = offset + linear
    if TO_BUCKET:
        values = tl.load(tensor, mask=mask)
        if values.dtype.primitive_bitwidth > bucket.dtype.element_ty.primitive_bitwidth:
            values = values.to(bucket.dtype.element_ty, fp_downcast_rounding="rtne")  # as torch's copy_ rounds
        else:
            values = values.to(bucket.dtype.element_ty)
        tl.store(bucket + position, values, mask=mask)
    else:
        values = tl.load(bucket + position, mask=mask)
        tl.store(tensor, values.to(TENSOR_DTYPE), mask=mask)
    if CHECKSUM:
        plain, weighted = _checksum_terms(values, position, mask, WORDS, CHUNK, PERIOD)
        tl.store(partials + tile * 2, plain)
        tl.store(partials + tile * 2 + 1, weighted)


@dataclass
class Launch:
    """One bucket's tiles for the tensors of one dtype, on the device."""

    dtype: torch.dtype
    pieces: torch.Tensor  # int64 [pieces, _FIELDS]
    tiles: torch.Tensor  # int64 [tiles, 3]: piece, first row, first column


class BucketKernel:
    """The descriptors of one bucket against one set of tensors, and its launches."""

    def __init__(self, entries: list[tuple[torch.Tensor, boxes.Box, int]], bucket_numel: int,
                 device: torch.device):
        """`entries`: (tensor, box of it, offset in the bucket), in bucket order."""
        by_dtype: dict[torch.dtype, list[tuple]] = {}
        for tensor, box, offset in entries:
            if tensor.dtype not in _TRITON_DTYPES:
                raise TypeError(f"batched copy: dtype {tensor.dtype} is not one of {list(_TRITON_DTYPES)}")
            by_dtype.setdefault(tensor.dtype, []).extend(_pieces(tensor, box, offset))
        self.launches = [_launch(dtype, pieces, device) for dtype, pieces in by_dtype.items()]
        self.tiles = sum(len(launch.tiles) for launch in self.launches)
        self.numel = bucket_numel
        self.partials = torch.zeros(self.tiles, 2, dtype=torch.int64, device=device)

    def run(self, bucket: torch.Tensor, to_bucket: bool, sums: bool) -> torch.Tensor | None:
        """Copy every piece (into the bucket, or out of it); with `sums`, return the
        bucket's two checksum sums (a device tensor, nothing waited for)."""
        words = 4 if (self.numel * bucket.element_size()) % 4 == 0 else 2
        done = 0
        for launch in self.launches:
            count = len(launch.tiles)
            _tile_copy[(count,)](launch.pieces, launch.tiles, bucket, self.partials[done:],
                                 TENSOR_DTYPE=_TRITON_DTYPES[launch.dtype], TO_BUCKET=to_bucket, CHECKSUM=sums,
                                 WORDS=words, CHUNK=checksum.CHUNK, PERIOD=checksum.WEIGHT_PERIOD,
                                 ROWS=TILE_ROWS, COLS=TILE_COLS)
            done += count
        return self.partials.sum(dim=0) if sums else None


def supported(dtype: torch.dtype) -> bool:
    return dtype in _TRITON_DTYPES


def _pieces(tensor: torch.Tensor, box: boxes.Box, offset: int) -> list[tuple[int, ...]]:
    """A box of `tensor` as 2-D pieces (address, rows, cols, row stride, col stride,
    bucket offset, elements), in the bucket's (row-major) order."""
    element = tensor.element_size()
    start = tensor.storage_offset() + sum(lo * stride for (lo, _), stride in zip(box, tensor.stride()))
    dims = [(hi - lo, stride) for (lo, hi), stride in zip(box, tensor.stride()) if hi - lo > 1]
    merged: list[list[int]] = []
    for extent, stride in dims:  # an outer dimension that steps over a whole inner one merges into it
        if merged and merged[-1][1] == extent * stride:
            merged[-1] = [merged[-1][0] * extent, stride]
        else:
            merged.append([extent, stride])
    if not merged:
        merged = [[1, 1]]
    outer, inner = merged[:-2], merged[-2:]
    rows, row_stride = inner[0] if len(inner) == 2 else (1, 0)
    cols, col_stride = inner[-1]
    if rows == 1 and col_stride == 1:  # a contiguous run: copied as rows of TILE_COLS
        rows, cols, row_stride = math.ceil(cols / TILE_COLS), TILE_COLS, TILE_COLS
        count = inner[-1][0]
    else:
        count = rows * cols
    pieces = []
    base = tensor.data_ptr() - tensor.storage_offset() * element  # the storage's first element
    for index in range(math.prod(extent for extent, _ in outer)):
        skip, rest = 0, index
        for extent, stride in reversed(outer):
            rest, here = divmod(rest, extent)
            skip += here * stride
        pieces.append((base + (start + skip) * element, rows, cols, row_stride, col_stride,
                       offset + index * count, count))
    return pieces


def _launch(dtype: torch.dtype, pieces: list[tuple[int, ...]], device: torch.device) -> Launch:
    """The pieces' table and every tile of them (tensor ops: a 1 GiB bucket is 10**5 tiles)."""
    table = torch.tensor(pieces, dtype=torch.int64)
    across = (table[:, 2] + TILE_COLS - 1) // TILE_COLS  # tiles along a row of the piece
    per_piece = (table[:, 1] + TILE_ROWS - 1) // TILE_ROWS * across
    piece = torch.repeat_interleave(torch.arange(len(pieces)), per_piece)
    within = torch.arange(len(piece)) - torch.repeat_interleave(per_piece.cumsum(0) - per_piece, per_piece)
    tiles = torch.stack([piece, within // across[piece] * TILE_ROWS, within % across[piece] * TILE_COLS], dim=1)
    return Launch(dtype, table.to(device), tiles.contiguous().to(device))
