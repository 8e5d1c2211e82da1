"""The batched copy kernel (`runtime/wire/batched_copy.py`): one launch per bucket that
packs every piece (casting) or unpacks it into strided boxes, checksum on the way.

Invariants, over drawn layouts (hypothesis, small shapes): the kernel's bucket equals
the eager per-piece copies (`wire.pack`), its unpack writes exactly the boxes the eager
unpack writes and nothing else, and the sums it computes equal `wire.checksum.compute`
of the bucket on the CPU, for odd element counts and odd offsets too. On CUDA (the GPU
machine) the real kernel runs; here, on the CPU, Triton's interpreter runs the same
kernel (without casts: the interpreter truncates where the GPU rounds to nearest even),
and without Triton the module is skipped, visibly.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardsync.runtime.plan import boxes
from shardsync.runtime.plan.buckets import Bucket, Entry
from shardsync.runtime.targets import TensorTargets
from shardsync.runtime.wire import checksum
from shardsync.runtime.wire import pack as packing
from tests.triton_interpreter import CUDA, DEVICE, compiled_variants, needs_kernel, run_under_interpreter, runner_only

pytest.importorskip("triton", reason="Triton is installed by `make` (requirements/lock.txt) and on the GPU machine")

EXAMPLES = 60 if CUDA else 15
runs_here = needs_kernel("test_the_kernel_runs_under_the_interpreter")


@pytest.fixture(scope="module")
def kernel():
    """The kernel module: compiled for the GPU, or run by Triton's interpreter on the CPU."""
    return importlib.import_module("shardsync.runtime.wire.batched_copy")


@runner_only
def test_the_kernel_runs_under_the_interpreter():
    """On a machine without a GPU: this file's tests, in a child process with Triton's
    interpreter on, must pass (none of them skipped but the GPU-only ones)."""
    run_under_interpreter(__file__, "8 passed, 6 skipped")  # the runner itself and 5 GPU-only


@st.composite
def layouts(draw):
    """Tensors of 1-3 dimensions (some views into wider ones), a box of each, and a
    bucket holding them one after another from an odd or even first offset; in half
    of them every row, box edge and offset sits on 16 bytes (the vector and word copies)."""
    wire = draw(st.sampled_from([torch.bfloat16, torch.float32]))
    source = draw(st.sampled_from([wire, torch.float32] if CUDA else [wire]))
    # aligned: every row and box edge on 16 bytes, so pieces take the vector (and word) copies
    step = 8 if draw(st.booleans()) else 1
    tensors, entries, offset = {}, [], draw(st.integers(0, 3)) * step
    for index in range(draw(st.integers(1, 5))):
        shape = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3)))
        shape = shape[:-1] + (shape[-1] * step,)
        if len(shape) >= 2 and draw(st.booleans()):  # a view into a wider tensor: rows strided, not contiguous
            start, margin = (8, 16) if step == 8 else (2, 5)
            wider = torch.randn(shape[:-1] + (shape[-1] + margin,)).to(source)
            tensor = wider[..., start:start + shape[-1]]
        else:
            tensor = torch.randn(shape).to(source)
        name = f"t{index}"
        tensors[name] = tensor
        box = tuple(sorted(draw(st.lists(st.integers(0, n), min_size=2, max_size=2, unique=True)))
                    for n in tensor.shape[:-1] + (tensor.shape[-1] // step,))
        box = box[:-1] + ((box[-1][0] * step, box[-1][1] * step),)
        entries.append(Entry(name, box, name, box, offset))
        offset += boxes.numel(box)
    return tensors, Bucket(tuple(entries), offset), wire


@runs_here
@settings(max_examples=EXAMPLES, deadline=None)
@given(layout=layouts())
def test_one_launch_packs_and_unpacks_as_the_eager_copies_do_with_the_cpu_checksum(kernel, layout):
    tensors, bucket, wire = layout
    tensors = {name: t.to(DEVICE) for name, t in tensors.items()}
    size = bucket.numel + checksum.tail_elements(wire)
    eager = torch.zeros(size, dtype=wire, device=DEVICE)
    packing.pack(bucket, tensors, eager)
    batched = torch.full((size,), 7.0, dtype=wire, device=DEVICE)
    batched[:bucket.entries[0].offset] = 0  # before the first piece (an odd offset): zeros, as in `eager`
    entries = [(tensors[e.src_tensor], e.src_box, e.offset) for e in bucket.entries]
    sums = kernel.BucketKernel(entries, bucket.numel, batched, sums=True).run(batched, to_bucket=True)
    assert torch.equal(batched[:bucket.numel], eager[:bucket.numel])
    expected_sums = checksum.compute(eager[:bucket.numel].cpu()).tolist()
    assert sums.tolist() == [expected_sums, expected_sums]
    checksum.write(eager, bucket.numel)
    assert torch.equal(batched.view(torch.uint8), eager.view(torch.uint8))  # the tail as the CPU writes it, and no more

    dests = {name: torch.zeros_like(t, dtype=wire) for name, t in tensors.items()}
    expected = {name: torch.zeros_like(t, dtype=wire) for name, t in tensors.items()}
    packing.unpack(bucket, eager, TensorTargets(expected))
    entries = [(dests[e.dst_tensor], e.dst_box, e.offset) for e in bucket.entries]
    eager.view(torch.uint8)[-checksum.TAIL_BYTES:] = torch.arange(1, 17, dtype=torch.uint8)  # a tail to read back
    sums = kernel.BucketKernel(entries, bucket.numel, eager, sums=True).run(eager, to_bucket=False)
    assert all(torch.equal(dests[name], expected[name]) for name in dests)
    assert sums.tolist() == [expected_sums, checksum.sent(eager.cpu(), bucket.numel).tolist()]


@runs_here
@settings(max_examples=EXAMPLES, deadline=None)
@given(layout=layouts(), bad=st.sampled_from([float("nan"), float("inf"), float("-inf"), None]),
       checksums=st.booleans(), data=st.data())
def test_a_pack_flags_a_nan_or_inf_exactly_where_it_packs_one(kernel, layout, bad, checksums, data):
    """With a flag, the pack raises it if and only if an element of a box it packs is NaN
    or Inf (one drawn anywhere in a tensor, inside its box or not), whichever way it
    copies the piece: elements, vectors or words, either half of a word."""
    tensors, bucket, wire = layout
    if bad is not None:
        victim = tensors[data.draw(st.sampled_from(sorted(tensors)))]
        victim[tuple(data.draw(st.integers(0, n - 1)) for n in victim.shape)] = bad
    tensors = {name: t.to(DEVICE) for name, t in tensors.items()}
    packed_bad = any(not bool(torch.isfinite(tensors[e.src_tensor][boxes.as_slices(e.src_box)]).all())
                     for e in bucket.entries)
    buffer = torch.zeros(bucket.numel + checksum.tail_elements(wire), dtype=wire, device=DEVICE)
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    entries = [(tensors[e.src_tensor], e.src_box, e.offset) for e in bucket.entries]
    kernel.BucketKernel(entries, bucket.numel, buffer, sums=checksums).run(buffer, to_bucket=True, flag=flag)
    assert flag.item() == int(packed_bad)


@runs_here
@settings(max_examples=EXAMPLES, deadline=None)
@given(layout=layouts(), checksums=st.booleans(), stamps=st.lists(st.integers(1, 1000), min_size=1, max_size=3))
def test_a_flag_only_grows_to_the_stamps_and_a_closed_gate_keeps_an_unpack_from_writing(kernel, layout, checksums,
                                                                                        stamps):
    """A pack that finds a NaN raises its flag to its stamp, never lowers it (a later
    pack with a smaller stamp leaves it), and one that finds none leaves it as it was;
    an unpack behind a closed gate writes nothing, behind an open one what the eager
    unpack writes, and with the checksum its sums still check against the bucket's tail."""
    tensors, bucket, wire = layout
    tensors = {name: t.to(DEVICE) for name, t in tensors.items()}
    buffer = torch.zeros(bucket.numel + checksum.tail_elements(wire), dtype=wire, device=DEVICE)
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    pack = kernel.BucketKernel([(tensors[e.src_tensor], e.src_box, e.offset) for e in bucket.entries], bucket.numel,
                               buffer, sums=checksums)
    raised = 0
    for stamp in stamps:
        pack.run(buffer, to_bucket=True, flag=flag, stamp=stamp)
        assert flag.item() == raised  # (every element finite)
    victim = bucket.entries[0]
    corner = tuple(lo for lo, _ in victim.src_box)
    tensors[victim.src_tensor][corner] = float("nan")
    for stamp in stamps:
        pack.run(buffer, to_bucket=True, flag=flag, stamp=stamp)
        raised = max(raised, stamp)
        assert flag.item() == raised
    tensors[victim.src_tensor][corner] = 1.0
    pack.run(buffer, to_bucket=True, flag=flag, stamp=stamps[0])  # the bucket as the engine gets it
    before = {name: torch.full_like(t, 7.0).to(wire) for name, t in tensors.items()}
    for closed in (True, False):
        dests = {name: t.clone() for name, t in before.items()}
        gate = torch.tensor([int(closed)], dtype=torch.int32, device=DEVICE)
        entries = [(dests[e.dst_tensor], e.dst_box, e.offset) for e in bucket.entries]
        sums = kernel.BucketKernel(entries, bucket.numel, buffer, sums=checksums).run(buffer, to_bucket=False,
                                                                                      gate=gate)
        expected = {name: t.clone() for name, t in before.items()}
        if not closed:
            packing.unpack(bucket, buffer, TensorTargets(expected))
        assert all(torch.equal(dests[name], expected[name]) for name in dests), closed
        if checksums:
            computed, sent = sums.tolist()
            assert computed == sent, closed


@runs_here
@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16, torch.float32])
def test_a_pack_copying_words_flags_a_nan_in_either_half_of_a_word(kernel, wire):
    """Copied as 32-bit words, two 16-bit elements a word: a NaN or Inf in the low or the
    high half is flagged; a row left out of the box is not read."""
    for column, bad in [(0, float("nan")), (1, float("inf")), (46, float("-inf")), (47, float("nan"))]:
        weights = torch.ones(8, 48, dtype=wire)
        weights[3, column] = bad
        weights[7, 0] = float("nan")  # outside the box
        weights = weights.to(DEVICE)
        bucket = torch.zeros(7 * 48, dtype=wire, device=DEVICE)
        flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        copy = kernel.BucketKernel([(weights, ((0, 7), (0, 48)), 0)], 7 * 48, bucket)
        assert [launch.words for launch in copy.launches] == [True]
        copy.run(bucket, to_bucket=True, flag=flag)
        assert flag.item() == 1, (wire, column)
        weights[3, column] = 2.0
        flag.zero_()
        copy.run(bucket, to_bucket=True, flag=flag)
        assert flag.item() == 0, (wire, column)


def test_aligned_pieces_with_nothing_to_cast_are_copied_as_words(kernel):
    """Whole words on both sides and no cast: one int32 launch, counted in words (a
    contiguous run cut anew into rows of a tile's width); an odd offset, a cast or a
    checksum read in 16-bit words keeps the element copies."""
    weights = torch.randn(64, 48).to(torch.bfloat16)
    bucket = torch.empty(64 * 48 + 16, dtype=torch.bfloat16)
    whole = kernel.BucketKernel([(weights, ((0, 64), (0, 48)), 0)], 64 * 48, bucket, sums=True)
    (launch,) = whole.launches
    assert launch.words and launch.pieces[:, 5].tolist() == [64 * 48 // 2]
    assert launch.pieces[0, 2].item() == whole.cols  # re-cut: rows of a tile's width
    block = kernel.BucketKernel([(weights, ((0, 64), (16, 32)), 0)], 64 * 16, bucket)
    assert [launch.words for launch in block.launches] == [True]
    assert block.launches[0].pieces[0, 1:].tolist() == [64, 8, 24, 0, 64 * 8]  # rows, cols, stride, offset, count
    odd = kernel.BucketKernel([(weights, ((0, 64), (0, 48)), 1)], 64 * 48 + 1, bucket)
    cast = kernel.BucketKernel([(weights.float(), ((0, 64), (0, 48)), 0)], 64 * 48, bucket)
    halves = kernel.BucketKernel([(weights, ((0, 64), (0, 48)), 0), (weights, ((0, 1), (0, 1)), 64 * 48)],
                                 64 * 48 + 1, bucket, sums=True)
    assert not any(launch.words for k in (odd, cast, halves) for launch in k.launches)


def test_a_transposed_tensor_is_left_to_the_per_piece_copies(kernel):
    """The kernel's columns are contiguous; a view whose last dimension is not is packed
    by the eager copies instead (the copier asks `supported`)."""
    assert kernel.supported(torch.randn(4, 6)) and kernel.supported(torch.randn(4, 9)[:, 2:5])
    assert not kernel.supported(torch.randn(6, 4).t()) and not kernel.supported(torch.zeros(3, dtype=torch.int64))


@pytest.mark.skipif(not CUDA, reason="millions of elements: on the GPU machine only (the interpreter is slow)")
@pytest.mark.parametrize("numel, wire", [(3_000_001, torch.bfloat16), (1 << 21, torch.bfloat16),
                                         (1_000_003, torch.float32)])
def test_sums_over_several_chunks_and_an_odd_count_equal_the_cpu_ones(kernel, numel, wire):
    """Past checksum.CHUNK words the weights restart and the chunk index counts; an odd
    count of 2-byte elements is summed as 16-bit words."""
    source = torch.randn(numel, device=DEVICE).to(wire)
    bucket = torch.empty(numel + checksum.tail_elements(wire), dtype=wire, device=DEVICE)
    sums = kernel.BucketKernel([(source, ((0, numel),), 0)], numel, bucket, sums=True).run(bucket, to_bucket=True)
    assert sums[0].tolist() == checksum.compute(source.cpu()).tolist()
    assert checksum.compute(bucket[:numel]).tolist() == sums[0].tolist()  # the torch sums on CUDA agree too
    assert checksum.check(bucket.cpu(), numel) is None  # and the tail it wrote checks on the CPU


@pytest.mark.skipif(not CUDA, reason="compiled variants: on the GPU machine only")
@settings(max_examples=20, deadline=None)
@given(layout=layouts(), checksums=st.booleans(), flagging=st.booleans())
def test_no_copy_launches_a_variant_that_was_not_loaded_at_connect(kernel, layout, checksums, flagging):
    """Loading a module waits for the device, which mid-update may wait on another
    process: every variant a bucket's copies launch, whatever its tensors' addresses,
    counts, alignment and source dtype, is one `load_kernels` loaded before. The
    copier's second pass keeps the descriptors of its first and copies the same bytes."""
    from shardsync.runtime.wire.bucket_copier import BucketCopier

    tensors, bucket, wire = layout
    tensors = {name: t.to(DEVICE) for name, t in tensors.items()}
    buffer = torch.zeros(bucket.numel + checksum.tail_elements(wire), dtype=wire, device=DEVICE)
    reference = torch.zeros_like(buffer)
    packing.pack(bucket, tensors, reference)
    dests = {name: torch.zeros_like(t, dtype=wire) for name, t in tensors.items()}
    expected = {name: torch.zeros_like(t, dtype=wire) for name, t in tensors.items()}
    packing.unpack(bucket, reference, TensorTargets(expected))
    kernel._copy_tiles.device_caches.clear()  # forget what earlier tests compiled and loaded
    packer = BucketCopier(DEVICE, checksums=checksums, flagging=flagging)  # flagging: a trainer that packs ahead
    unpacker = BucketCopier(DEVICE, checksums=checksums)
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE) if flagging else None
    packer.load_kernels(wire, [bucket], to_bucket=True)  # a trainer: every source dtype
    unpacker.load_kernels(wire, [bucket], to_bucket=False, tensor_dtypes=(wire,))  # an engine: the wire's
    loaded = compiled_variants(kernel._copy_tiles)
    for _ in range(2):
        buffer.zero_()
        for tensor in dests.values():
            tensor.zero_()
        packer.pack(("k",), bucket, tensors, buffer, flag)
        unpacker.unpack(("k",), bucket, buffer, TensorTargets(dests))
        assert torch.equal(buffer[:bucket.numel], reference[:bucket.numel])
        assert all(torch.equal(dests[name], expected[name]) for name in dests)
    assert compiled_variants(kernel._copy_tiles) == loaded
    assert packer.descriptors_built == unpacker.descriptors_built == 1
    assert flag is None or flag.item() == 0  # drawn weights are finite


@pytest.mark.skipif(not CUDA, reason="the copier batches on CUDA only (the CPU copies piece by piece)")
def test_the_copier_keeps_a_buckets_kernel_until_a_tensor_moves_or_changes_dtype_or_strides(kernel):
    """A bucket's kernel is kept while its tensors keep their addresses, dtypes and
    strides (a new tensor object over the same storage included), and built again, for
    the right bytes, when one of them changes; an engine's targets hear each tensor once
    a bucket, with every element written into it."""
    from shardsync.runtime.wire.bucket_copier import BucketCopier

    wire = torch.bfloat16
    tensors = {"a": torch.randn(64, 48, device=DEVICE).to(wire), "b": torch.randn(32, 64, device=DEVICE).to(wire)}
    entries = (Entry("a", ((0, 64), (0, 16)), "a", ((0, 64), (0, 16)), 0),
               Entry("b", ((0, 32), (0, 64)), "b", ((0, 32), (0, 64)), 64 * 16),
               Entry("a", ((0, 64), (16, 48)), "a", ((0, 64), (16, 48)), 64 * 16 + 32 * 64))
    bucket = Bucket(entries, 64 * 48 + 32 * 64)
    buffer = torch.zeros(bucket.numel, dtype=wire, device=DEVICE)
    copier = BucketCopier(DEVICE)

    def packed(given) -> bool:
        reference = torch.zeros_like(buffer)
        packing.pack(bucket, given, reference)
        buffer.zero_()
        copier.pack(("k",), bucket, given, buffer)
        return torch.equal(buffer, reference)

    assert packed(tensors) and packed(dict(tensors)) and copier.descriptors_built == 1
    assert packed({**tensors, "a": tensors["a"].view(64, 48)}) and copier.descriptors_built == 1  # same storage
    assert packed({**tensors, "b": tensors["b"].clone()}) and copier.descriptors_built == 2  # moved
    assert packed({**tensors, "a": tensors["a"].float()}) and copier.descriptors_built == 3  # another dtype
    strided = torch.randn(64, 96, device=DEVICE).to(wire)[:, :48]
    assert packed({**tensors, "a": strided}) and copier.descriptors_built == 4  # other strides

    class Heard(TensorTargets):
        def __init__(self, tensors):
            super().__init__(tensors)
            self.written_numel = []

        def written(self, name, numel):
            self.written_numel.append((name, numel))

    dests = {name: torch.zeros_like(t) for name, t in tensors.items()}
    targets = Heard(dests)
    copier.pack(("k",), bucket, tensors, buffer)
    copier.unpack(("k",), bucket, buffer, targets)
    assert all(torch.equal(dests[name], tensors[name]) for name in tensors)
    assert targets.written_numel == [("a", 64 * 48), ("b", 32 * 64)]
