"""Bucket schedules: never over capacity, every element once, order kept; phased, layers
complete in order."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardsync.runtime.plan import boxes
from shardsync.runtime.plan.buckets import phased_schedule, schedule
from shardsync.runtime.wire.pack import pack, unpack
from shardsync.runtime.plan import Copy
from shardsync.runtime.targets import TensorTargets


@st.composite
def copies(draw):
    result = []
    for i in range(draw(st.integers(1, 5))):
        rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        r0, c0 = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        if draw(st.booleans()):
            src = ((r0, r0 + rows), (c0, c0 + cols))
            dst = ((0, rows), (c0, c0 + cols))
        else:
            src = ((r0, r0 + rows),)
            dst = ((1, 1 + rows),)
        result.append(Copy(f"s{i}", src, f"d{i}", dst, f"h{i}"))
    return result


@settings(max_examples=300, deadline=None)
@given(copies(), st.integers(1, 40))
def test_schedule_moves_every_element_once_within_capacity(plan_copies, capacity):
    gen = torch.Generator().manual_seed(0)
    sources = {c.src_tensor: torch.randn(tuple(stop for _, stop in c.src_box), generator=gen) for c in plan_copies}
    dests = {c.dst_tensor: torch.zeros(tuple(stop for _, stop in c.dst_box)) for c in plan_copies}
    buffer = torch.empty(capacity, dtype=torch.float64)
    buckets = schedule(plan_copies, capacity)
    assert all(0 < b.numel <= capacity for b in buckets)
    assert all(b.numel == capacity for b in buckets[:-1]), "a bucket was closed with room left"
    for bucket in buckets:
        wire = pack(bucket, sources, buffer)
        unpack(bucket, wire.clone(), TensorTargets(dests))
    for c in plan_copies:
        got = dests[c.dst_tensor][boxes.as_slices(c.dst_box)]
        assert torch.equal(got, sources[c.src_tensor][boxes.as_slices(c.src_box)].double().float())
    assert sum(b.numel for b in buckets) == sum(c.numel for c in plan_copies)


@settings(max_examples=300, deadline=None)
@given(copies(), st.lists(st.integers(0, 4), min_size=5, max_size=5), st.integers(1, 40))
def test_phased_buckets_fill_across_phases_and_arrive_in_phase_order(plan_copies, phases, capacity):
    plan_copies = [dataclasses.replace(c, phase=p) for c, p in zip(plan_copies, phases)]
    keyed = phased_schedule(plan_copies, capacity)
    walked = [(phase, bucket) for phase in sorted(keyed) for bucket in keyed[phase]]
    buckets = [bucket for _, bucket in walked]
    assert all(b.numel == capacity for b in buckets[:-1]), "a bucket was closed with room left"
    assert sum(b.numel for b in buckets) == sum(c.numel for c in plan_copies)
    phase_of = {c.src_tensor: c.phase for c in plan_copies}
    arrived = [phase_of[entry.src_tensor] for bucket in buckets for entry in bucket.entries]
    assert arrived == sorted(arrived), "an element arrived after one of a later phase"
    for phase, bucket in walked:
        assert phase_of[bucket.entries[-1].src_tensor] == phase, "a bucket moved in another phase than its last element's"


def test_packing_casts_to_the_wire_dtype():
    copy = Copy("w", ((0, 2), (0, 3)), "v", ((0, 2), (0, 3)), "h")
    src = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3) + 0.5}
    [bucket] = schedule([copy], 16)
    wire = pack(bucket, src, torch.empty(16, dtype=torch.bfloat16))
    assert wire.dtype == torch.bfloat16 and wire.tolist() == [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]
