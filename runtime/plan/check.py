"""Checking a plan before use: every destination element written exactly once.

Independent of how the plan was built: it reads only copies, shapes and the engine
tables' padding, so a planner bug cannot hide behind its own assumptions.
"""

from __future__ import annotations

from shardsync.runtime.plan import boxes
from shardsync.runtime.errors import PlanError


def check_plan(channels, src_shapes: dict, engine_tables: dict) -> None:
    """Refuse a plan with a box outside its tensor, a shape mismatch, a double or
    missing write, or a write into padding."""
    written: dict[tuple[int, str], list] = {}
    for channel in channels:
        shapes = src_shapes[channel.src_rank]
        for copy in channel.copies:
            where = f"channel {channel.name}: {copy.src_tensor}{boxes.fmt(copy.src_box)} -> {copy.dst_tensor}{boxes.fmt(copy.dst_box)}"
            if copy.src_tensor not in shapes or not boxes.inside(copy.src_box, shapes[copy.src_tensor]):
                raise PlanError(f"{where}: source box outside its tensor")
            if not boxes.same_extent(copy.src_box, copy.dst_box):
                raise PlanError(f"{where}: source and destination boxes differ in shape")
            written.setdefault((channel.dst_tp, copy.dst_tensor), []).append(copy.dst_box)

    for dst_tp, table in engine_tables.items():
        for local in table:
            got = written.pop((dst_tp, local.name), [])
            where = f"engine tp{dst_tp} {local.name}"
            for box in got:
                if not boxes.inside(box, tuple(local.shape)):
                    raise PlanError(f"{where}: box {boxes.fmt(box)} outside shape {tuple(local.shape)}")
                for pad in local.padding:
                    if boxes.intersect(box, pad) is not None:
                        raise PlanError(f"{where}: box {boxes.fmt(box)} writes padding {boxes.fmt(pad)}")
            overlap = _first_overlap(got)
            if overlap is not None:
                a, b = overlap
                raise PlanError(f"{where}: {boxes.fmt(a)} and {boxes.fmt(b)} both write {boxes.fmt(boxes.intersect(a, b))}")
            total = 1
            for n in local.shape:
                total *= n
            real = total - sum(boxes.numel(pad) for pad in local.padding)
            covered = sum(boxes.numel(box) for box in got)
            if covered != real:
                raise PlanError(f"{where}: {covered} of {real} elements written")
    if written:
        (dst_tp, name), _ = next(iter(written.items()))
        raise PlanError(f"engine tp{dst_tp} has no tensor {name}, yet the plan writes it")


def _first_overlap(written: list) -> tuple | None:
    """Two boxes that share an element, or None. A sweep over the first dimension: only
    boxes whose first-dimension ranges overlap are compared, so a stacked expert tensor
    (one slot per box) costs about one comparison per box, not one per pair."""
    if any(not box for box in written):  # a scalar's box: any two overlap
        return (written[0], written[1]) if len(written) > 1 else None
    active: list = []
    for box in sorted(written):
        active = [a for a in active if a[0][1] > box[0][0]]
        for a in active:
            if boxes.intersect(a, box) is not None:
                return a, box
        active.append(box)
    return None
