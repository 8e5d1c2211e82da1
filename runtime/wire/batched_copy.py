"""One copy kernel per bucket on CUDA: a batched gather (pack) or scatter (unpack) that
walks every piece of the bucket, with the bucket's checksum computed on the way.

A bucket holds 15-60 pieces of a few MB each; one copy kernel per piece cannot keep
the device busy (each is too short to reach the HBM rate, and they run one after
another). Here every piece is cut into tiles of a few thousand elements (`TILES`), and
one launch runs every tile of the bucket: a program loads its tile's piece
descriptor, copies the tile (casting to the destination dtype) and, with the
checksum, adds its share to running sums it reduces once at the end; the last
program to finish writes the bucket's checksum into its tail (packing) or reads the
sender's from there (unpacking). Descriptors are plain int64 tables built once per
bucket and set of tensor addresses, and kept on the device.

A piece is a box of a tensor whose rows are contiguous on one side and a contiguous run
of the bucket on the other. Its box is reduced to rows x cols with a row stride
(extent-1 dimensions dropped, contiguous dimensions merged, any further leading
dimensions split into pieces of their own); a piece contiguous in its tensor is
copied as rows of a tile's width. So row-parallel column blocks (M:N) and stacked
experts take the same kernel as whole rows; rows aligned to 16 bytes on both sides
(most) are copied with vector loads and stores, in a launch of their own, and where
nothing is cast, as 32-bit words: two 16-bit elements a lane halve the index and
checksum arithmetic a byte takes.

The checksum is `wire.checksum`'s, element by element: the bucket read as 32-bit
words (16-bit when its byte count is not a multiple of 4), each word and its position
weight, summed modulo 2**32 in int32 arithmetic (one multiply-add an element), so a
CUDA sum checks equal on the CPU and the other way round. A 16-bit element is the low
or the high half of its word: its contribution is its bits, or its bits shifted up 16.

A pack can also raise a NaN/Inf flag on the way (`flag`, to a `stamp`: flags only
grow): an element whose exponent bits are all ones, read from the trainer's tensor
before any cast, as `runtime.nonfinite` reads them. A trainer that packs its whole
update before the vote (`pack_ahead`) then needs no pass of its own over its tensors
to refuse one that holds a NaN or Inf, and an unpack can read a gate first (`gate`,
`wire.device_gate`): closed, it writes nothing.

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

# (rows, columns, warps) of a tile, plain and with the checksum (whose running sums
# take registers): tuned on an H200 (bench/RESULTS.md); one program a tile with the
# checksum, reducing its sums each time, measured 0.60-0.76 of the copy rate against
# 0.86-0.91 for these
TILES = {False: (8, 512, 4), True: (4, 512, 8)}
_FIELDS = 6  # per piece: tensor address (bytes), rows, cols, row stride, bucket offset, elements
_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_EXPONENT_BITS = {torch.float32: 0x7F800000, torch.bfloat16: 0x7F80, torch.float16: 0x7C00}  # all ones: NaN or Inf
DTYPES = tuple(_TRITON_DTYPES)  # what the kernel copies, on either side


@triton.jit
def _checksum_words(values, position, WORDS: tl.constexpr):
    """Each element's word and the word's index (int32, wrapping modulo 2**32). Masked
    lanes were loaded as zeros: their words add nothing."""
    if values.dtype.primitive_bitwidth == 32:
        word = values.to(tl.int32, bitcast=True)
        index = position
    else:
        half = values.to(tl.int16, bitcast=True).to(tl.int32)
        if WORDS == 4:  # the low or the high half of its 32-bit word
            word = tl.where((position & 1) == 0, half & 0xFFFF, (half & 0xFFFF) << 16)
            index = position >> 1
        else:
            word = half
            index = position
    return word, index.to(tl.int32)


@triton.jit
def _nonfinite(values, EXPONENT: tl.constexpr):
    """1 where an element's exponent bits are all ones. `values`: a tensor's elements as
    loaded, or, copied as words, 32-bit words of two 16-bit elements (a mask below
    2**16) or of one float32."""
    if values.dtype.primitive_bitwidth == 32:
        bits = values.to(tl.int32, bitcast=True)
        found = (bits & EXPONENT) == EXPONENT
        if EXPONENT < 0x10000:  # two 16-bit elements a word: the high one too
            found = found | (((bits >> 16) & EXPONENT) == EXPONENT)
    else:
        bits = values.to(tl.int16, bitcast=True).to(tl.int32)
        found = (bits & EXPONENT) == EXPONENT
    return found.to(tl.int32)


@triton.jit
def _locate(pieces, piece, row0, col0, TENSOR_DTYPE: tl.constexpr, WIRE_DTYPE: tl.constexpr,
            ALIGNED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A tile's element pointers into its tensor, its elements' positions in the bucket,
    and its mask."""
    desc = pieces + piece * 6  # _FIELDS
    address = tl.load(desc)
    rows = tl.load(desc + 1).to(tl.int32)
    cols = tl.load(desc + 2).to(tl.int32)
    row_stride = tl.load(desc + 3)
    offset = tl.load(desc + 4).to(tl.int32)
    count = tl.load(desc + 5).to(tl.int32)
    r = row0 + tl.arange(0, ROWS)
    c = col0 + tl.arange(0, COLS)
    if ALIGNED:  # every row of the piece starts 16-byte aligned on both sides: vector loads and stores
        row_stride = tl.multiple_of(row_stride, 128 // TENSOR_DTYPE.primitive_bitwidth)
        cols = tl.multiple_of(cols, 128 // WIRE_DTYPE.primitive_bitwidth)
        offset = tl.multiple_of(offset, 128 // WIRE_DTYPE.primitive_bitwidth)
    linear = r[:, None] * cols + c[None, :]
    mask = (r[:, None] < rows) & (c[None, :] < cols) & (linear < count)
    tensor = address.to(tl.pointer_type(TENSOR_DTYPE))
    if ALIGNED:
        tensor = tl.multiple_of(tensor, 16)
    tensor = tensor + (r.to(tl.int64) * row_stride)[:, None] + c[None, :]
    return tensor, offset + linear, mask


# Nothing but the constants picks which compiled variant a launch runs: no argument is
# specialized on its value or alignment (what alignment the copies may assume is the
# ALIGNED constant's), so every variant an endpoint will launch can be loaded before its
# first update (`load_kernels`) rather than at a first launch that may find its stream
# waiting on another process.
_ARGUMENTS = ("pieces", "tiles", "tile_count", "bucket", "scratch", "programs_in_all", "tail", "sums", "flag", "stamp")


@triton.jit(do_not_specialize=_ARGUMENTS)
def _copy_tiles(pieces, tiles, tile_count, bucket, scratch, programs_in_all, tail, sums, flag, stamp,
                TENSOR_DTYPE: tl.constexpr, WIRE_DTYPE: tl.constexpr, TO_BUCKET: tl.constexpr,
                ALIGNED: tl.constexpr, CHECKSUM: tl.constexpr, WORDS: tl.constexpr, NONFINITE: tl.constexpr,
                ROWS: tl.constexpr, COLS: tl.constexpr, GATED: tl.constexpr, LOOPING: tl.constexpr):
    """Without LOOPING, a program copies one tile, straight through. With it (the
    checksum, or a cast), each program copies tiles program, program + programs, ...;
    with the checksum, every thread keeps its own running sums (int32 adds wrap modulo
    2**32, as the checksum does) and the program reduces them once at the end, not once
    a tile, and adds them to the bucket's. The weighted sum is kept as the sum of word
    times index: adding the plain sum to it (the weight is the index plus one) is left to
    the last program, once a bucket instead of once an element. A looping program loads
    its next tile's entry while it copies this one, so that the table's latency is not
    paid before each tile's bytes. The bucket is read as WIRE_DTYPE: its own dtype, or
    int32 for pieces copied as words. With NONFINITE (a pack's: the exponent bits of the
    tensor's elements), `flag` is raised to `stamp` where one of the elements read has
    them all set (a relaxed atomic: whoever reads the flag waits for the whole launch);
    with GATED (an unpack's), `flag` is the gate: nonzero, nothing is written."""
    wire = bucket.to(tl.pointer_type(WIRE_DTYPE))
    if ALIGNED:  # the bucket starts on a 16-byte boundary (`_aligned`)
        wire = tl.multiple_of(wire, 16)
    program = tl.program_id(0)
    if not LOOPING:  # a tile a program, straight through
        entry = tiles + program * 3
        piece, row0, col0 = tl.load(entry), tl.load(entry + 1).to(tl.int32), tl.load(entry + 2).to(tl.int32)
        if GATED:  # closed, nothing is read or written
            gate_open = tl.zeros((ROWS, COLS), dtype=tl.int32) == tl.load(flag)
        else:
            gate_open = tl.full((ROWS, COLS), True, dtype=tl.int1)
        loaded, _, _ = _move_tile(pieces, piece, row0, col0, wire, gate_open, TENSOR_DTYPE, WIRE_DTYPE, TO_BUCKET,
                                  ALIGNED, ROWS, COLS)
        if NONFINITE:
            if tl.max(tl.max(_nonfinite(loaded, NONFINITE), axis=1), axis=0) > 0:
                tl.atomic_max(flag, stamp, sem="relaxed")
    else:
        programs = tl.num_programs(0)
        if CHECKSUM:
            plain = tl.zeros((ROWS, COLS), dtype=tl.int32)
            weighted = tl.zeros((ROWS, COLS), dtype=tl.int32)
        if NONFINITE:
            found = tl.zeros((ROWS, COLS), dtype=tl.int32)
        entry = tiles + tl.minimum(program, tile_count - 1) * 3
        piece, row0, col0 = tl.load(entry), tl.load(entry + 1).to(tl.int32), tl.load(entry + 2).to(tl.int32)
        end = tile_count
        gate_open = tl.full((ROWS, COLS), True, dtype=tl.int1)
        if GATED:  # an unpack behind a gate (`flag`): closed, it writes nothing (with no sums to take, reads nothing)
            gate = tl.load(flag)
            gate_open = tl.zeros((ROWS, COLS), dtype=tl.int32) == gate  # (a tile's mask: the gate is 0)
            if not CHECKSUM:
                end = tl.where(gate == 0, tile_count, 0)
        for tile in range(program, end, programs):
            entry = tiles + tl.minimum(tile + programs, tile_count - 1) * 3  # the next tile's (the last: its own again)
            next_piece = tl.load(entry)
            next_row0, next_col0 = tl.load(entry + 1).to(tl.int32), tl.load(entry + 2).to(tl.int32)
            loaded, on_wire, position = _move_tile(pieces, piece, row0, col0, wire, gate_open, TENSOR_DTYPE,
                                                   WIRE_DTYPE, TO_BUCKET, ALIGNED, ROWS, COLS, CHECKSUM)
            if NONFINITE:  # masked lanes were loaded as zeros: finite
                found = found | _nonfinite(loaded, NONFINITE)
            if CHECKSUM:
                word, index = _checksum_words(on_wire, position, WORDS)
                plain += word
                weighted += word * index
            piece, row0, col0 = next_piece, next_row0, next_col0
        if NONFINITE:
            if tl.max(tl.max(found, axis=1), axis=0) > 0:
                tl.atomic_max(flag, stamp, sem="relaxed")
        if CHECKSUM:
            _add_sums(scratch, programs_in_all, tail, sums, tl.sum(tl.sum(plain, axis=1), axis=0),
                      tl.sum(tl.sum(weighted, axis=1), axis=0), TO_BUCKET)


@triton.jit
def _move_tile(pieces, piece, row0, col0, wire, gate_open, TENSOR_DTYPE: tl.constexpr, WIRE_DTYPE: tl.constexpr,
               TO_BUCKET: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
               READ_CLOSED: tl.constexpr = False):
    """Copy one tile where `gate_open` (a tile's mask); return the elements as read, as they
    lie in the bucket, and their positions there. Masked lanes read zeros. READ_CLOSED: an
    unpack still reads where the gate is closed (the checksum sums the bucket as it lies)."""
    tensor, position, mask = _locate(pieces, piece, row0, col0, TENSOR_DTYPE, WIRE_DTYPE, ALIGNED, ROWS, COLS)
    if TO_BUCKET:
        loaded = tl.load(tensor, mask=mask, other=0)
        if loaded.dtype.primitive_bitwidth > WIRE_DTYPE.primitive_bitwidth:
            on_wire = loaded.to(WIRE_DTYPE, fp_downcast_rounding="rtne")  # as torch's copy_ rounds
        else:
            on_wire = loaded.to(WIRE_DTYPE)
        tl.store(wire + position, on_wire, mask=mask)
    else:
        loaded = tl.load(wire + position, mask=mask if READ_CLOSED else mask & gate_open, other=0)
        on_wire = loaded
        tl.store(tensor, loaded.to(TENSOR_DTYPE), mask=mask & gate_open)
    return loaded, on_wire, position


@triton.jit
def _add_sums(scratch, programs_in_all, tail, sums, plain, weighted, TO_BUCKET: tl.constexpr):
    """Add a program's sums to the bucket's (`scratch`, int32 [3]: the two sums and the
    count of programs that have added theirs, over every launch of the bucket); the
    last program to arrive finishes the bucket in the same launch, not in one of its
    own. Scalar atomics run on one thread of the program, acquire-release, so the last
    one sees every other program's adds; it leaves `scratch` zeroed for the next run."""
    tl.atomic_add(scratch, plain)
    tl.atomic_add(scratch + 1, weighted)
    if tl.atomic_add(scratch + 2, 1) == programs_in_all - 1:
        bucket_plain = tl.atomic_xchg(scratch, 0)
        bucket_weighted = tl.atomic_xchg(scratch + 1, 0) + bucket_plain
        tl.atomic_xchg(scratch + 2, 0)
        _finish_sums(tail, sums, bucket_plain.to(tl.int64) & 0xFFFFFFFF, bucket_weighted.to(tl.int64) & 0xFFFFFFFF,
                     TO_BUCKET)


@triton.jit
def _finish_sums(tail, sums, plain, weighted, TO_BUCKET: tl.constexpr):
    """Write `sums` (int64 [2, 2], values in [0, 2**32)): row 0 the bucket's two sums,
    row 1 its tail's (packing: the same, also written into the tail; unpacking, what
    the sender wrote there). The tail is handled as 16 bytes, two little-endian int64
    as `checksum.write` lays them out: after an odd count of 16-bit elements it is not
    aligned for int64."""
    tl.store(sums, plain)
    tl.store(sums + 1, weighted)
    byte = tl.arange(0, 16)
    shift = (byte % 8) * 8
    if TO_BUCKET:
        tl.store(tail + byte, ((tl.where(byte < 8, plain, weighted) >> shift) & 0xFF).to(tl.uint8))
        tl.store(sums + 2, plain)
        tl.store(sums + 3, weighted)
    else:
        parts = tl.load(tail + byte).to(tl.int64) << shift
        tl.store(sums + 2, tl.sum(tl.where(byte < 8, parts, 0), axis=0))
        tl.store(sums + 3, tl.sum(tl.where(byte < 8, 0, parts), axis=0))


@dataclass
class Launch:
    """One bucket's tiles for the tensors of one dtype and alignment, on the device."""

    dtype: torch.dtype
    aligned: bool
    words: bool  # copied as 32-bit words: no cast, and every row a whole number of words on both sides
    pieces: torch.Tensor  # int64 [pieces, _FIELDS], in words where `words`, else in elements
    tiles: torch.Tensor  # int64 [tiles, 3]: piece, first row, first column


class BucketKernel:
    """The descriptors of one bucket against one set of tensors, and its launches."""

    def __init__(self, entries: list[tuple[torch.Tensor, boxes.Box, int]], bucket_numel: int, bucket: torch.Tensor,
                 sums: bool = False):
        """`entries`: (tensor, box of it, offset in `bucket`), in bucket order, filling
        its first `bucket_numel` elements; every tensor `supported`. `sums`: whether it
        will run with the checksum (its tiles are smaller)."""
        self.sums = sums
        self.rows, self.cols, self.warps = TILES[sums]
        self.checksum_word_bytes = checksum_word_bytes(bucket_numel, bucket.dtype) if sums else 4
        classes: dict[tuple[torch.dtype, bool, bool], list[tuple]] = {}
        for tensor, box, offset in entries:
            for piece in _pieces(tensor, box, offset, self.cols):
                aligned = _aligned(piece, tensor.element_size(), bucket)
                words = aligned and self._as_words(tensor, piece, bucket)
                if words:
                    piece = _in_words(piece, 4 // tensor.element_size(), self.cols)
                classes.setdefault((torch.int32 if words else tensor.dtype, aligned, words), []).append(piece)
        self.launches = [_launch(dtype, aligned, words, pieces, bucket.device, self.rows, self.cols)
                         for (dtype, aligned, words), pieces in classes.items()]
        # per (direction, flagging NaN/Inf): each launch with its constants and programs, and the programs in all
        self._runs: dict[tuple[bool, bool], tuple[list[tuple[Launch, dict, int]], int]] = {}
        self.scratch = torch.zeros(3, dtype=torch.int32, device=bucket.device)  # see _add_sums
        self.totals = torch.zeros(2, 2, dtype=torch.int64, device=bucket.device)
        if sums and bucket.numel() * bucket.element_size() < bucket_numel * bucket.element_size() + checksum.TAIL_BYTES:
            raise ValueError(f"a bucket of {bucket_numel} elements has no room for its checksum's tail in a buffer of "
                             f"{bucket.numel()}")
        self.tail_byte = bucket_numel * bucket.element_size()  # where the checksum's tail starts

    def _as_words(self, tensor: torch.Tensor, piece: tuple[int, ...], bucket: torch.Tensor) -> bool:
        """Whether an aligned piece is copied as 32-bit words: the same dtype on both sides
        (nothing to cast), whole words from the bucket's start, and, with the checksum,
        a bucket it reads as 32-bit words too."""
        element = tensor.element_size()
        _, _, _, _, offset, count = piece
        return (tensor.dtype == bucket.dtype and 4 % element == 0 and (offset * element) % 4 == 0
                and (count * element) % 4 == 0 and (not self.sums or self.checksum_word_bytes == 4))

    def run(self, bucket: torch.Tensor, to_bucket: bool, flag: torch.Tensor | None = None, stamp: int = 1,
            gate: torch.Tensor | None = None) -> torch.Tensor | None:
        """Copy every piece (into the bucket, or out of it). Built with `sums`, also
        return the bucket's checksum: int64 [2, 2], the two sums computed on the way
        and the two in the bucket's tail (packing: the same, written there too;
        unpacking: the sender's). A device tensor of this kernel's, which its next run
        rewrites; nothing waited for. `flag` (packing; int32 [1] on the device): raised to
        `stamp` (at most) where an element packed is NaN or Inf, else left as it was.
        `gate` (unpacking; int32 [1] on the device): nonzero, nothing is written (the
        sums are still taken, of the bucket as it lies)."""
        tail = bucket.view(torch.uint8)[self.tail_byte:] if self.sums else bucket  # (unused without the checksum)
        flagging = to_bucket and flag is not None
        gated = not to_bucket and gate is not None
        if (to_bucket, flagging, gated) not in self._runs:
            self._runs[to_bucket, flagging, gated] = self._plan_runs(bucket, tail, to_bucket, flagging, gated)
        launches, programs_in_all = self._runs[to_bucket, flagging, gated]
        for launch, constants, programs in launches:
            _copy_tiles[(programs,)](launch.pieces, launch.tiles, len(launch.tiles), bucket, self.scratch,
                                     programs_in_all, tail, self.totals,
                                     flag if flagging else gate if gated else self.scratch, stamp, **constants)
        return self.totals if self.sums else None

    def _plan_runs(self, bucket: torch.Tensor, tail: torch.Tensor, to_bucket: bool, flagging: bool, gated: bool):
        """Each launch's constants and program count in one direction, and their programs in all."""
        launches = []
        for launch in self.launches:
            constants = _constants(launch.dtype, bucket.dtype, to_bucket, launch.aligned, launch.words, self.sums,
                                   self.checksum_word_bytes, flagging, gated)
            launches.append((launch, constants, self._programs(launch, bucket, tail, constants)))
        return launches, sum(programs for _, _, programs in launches)

    def _programs(self, launch: Launch, bucket: torch.Tensor, tail: torch.Tensor, constants: dict) -> int:
        """A program a tile where nothing is cast or summed (a flagging one reduces its
        tile's flag, and raises it only where it found a NaN/Inf: 0.91 of the copy rate
        at 1 GiB against 0.85 looping, bench/RESULTS.md). Otherwise as many programs as the
        device keeps resident at once, each looping over the tiles (and reducing its sums
        once): one program more than that would wait for a whole program's share to
        finish, leaving most of the device idle meanwhile. (Casting fp32 to bf16, looping
        packed at 0.57 of the copy rate against 0.54 a tile.)"""
        if not constants["LOOPING"]:
            return len(launch.tiles)
        if bucket.device.type != "cuda":  # Triton's interpreter (tests on a machine without a GPU)
            return min(len(launch.tiles), 4)
        compiled = _copy_tiles.warmup(launch.pieces, launch.tiles, len(launch.tiles), bucket, self.scratch,
                                      len(launch.tiles), tail, self.totals, self.scratch, 1, grid=(1,), **constants)
        compiled._init_handles()  # loaded (`load_kernels` did it before the first update): its registers are known
        properties = torch.cuda.get_device_properties(bucket.device)
        registers_a_warp = math.ceil(compiled.n_regs * 32 / 256) * 256  # a warp's registers come 256 at a time
        resident = min(properties.regs_per_multiprocessor // registers_a_warp // self.warps,
                       properties.max_threads_per_multi_processor // (32 * self.warps),
                       properties.shared_memory_per_multiprocessor // max(compiled.metadata.shared, 1),
                       32)  # a multiprocessor's block limit on Ampere and Hopper (too many costs time, not results)
        return min(len(launch.tiles), max(resident, 1) * properties.multi_processor_count)


def checksum_word_bytes(bucket_numel: int, dtype: torch.dtype) -> int:
    """How the checksum reads a bucket: as 32-bit words, or as 16-bit ones where its byte
    count is odd in 16-bit words."""
    return 4 if (bucket_numel * dtype.itemsize) % 4 == 0 else 2


def load_kernels(device: torch.device, wire_dtype: torch.dtype, tensor_dtypes, *, to_bucket: bool, sums: bool,
                 word_bytes=(4,), flagging: bool = False, gated: bool = False) -> None:
    """Compile and load every variant of the copy kernel that copies between tensors of
    `tensor_dtypes` and buckets of `wire_dtype` in one direction may launch; `word_bytes`:
    how the checksum reads the buckets (`checksum_word_bytes`); `flagging`: packs that
    flag NaN/Inf (the only packs a trainer that packs ahead launches). Loading a module waits
    for the device: done before an endpoint's first update, it finds no stream waiting
    on another process."""
    pieces = torch.zeros(1, _FIELDS, dtype=torch.int64, device=device)
    tiles = torch.zeros(1, 3, dtype=torch.int64, device=device)
    bucket = torch.zeros(64, dtype=wire_dtype, device=device)
    tail = bucket.view(torch.uint8) if sums else bucket  # as `BucketKernel.run` passes it
    scratch = torch.zeros(3, dtype=torch.int32, device=device)
    totals = torch.zeros(2, 2, dtype=torch.int64, device=device)
    # (tensor dtype, aligned, as words): what `BucketKernel` may put in a launch of its own
    variants = [(dtype, aligned, False) for dtype in tensor_dtypes if dtype in _TRITON_DTYPES
                for aligned in (False, True)]
    if wire_dtype in tensor_dtypes:
        variants.append((torch.int32, True, True))
    for dtype, aligned, words in variants:
        for word in set(word_bytes) if sums else {4}:
            constants = _constants(dtype, wire_dtype, to_bucket, aligned, words, sums, word, flagging and to_bucket,
                                   gated and not to_bucket)
            _copy_tiles.warmup(pieces, tiles, 1, bucket, scratch, 1, tail, totals, scratch, 1, grid=(1,),
                               **constants)._init_handles()


def _constants(dtype: torch.dtype, wire_dtype: torch.dtype, to_bucket: bool, aligned: bool, words: bool, sums: bool,
               word_bytes: int, flagging: bool = False, gated: bool = False) -> dict:
    """A launch's constants: which variant of the kernel it runs. `dtype`: its tensors'
    (int32 where copied as words: then they hold the wire's dtype)."""
    rows, cols, warps = TILES[sums]
    casts = not words and dtype != wire_dtype
    return dict(TENSOR_DTYPE=tl.int32 if words else _TRITON_DTYPES[dtype],
                WIRE_DTYPE=tl.int32 if words else _TRITON_DTYPES[wire_dtype],
                TO_BUCKET=to_bucket, ALIGNED=aligned, CHECKSUM=sums, WORDS=word_bytes,
                NONFINITE=_EXPONENT_BITS[wire_dtype if words else dtype] if flagging else 0, ROWS=rows, COLS=cols,
                GATED=gated, LOOPING=sums or casts,
                num_warps=warps)


def supported(tensor: torch.Tensor) -> bool:
    """Whether the kernel copies this tensor's boxes: a float dtype it knows, and rows
    contiguous (a transposed view is copied piece by piece instead)."""
    return tensor.dtype in _TRITON_DTYPES and (tensor.dim() == 0 or tensor.stride(-1) == 1)


def _pieces(tensor: torch.Tensor, box: boxes.Box, offset: int, tile_cols: int) -> list[tuple[int, ...]]:
    """A box of `tensor` as 2-D pieces (address, rows, cols, row stride, bucket offset,
    elements), columns contiguous, in the bucket's (row-major) order."""
    element = tensor.element_size()
    start = tensor.storage_offset() + sum(lo * stride for (lo, _), stride in zip(box, tensor.stride()))
    dims = [(hi - lo, stride) for (lo, hi), stride in zip(box, tensor.stride()) if hi - lo > 1]
    merged: list[list[int]] = []
    for extent, stride in dims:  # an outer dimension that steps over a whole inner one merges into it
        if merged and merged[-1][1] == extent * stride:
            merged[-1] = [merged[-1][0] * extent, stride]
        else:
            merged.append([extent, stride])
    if not merged or merged[-1][1] != 1:  # the box takes one element of each row: columns of one
        merged.append([1, 1])
    outer, inner = merged[:-2], merged[-2:]
    rows, row_stride = inner[0] if len(inner) == 2 else (1, 0)
    cols = inner[-1][0]
    count = rows * cols
    if rows == 1:  # a contiguous run: copied as rows of a tile's width
        rows, cols, row_stride = math.ceil(count / tile_cols), tile_cols, tile_cols
    pieces = []
    base = tensor.data_ptr() - tensor.storage_offset() * element  # the storage's first element
    for index in range(math.prod(extent for extent, _ in outer)):
        skip, rest = 0, index
        for extent, stride in reversed(outer):
            rest, here = divmod(rest, extent)
            skip += here * stride
        pieces.append((base + (start + skip) * element, rows, cols, row_stride, offset + index * count, count))
    return pieces


def _aligned(piece: tuple[int, ...], element: int, bucket: torch.Tensor) -> bool:
    """Every row of the piece starts on a 16-byte boundary in its tensor and in the bucket,
    and so does the bucket (the kernel's vector accesses assume both)."""
    address, rows, cols, row_stride, offset, _ = piece
    wire = bucket.element_size()
    return (address % 16 == 0 and bucket.data_ptr() % 16 == 0 and (offset * wire) % 16 == 0
            and (rows == 1 or ((row_stride * element) % 16 == 0 and (cols * wire) % 16 == 0)))


def _in_words(piece: tuple[int, ...], per_word: int, tile_cols: int) -> tuple[int, ...]:
    """An aligned piece of 16- or 32-bit elements, `per_word` to a 32-bit word, counted in
    words; a piece whose rows are adjacent (one contiguous run) is cut anew into rows
    of a tile's width."""
    address, rows, cols, row_stride, offset, count = piece
    count //= per_word
    if row_stride == cols:
        return address, math.ceil(count / tile_cols), tile_cols, tile_cols, offset // per_word, count
    return address, rows, cols // per_word, row_stride // per_word, offset // per_word, count


def _launch(dtype: torch.dtype, aligned: bool, words: bool, pieces: list[tuple[int, ...]], device: torch.device,
            tile_rows: int, tile_cols: int) -> Launch:
    """The pieces' table and every tile of them (tensor ops: a 1 GiB bucket is 10**5 tiles)."""
    table = torch.tensor(pieces, dtype=torch.int64)
    across = (table[:, 2] + tile_cols - 1) // tile_cols  # tiles along a row of the piece
    per_piece = (table[:, 1] + tile_rows - 1) // tile_rows * across
    piece = torch.repeat_interleave(torch.arange(len(pieces)), per_piece)
    within = torch.arange(len(piece)) - torch.repeat_interleave(per_piece.cumsum(0) - per_piece, per_piece)
    tiles = torch.stack([piece, within // across[piece] * tile_rows, within % across[piece] * tile_cols], dim=1)
    return Launch(dtype, aligned, words, _upload(table, device), _upload(tiles.contiguous(), device))


def _upload(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Queued on the stream, not waited for: a blocking copy would wait for everything
    queued before it, which may wait on another process. Staged through pinned memory,
    which torch keeps until the copy has run."""
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)
