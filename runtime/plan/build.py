"""The transfer plan: which bytes go from which trainer rank to which engine ranks.

Pure Python over the generated shard tables: the Megatron pieces of every trainer
rank are intersected with the vLLM pieces of every engine TP rank. Each non-empty
intersection is a copy from a source box to a destination box, and never passes
through a full tensor. Copies are grouped by channel — one source rank and the
same TP rank of every engine replica — so identical bytes for replicas travel in
one broadcast. Trainer and engines build the plan independently from the same
inputs and compare its hash before any byte moves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from types import ModuleType

from shardsync.runtime.plan import boxes
from shardsync.runtime.plan.boxes import Box
from shardsync.runtime.errors import PlanError
from shardsync.runtime.plan.layout import Layout, TrainerRank
from shardsync.runtime.plan.check import check_plan


BALANCE_SLACK = 0.05  # how much lighter another holder must be to open a channel more


@dataclass(frozen=True)
class Copy:
    """A box of a source's local tensor to a box of a destination's local tensor."""

    src_tensor: str
    src_box: Box
    dst_tensor: str
    dst_box: Box
    hf_name: str
    phase: int = 0  # 0: embedding, 1 + layer: that layer, layers + 1: final norm and head

    @property
    def numel(self) -> int:
        return boxes.numel(self.dst_box)


@dataclass(frozen=True)
class Channel:
    """One source rank feeding one TP rank of every engine replica."""

    src: TrainerRank
    dst_tp: int
    engines: int
    copies: tuple[Copy, ...]

    @property
    def src_rank(self) -> int:
        return self.src.rank

    @property
    def pp(self) -> int:
        return self.src.pp

    @property
    def tp(self) -> int:
        return self.src.tp

    @property
    def name(self) -> str:
        return f"{source_label(self.src, '-')}-to-tp{self.dst_tp}"

    @property
    def numel(self) -> int:
        return sum(c.numel for c in self.copies)


@dataclass(frozen=True)
class Plan:
    family: str
    layout: Layout
    dtype_bytes: int
    channels: tuple[Channel, ...]
    src_shapes: dict = field(repr=False)  # src rank -> {tensor: shape}
    dst_shapes: dict = field(repr=False)  # dst tp -> {tensor: shape}
    digest: str = ""

    def channels_of_source(self, src_rank: int) -> list[Channel]:
        return [c for c in self.channels if c.src_rank == src_rank]

    def channels_of_engine_rank(self, dst_tp: int) -> list[Channel]:
        return [c for c in self.channels if c.dst_tp == dst_tp]


def build_plan(module: ModuleType, cfg, layout: Layout, dtype_bytes: int) -> Plan:
    """Intersect every trainer rank's Megatron pieces with every engine rank's vLLM pieces."""
    if not module.VLLM_LAYOUT:
        raise PlanError(f"the {module.FAMILY} spec has no vLLM layout table, so there is no shard-to-shard plan; "
                        f"updates use the gather method (full HF tensors through the engine's own loader)")
    _check_experts(module, cfg, layout)
    source_tables = _source_tables(module, cfg, layout)
    sources = _source_pieces(source_tables)
    engine_tables = {s: module.vllm_shard_table(cfg, s, layout.infer_tp, layout.infer_ep)
                     for s in range(layout.infer_tp)}

    wanted: list[tuple[int, _Need]] = []  # (dst_tp, need) in model order per engine rank
    for dst_tp, table in engine_tables.items():
        for local in table:
            for piece in local.pieces:
                for src_box, holders in sources.get(piece.hf_name, {}).items():
                    common = boxes.intersect(src_box, piece.hf_box)
                    if common is not None:
                        wanted.append((dst_tp, _Need(local.name, piece, src_box, holders, common)))

    chosen = _choose_holders(wanted, source_tables)

    phases: dict[str, int] = {}
    per_channel: dict[tuple[int, int], list[Copy]] = {}
    for rank, (dst_tp, need) in zip(chosen, wanted):
        src_tensor, src_local_box = dict(need.holders)[rank]
        if src_tensor not in phases:
            phases[src_tensor] = _phase(module, cfg, src_tensor)
        per_channel.setdefault((rank, dst_tp), []).append(Copy(
            src_tensor=src_tensor,
            src_box=boxes.translate(need.common, need.src_hf_box, src_local_box),
            dst_tensor=need.dst_tensor,
            dst_box=boxes.translate(need.common, need.piece.hf_box, need.piece.local_box),
            hf_name=need.piece.hf_name,
            phase=phases[src_tensor],
        ))

    channels = tuple(
        Channel(layout.trainer(rank), dst_tp, layout.engines, tuple(copies))
        for (rank, dst_tp), copies in sorted(per_channel.items())
    )
    src_shapes = {
        rank: {t.name: tuple(t.shape) for t in table} for rank, table in source_tables.items()
    }
    dst_shapes = {s: {t.name: tuple(t.shape) for t in table} for s, table in engine_tables.items()}
    check_plan(channels, src_shapes, engine_tables)
    digest = plan_digest(module.FAMILY, cfg, layout, dtype_bytes, channels)
    return Plan(module.FAMILY, layout, dtype_bytes, channels, src_shapes, dst_shapes, digest)


def _choose_holders(wanted: list, source_tables: dict) -> list[int]:
    """The source rank of each needed piece.

    Single-holder pieces fix the channels. A replicated piece first goes to a holder
    that already feeds that engine rank (equal TP stays one-to-one), the replicated
    bytes spread evenly over those holders. Then, largest first, a replicated piece
    moves to its least loaded holder where the two loads differ by more than
    BALANCE_SLACK and the move narrows the gap: a channel more is worth an evener load
    where experts sit unevenly or dense replicas sit on DP ranks that hold experts.
    """
    feeds = {(need.holders[0][0], dst_tp) for dst_tp, need in wanted if len(need.holders) == 1}
    replicated_load = {rank: 0 for rank in source_tables}
    chosen: list[int] = []
    for dst_tp, need in wanted:
        ranks = [rank for rank, _ in need.holders]
        if len(ranks) > 1:
            preferred = [r for r in ranks if (r, dst_tp) in feeds] or ranks
            ranks = [min(preferred, key=lambda r: (replicated_load[r], r))]
            replicated_load[ranks[0]] += boxes.numel(need.common)
            feeds.add((ranks[0], dst_tp))
        chosen.append(ranks[0])

    load = {rank: 0 for rank in source_tables}
    for rank, (_, need) in zip(chosen, wanted):
        load[rank] += boxes.numel(need.common)
    replicated = sorted((i for i, (_, need) in enumerate(wanted) if len(need.holders) > 1),
                        key=lambda i: (-boxes.numel(wanted[i][1].common), i))
    for i in replicated:
        need, now = wanted[i][1], chosen[i]
        size = boxes.numel(need.common)
        lightest = min((rank for rank, _ in need.holders), key=lambda r: (load[r], r))
        if load[now] - load[lightest] > BALANCE_SLACK * load[now] and load[lightest] + size < load[now]:
            load[now] -= size
            load[lightest] += size
            chosen[i] = lightest
    return chosen


@dataclass(frozen=True)
class _Need:
    dst_tensor: str
    piece: object  # the vLLM Piece
    src_hf_box: Box
    holders: tuple[tuple[int, tuple[str, Box]], ...]  # (src rank, (src tensor, src local box))
    common: Box


def _source_pieces(source_tables: dict[int, list]) -> dict[str, dict[Box, tuple]]:
    """hf name -> hf box -> the source ranks holding exactly that box (replicas)."""
    found: dict[str, dict[Box, list]] = {}
    for rank, table in source_tables.items():
        for local in table:
            for piece in local.pieces:
                found.setdefault(piece.hf_name, {}).setdefault(piece.hf_box, []).append(
                    (rank, (local.name, piece.local_box)))
    for hf_name, by_box in found.items():
        distinct = list(by_box)
        for i, a in enumerate(distinct):
            for b in distinct[i + 1:]:
                if boxes.intersect(a, b) is not None:
                    raise PlanError(f"{hf_name}: trainer pieces {boxes.fmt(a)} and {boxes.fmt(b)} overlap without being replicas")
    return {name: {box: tuple(holders) for box, holders in by_box.items()} for name, by_box in found.items()}


def _phase(module: ModuleType, cfg, megatron_name: str) -> int:
    """Which part of the model a tensor belongs to, in model order: updates move
    one phase at a time on every channel, so an engine completes layers in order."""
    family, layer, _ = module.resolve(megatron_name, cfg)
    if layer is not None:
        return 1 + layer
    return 0 if family.stage == "first" else cfg.layers + 1


def source_table(module: ModuleType, cfg, layout: Layout, src: TrainerRank) -> list:
    """What one sending trainer rank may send: its dense tensors, and its experts if it
    is at expert DP rank 0. Dense tensors are equal on every DP rank, so a sender at
    dense DP rank above 0 (there for its experts) is one more holder of them, which
    the planner uses to spread their bytes; the experts of expert DP ranks above 0 are
    left out, as the experts' gradient replicas."""
    table = module.megatron_shard_table(cfg, src.tp, layout.train_tp, src.pp, layout.train_pp,
                                        src.ep, layout.train_ep, src.etp, layout.train_etp)
    return [local for local in table if src.sends_experts or not is_expert(module, cfg, local.name)]


def is_expert(module: ModuleType, cfg, megatron_name: str) -> bool:
    """Whether a Megatron tensor is one expert's (sent from expert-DP-0 ranks only)."""
    return module.resolve(megatron_name, cfg).expert is not None


def has_experts(module: ModuleType, cfg) -> bool:
    return any(family.experts for family in module.families(cfg))


def source_label(src: TrainerRank, sep: str = " ") -> str:
    """pp/tp, and dp where it is not 0: unique, since (pp, tp, dp) fixes the rank."""
    return sep.join([f"pp{src.pp}", f"tp{src.tp}"] + ([f"dp{src.dp}"] if src.dp else []))


def _source_tables(module: ModuleType, cfg, layout: Layout) -> dict[int, list]:
    return {src.rank: source_table(module, cfg, layout, src) for src in layout.senders}


def _check_experts(module: ModuleType, cfg, layout: Layout) -> None:
    """Expert parallelism asked of a model without experts is a mistake, not a no-op."""
    if not has_experts(module, cfg):
        asked = [f"{name}={getattr(layout, name)}" for name in ("train_ep", "infer_ep")
                 if getattr(layout, name) not in (1, False)]
        if layout.train_etp != layout.train_tp:
            asked.append(f"train_etp={layout.train_etp}")
        if asked:
            raise PlanError(f"{module.FAMILY} has no experts, yet the layout asks for expert parallelism "
                            f"({', '.join(asked)})")


def plan_digest(family: str, cfg, layout: Layout, dtype_bytes: int, channels) -> str:
    """A stable hash of everything both sides must agree on."""
    body = {
        "family": family,
        "config": dict(sorted(vars(cfg).items())),
        "layout": vars(layout),
        "dtype_bytes": dtype_bytes,
        "channels": [
            [c.src_rank, c.dst_tp, c.engines,
             [[x.src_tensor, x.src_box, x.dst_tensor, x.dst_box, x.phase] for x in c.copies]]
            for c in channels
        ],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
