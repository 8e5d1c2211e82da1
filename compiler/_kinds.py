"""The layout vocabulary every converter module is built from, once for all model families.

Written by hand in `compiler/_kinds.py`; `shardsync compile` copies it verbatim to
`generated/_kinds.py`, where the family modules import it. It imports only torch and
the standard library, so a trainer can vendor `generated/` alone.

A parameter family is one Megatron tensor made of named `Part`s, each a canonical tensor
(an HF tensor, or a row range of one fused HF tensor) of `count` units of `unit` rows.
How a TP rank holds the parts is a `Layout` per side, composed from a few placements:

- `Replicate()`: every rank holds every part whole (a tensor of any rank);
- `Shard(dim, pad)`: one part, dimension `dim` split evenly, optionally padded first;
- `Stack(replicate_beyond)`: the parts one after another, each split into rank blocks of
  whole units; a part named in `replicate_beyond` is held a unit per rank, each unit by
  several ranks, when TP exceeds its count;
- `Interleave(groups)`: per group, each part's units of that group; a rank holds a block
  of groups.

Given a config and a TP rank, a layout answers which box of which part fills which box of
the local tensor; the family turns that into `Piece`s of HF tensors. The runtime plans
every transfer from those pieces alone. The shorthands the specs name (`replicated`,
`row`, `column`, `gated`, `qkv`, `vocab`) are compositions, built by the functions of the
same names at the end of the vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import ClassVar, NamedTuple, Protocol

import torch

Box = tuple[tuple[int, int], ...]
"""A rectangle of a tensor: (start, stop) per dimension."""

VLLM_VOCAB_MULTIPLE = 64
"""vLLM pads the vocab of VocabParallelEmbedding and ParallelLMHead to this multiple."""

TP1 = "tp1"
"""The one full-tensor layout `convert_to_hf` takes: a TP-1 Megatron rank's tensor."""


class ConfigError(ValueError):
    """A model config or parallel layout these converters cannot serve."""


class Piece(NamedTuple):
    """A box of a canonical (full HF) tensor and the box it fills in a local tensor."""

    hf_name: str
    hf_box: Box
    local_box: Box


class LocalTensor(NamedTuple):
    """One tensor a rank holds, as the canonical pieces it is made of.

    `padding` lists local boxes with no HF partner (vocab padding rows): nothing is
    sent to them, and a check that every element is written must skip them.
    """

    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    padding: tuple[Box, ...] = ()


class SpecConfig:
    """What the layouts need of a family module's `Config`, beyond its sizes.

    Layouts hold config names, so an error can name the HF field a user would change.
    """

    HF_FIELDS: ClassVar[dict[str, str]] = {}

    def hf_field(self, name: str) -> str:
        return self.HF_FIELDS.get(name, name)

    def share(self, name: str, tp_size: int) -> int:
        """The part of config value `name` that each of `tp_size` ranks holds."""
        total = getattr(self, name)
        if total % tp_size:
            raise ConfigError(f"tp_size={tp_size} does not divide {self.hf_field(name)}={total}")
        return total // tp_size


# --- boxes -------------------------------------------------------------------------


def span(start: int, length: int) -> tuple[int, int]:
    return (start, start + length)


def row_block(start: int, length: int, cols: Box) -> Box:
    """Rows [start, start + length) of a tensor whose other dimensions are `cols`."""
    return (span(start, length),) + cols


def shape_of(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def whole(cfg: SpecConfig, names: Sequence[str]) -> Box:
    """Dimensions every rank holds entirely, sized by config names; () for none (a bias)."""
    return tuple((0, getattr(cfg, name)) for name in names)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


# --- parts ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Part:
    """One canonical tensor of a family: `count` units of `unit` rows (1 when None), e.g.
    the q heads of an attention projection, each `head_dim` rows.

    `hf` names its HF tensor. Parts of one family that name the same HF tensor are row
    ranges of it, in part order (Phi-3's fused `qkv_proj` is q rows, then k, then v).
    """

    role: str
    hf: str
    count: str
    unit: str | None = None

    def units(self, cfg: SpecConfig) -> int:
        return getattr(cfg, self.count)

    def unit_rows(self, cfg: SpecConfig) -> int:
        return getattr(cfg, self.unit) if self.unit else 1

    def rows(self, cfg: SpecConfig) -> int:
        return self.units(cfg) * self.unit_rows(cfg)


class Placed(NamedTuple):
    """What a layout gives one rank: the local shape, and which box of which part fills
    which local box (boxes in the part's own coordinates); `padding` as in LocalTensor."""

    shape: tuple[int, ...]
    pieces: tuple[tuple[Part, Box, Box], ...]
    padding: tuple[Box, ...] = ()


class Layout(Protocol):
    def place(self, cfg: SpecConfig, parts: Sequence[Part], cols: Sequence[str], tp_rank: int, tp_size: int
              ) -> Placed: ...


# --- per-rank quantities ---------------------------------------------------------------


class DimRange(NamedTuple):
    """The block of a (possibly padded) dimension one TP rank holds: `per_rank` entries from
    `start` of the dimension padded to `padded`; the first `real` of them exist in HF."""

    padded: int
    per_rank: int
    start: int
    real: int


class UnitRange(NamedTuple):
    """The units of a part one TP rank holds: `count` units from `first`, each held whole by
    `replicas` ranks (more than 1 only when TP exceeds the part's units)."""

    first: int
    count: int
    replicas: int


class GroupRange(NamedTuple):
    """The groups one TP rank holds of an interleaved layout, and each part's units per group."""

    first: int
    count: int
    units_per_group: tuple[int, ...]


class ExpertRange(NamedTuple):
    """The experts one expert-parallel rank holds: `count` of them from global expert `first`."""

    first: int
    count: int


def megatron_experts(cfg: SpecConfig, experts: str, ep_rank: int, ep_size: int) -> ExpertRange:
    """megatron-core's placement: E / EP experts per EP rank, in rank order."""
    check_rank("ep", ep_rank, ep_size)
    per_rank = cfg.share(experts, ep_size)
    return ExpertRange(ep_rank * per_rank, per_rank)


def vllm_experts(cfg: SpecConfig, experts: str, ep_rank: int, ep_size: int) -> ExpertRange:
    """vLLM's linear placement: contiguous blocks, the first E % EP ranks one expert more."""
    check_rank("ep", ep_rank, ep_size)
    total = getattr(cfg, experts)
    if ep_size > total:
        raise ConfigError(f"expert-parallel size {ep_size} exceeds {cfg.hf_field(experts)}={total}")
    base, extra = divmod(total, ep_size)
    return ExpertRange(ep_rank * base + min(ep_rank, extra), base + (ep_rank < extra))


# --- placements ------------------------------------------------------------------------


def _one_after_another(cfg: SpecConfig, parts: Sequence[Part], cols: Sequence[str], rows_held) -> Placed:
    """Each part's block of rows, `rows_held(part)` -> (first row, rows), one part after
    another in the local tensor; the other dimensions whole."""
    rest = whole(cfg, cols)
    pieces, top = [], 0
    for part in parts:
        first, rows = rows_held(part)
        pieces.append((part, row_block(first, rows, rest), row_block(top, rows, rest)))
        top += rows
    return Placed((top,) + shape_of(rest), tuple(pieces))


@dataclasses.dataclass(frozen=True)
class Pad:
    """Pad a dimension to a multiple before sharding it: `multiple` is a number or a config
    name, times the TP size when `times_tp`; `owner` names whose padding it is in errors."""

    multiple: int | str
    times_tp: bool = False
    owner: str = ""

    def padded(self, cfg: SpecConfig, size: int, tp_size: int) -> int:
        multiple = getattr(cfg, self.multiple) if isinstance(self.multiple, str) else self.multiple
        return round_up(size, multiple * tp_size if self.times_tp else multiple)


@dataclasses.dataclass(frozen=True)
class Replicate:
    """Every TP rank holds every part whole, one after another: norms, routers `[E, H]`,
    biases added after a reduce."""

    def place(self, cfg: SpecConfig, parts: Sequence[Part], cols: Sequence[str], tp_rank: int, tp_size: int
              ) -> Placed:
        return _one_after_another(cfg, parts, cols, lambda part: (0, part.rows(cfg)))


@dataclasses.dataclass(frozen=True)
class Shard:
    """One part, dimension `dim` split evenly over TP (0: column-parallel rows, 1:
    row-parallel columns), padded first when `pad` says so. Padding has no HF partner."""

    dim: int
    pad: Pad | None = None

    def range(self, cfg: SpecConfig, part: Part, cols: Sequence[str], tp_rank: int, tp_size: int) -> DimRange:
        name = part.count if self.dim == 0 else cols[self.dim - 1]
        size = part.rows(cfg) if self.dim == 0 else getattr(cfg, name)
        if self.pad is None:
            if size % tp_size:
                raise ConfigError(f"tp_size={tp_size} does not divide {cfg.hf_field(name)}"
                                  f"{'' if self.dim or not part.unit else ' * ' + cfg.hf_field(part.unit)}={size}")
            padded = size
        else:
            padded = self.pad.padded(cfg, size, tp_size)
            if padded % tp_size:
                raise ConfigError(f"tp_size={tp_size} does not divide {self.pad.owner}'s padded "
                                  f"{cfg.hf_field(name)}={padded}")
        per_rank = padded // tp_size
        start = tp_rank * per_rank
        return DimRange(padded, per_rank, start, max(0, min(per_rank, size - start)))

    def place(self, cfg: SpecConfig, parts: Sequence[Part], cols: Sequence[str], tp_rank: int, tp_size: int
              ) -> Placed:
        if len(parts) != 1:
            raise ConfigError(f"Shard places one part, got {len(parts)}: stack or interleave several")
        (part,) = parts
        full = ((0, part.rows(cfg)),) + whole(cfg, cols)
        held = self.range(cfg, part, cols, tp_rank, tp_size)

        def along(box: Box, interval: tuple[int, int]) -> Box:
            return box[:self.dim] + (interval,) + box[self.dim + 1:]

        pieces = ((part, along(full, span(held.start, held.real)), along(full, (0, held.real))),) if held.real else ()
        padding = (along(full, (held.real, held.per_rank)),) if held.real < held.per_rank else ()
        return Placed(shape_of(along(full, (0, held.per_rank))), pieces, padding)


@dataclasses.dataclass(frozen=True)
class Stack:
    """The parts one after another, each split into TP blocks of whole units: vLLM's
    `qkv_proj` `[q | k | v]` and `gate_up_proj` `[gate; up]` of a rank's own heads and rows.

    A part in `replicate_beyond` may have fewer units than ranks: each rank then holds one
    unit, and each unit is held whole by TP / units ranks (vLLM's K/V heads).
    """

    replicate_beyond: tuple[str, ...] = ()

    def units(self, cfg: SpecConfig, part: Part, tp_rank: int, tp_size: int) -> UnitRange:
        total = part.units(cfg)
        if part.role in self.replicate_beyond and tp_size > total:
            if tp_size % total:
                raise ConfigError(f"tp_size={tp_size} must be a multiple of {cfg.hf_field(part.count)}={total} when larger")
            replicas = tp_size // total
            return UnitRange(tp_rank // replicas, 1, replicas)
        per_rank = cfg.share(part.count, tp_size)
        return UnitRange(tp_rank * per_rank, per_rank, 1)

    def place(self, cfg: SpecConfig, parts: Sequence[Part], cols: Sequence[str], tp_rank: int, tp_size: int
              ) -> Placed:
        def rows_held(part: Part) -> tuple[int, int]:
            held, unit = self.units(cfg, part, tp_rank, tp_size), part.unit_rows(cfg)
            return held.first * unit, held.count * unit

        return _one_after_another(cfg, parts, cols, rows_held)


@dataclasses.dataclass(frozen=True)
class Interleave:
    """Per group, each part's units of that group, and a rank holds a block of `groups`:
    Megatron's `linear_qkv` `[q heads of g, k_g, v_g]` per query group g."""

    groups: str

    def group_range(self, cfg: SpecConfig, parts: Sequence[Part], tp_rank: int, tp_size: int) -> GroupRange:
        groups = getattr(cfg, self.groups)
        for part in parts:
            if part.units(cfg) % groups:
                raise ConfigError(f"{cfg.hf_field(self.groups)}={groups} must divide "
                                  f"{cfg.hf_field(part.count)}={part.units(cfg)}")
        per_rank = cfg.share(self.groups, tp_size)
        return GroupRange(tp_rank * per_rank, per_rank, tuple(part.units(cfg) // groups for part in parts))

    def place(self, cfg: SpecConfig, parts: Sequence[Part], cols: Sequence[str], tp_rank: int, tp_size: int
              ) -> Placed:
        rest = whole(cfg, cols)
        held = self.group_range(cfg, parts, tp_rank, tp_size)
        rows_per_group = [units * part.unit_rows(cfg) for units, part in zip(held.units_per_group, parts)]
        pieces, top = [], 0
        for group in range(held.first, held.first + held.count):
            for part, rows in zip(parts, rows_per_group):
                pieces.append((part, row_block(group * rows, rows, rest), row_block(top, rows, rest)))
                top += rows
        return Placed((top,) + shape_of(rest), tuple(pieces))


def padded_dim(layout: Layout) -> int | None:
    """The dimension a layout pads before sharding it, if any (vocab rows)."""
    return layout.dim if isinstance(layout, Shard) and layout.pad else None


# --- families ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    """A parameter family: one Megatron tensor, its parts, and how each side holds them.

    Names are patterns over `{layer}`, the global layer number, whatever the pipeline
    stage. `vllm` is one name (every part in one tensor, as `vllm_layout` places them), a
    name per part (a tensor each, each placed alone), or None when the spec has no vLLM
    layout table. `stage` is "layer", "first" or "last": the pipeline stage that holds it.

    `experts` names the expert count of a family with an expert axis. Megatron then holds
    one tensor per local expert (`{expert}` in its name is the local index; expert-TP
    places each), HF one per expert (`{expert}` the global index), and vLLM one tensor
    stacking its experts `[E_local, ...]`, each placed by TP, or whole under vLLM's
    expert parallelism; a piece's local box then starts with the expert's slot.
    """

    megatron: str
    parts: tuple[Part, ...]
    megatron_layout: Layout
    vllm_layout: Layout
    vllm: str | tuple[str, ...] | None
    stage: str
    cols: tuple[str, ...] = ()
    experts: str | None = None

    def __post_init__(self):
        if self.vllm is not None:
            object.__setattr__(self, "vllm", (self.vllm,) if isinstance(self.vllm, str) else tuple(self.vllm))
        if self.vllm is not None and len(self.vllm) not in (1, len(self.parts)):
            raise ConfigError(f"{self.megatron}: {len(self.vllm)} vLLM names for {len(self.parts)} parts: "
                              f"give one, or one per part")
        if self.experts and self.vllm is not None and len(self.vllm) != 1:
            raise ConfigError(f"{self.megatron}: an expert family stacks its parts in one vLLM tensor")

    def megatron_tensors(self, cfg: SpecConfig, layer: int | None, tp_rank: int, tp_size: int, ep_rank: int = 0,
                         ep_size: int = 1, etp_rank: int | None = None, etp_size: int | None = None
                         ) -> tuple[LocalTensor, ...]:
        """Every tensor of the family a Megatron rank holds: one, or one per local expert,
        placed by expert-TP (`etp_*`, default the TP rank and size)."""
        if not self.experts:
            return (self.megatron_tensor(cfg, layer, tp_rank, tp_size),)
        etp_rank, etp_size = (tp_rank, tp_size) if etp_size is None else (etp_rank, etp_size)
        held = megatron_experts(cfg, self.experts, ep_rank, ep_size)
        placed = self.megatron_layout.place(cfg, self.parts, self.cols, etp_rank, etp_size)  # alike for each expert
        return tuple(LocalTensor(self.megatron.format(layer=layer, expert=local), placed.shape,
                                 self._pieces(cfg, placed, layer, held.first + local), placed.padding)
                     for local in range(held.count))

    def hf_names(self, layer: int | None, expert: int | None = None) -> tuple[str, ...]:
        """The HF tensors of the family (of one global expert), each once, in part order."""
        return tuple(dict.fromkeys(part.hf.format(layer=layer, expert=expert) for part in self.parts))

    def megatron_tensor(self, cfg: SpecConfig, layer: int | None, tp_rank: int, tp_size: int,
                        expert: int | None = None) -> LocalTensor:
        """The family's tensor on a Megatron rank; of an expert family, global expert
        `expert`'s as a rank of expert-parallel size 1 names it."""
        return self._tensor(self.megatron.format(layer=layer, expert=expert), self.megatron_layout, self.parts, cfg,
                            layer, tp_rank, tp_size, expert=expert)

    def vllm_tensors(self, cfg: SpecConfig, layer: int | None, tp_rank: int, tp_size: int,
                     expert_parallel: bool = False) -> tuple[LocalTensor, ...]:
        """The family's tensors on a vLLM rank. An expert family stacks its experts: all of
        them split by TP, or, under expert parallelism (over the TP ranks), this rank's
        block of whole experts."""
        if self.experts:
            return (self._stacked_experts(cfg, layer, tp_rank, tp_size, expert_parallel),)
        return tuple(self._tensor(name, self.vllm_layout, parts, cfg, layer, tp_rank, tp_size)
                     for name, parts in self._vllm_tensor_parts(layer))

    def vllm_tensor(self, cfg: SpecConfig, layer: int | None, tp_rank: int, tp_size: int) -> LocalTensor:
        """The family's one vLLM tensor (for a family with a vLLM tensor per part, see vllm_tensors)."""
        tensors = self.vllm_tensors(cfg, layer, tp_rank, tp_size)
        if len(tensors) != 1:
            raise ConfigError(f"{self.megatron}: {len(tensors)} vLLM tensors, one per part: call vllm_tensors")
        return tensors[0]

    def hf_shape(self, cfg: SpecConfig, hf_name: str, layer: int | None, expert: int | None = None
                 ) -> tuple[int, ...]:
        rows = sum(part.rows(cfg) for part in self.parts if part.hf.format(layer=layer, expert=expert) == hf_name)
        return (rows,) + shape_of(whole(cfg, self.cols))

    def shard_to_vllm(self, cfg: SpecConfig, layer: int | None, shard: torch.Tensor, tp_rank: int, tp_size: int
                      ) -> list[tuple[str, torch.Tensor]]:
        """A Megatron shard as vLLM's tensors of the same TP rank: each vLLM tensor is the
        shard's pieces of its parts, in part order and then row order, stacked.

        Where vLLM holds other elements at that rank (K/V heads replicated beyond their
        count) that is refused; where the two pad differently (vocab) the result is the
        shard's real rows, and their place in vLLM's padded tensor comes from the shard tables.
        """
        held = self.megatron_layout.place(cfg, self.parts, self.cols, tp_rank, tp_size)
        padded = any(padded_dim(layout) is not None for layout in (self.megatron_layout, self.vllm_layout))
        result = []
        for name, parts in self._vllm_tensor_parts(layer):
            mine = sorted(((self.parts.index(part), self._hf_box(cfg, part, box), local)
                           for part, box, local in held.pieces if part in parts), key=lambda p: p[:2])
            if not padded:
                target = self._tensor(name, self.vllm_layout, parts, cfg, layer, tp_rank, tp_size)
                if _merged([Piece(self.parts[i].hf.format(layer=layer), box, local) for i, box, local in mine]
                           ) != _merged(target.pieces):
                    raise ConfigError(f"{self.megatron}: at TP {tp_size} vLLM's rank {tp_rank} does not hold what "
                                      f"Megatron's does; map shards with the shard tables")
            blocks = [shard[_slices(local)] for _, _, local in mine] or [shard[:0]]  # a rank of padding only
            result.append((name, blocks[0] if len(blocks) == 1 else torch.cat(blocks)))
        return result

    def check_full(self, cfg: SpecConfig, name: str, full: torch.Tensor) -> None:
        """`full` is the TP-1 tensor; a padded dimension may carry any Megatron padding (it
        depends on the TP the shards came from)."""
        local = self.megatron_tensor(cfg, None, 0, 1)
        padded = padded_dim(self.megatron_layout)
        if padded is None:
            return check_shape(name, full, local.shape)
        real = [stop for _, stop in local.pieces[0].hf_box] if local.pieces else list(local.shape)
        fits = full.dim() == len(real) and all(
            full.shape[d] >= real[d] if d == padded else full.shape[d] == real[d] for d in range(len(real)))
        if not fits:
            expected = ", ".join(f"{n} or more padded" if d == padded else str(n) for d, n in enumerate(real))
            raise ValueError(f"{name}: expected shape ({expected}), got {tuple(full.shape)}")

    def _vllm_tensor_parts(self, layer: int | None) -> list[tuple[str, tuple[Part, ...]]]:
        if self.vllm is None:
            raise ConfigError(f"{self.megatron}: the spec gives no vLLM name, so there is no vLLM layout")
        names = [name.format(layer=layer) for name in self.vllm]
        if len(names) == 1:
            return [(names[0], self.parts)]
        return [(name, (part,)) for name, part in zip(names, self.parts)]

    def _tensor(self, name: str, layout: Layout, parts: Sequence[Part], cfg: SpecConfig, layer: int | None,
                tp_rank: int, tp_size: int, expert: int | None = None) -> LocalTensor:
        placed = layout.place(cfg, parts, self.cols, tp_rank, tp_size)
        return LocalTensor(name, placed.shape, self._pieces(cfg, placed, layer, expert), placed.padding)

    def _pieces(self, cfg: SpecConfig, placed: Placed, layer: int | None, expert: int | None) -> tuple[Piece, ...]:
        """A placement's boxes of parts as pieces of the HF tensors of one layer (and expert)."""
        return tuple(Piece(part.hf.format(layer=layer, expert=expert), self._hf_box(cfg, part, box), local)
                     for part, box, local in placed.pieces if all(stop > start for start, stop in box))

    def _stacked_experts(self, cfg: SpecConfig, layer: int | None, tp_rank: int, tp_size: int,
                         expert_parallel: bool) -> LocalTensor:
        """vLLM's `[E_local, ...]` tensor: slot k holds global expert first + k."""
        (name, _), = self._vllm_tensor_parts(layer)
        if expert_parallel:
            held, inner = vllm_experts(cfg, self.experts, tp_rank, tp_size), (0, 1)
        else:
            held, inner = ExpertRange(0, getattr(cfg, self.experts)), (tp_rank, tp_size)
        placed = self.vllm_layout.place(cfg, self.parts, self.cols, *inner)  # alike for each expert
        pieces, padding = [], []
        for slot in range(held.count):
            slot_box = ((slot, slot + 1),)
            pieces += [piece._replace(local_box=slot_box + piece.local_box)
                       for piece in self._pieces(cfg, placed, layer, held.first + slot)]
            padding += [slot_box + box for box in placed.padding]
        return LocalTensor(name, (held.count,) + placed.shape, tuple(pieces), tuple(padding))

    def _hf_box(self, cfg: SpecConfig, part: Part, box: Box) -> Box:
        """A box of a part as a box of its HF tensor: offset by the rows of the parts before
        it in the same fused tensor."""
        offset = 0
        for other in self.parts:
            if other is part:
                break
            if other.hf == part.hf:
                offset += other.rows(cfg)
        (start, stop), rest = box[0], box[1:]
        return ((start + offset, stop + offset),) + rest


def _merged(pieces: Sequence[Piece]) -> list[tuple[str, Box]]:
    """Pieces as (HF name, HF box), consecutive row blocks of one tensor joined."""
    merged: list[tuple[str, Box]] = []
    for piece in pieces:
        if merged:
            name, box = merged[-1]
            if name == piece.hf_name and box[1:] == piece.hf_box[1:] and box[0][1] == piece.hf_box[0][0]:
                merged[-1] = (name, ((box[0][0], piece.hf_box[0][1]),) + box[1:])
                continue
        merged.append((piece.hf_name, piece.hf_box))
    return merged


# --- the shorthands a spec's `split:` names ---------------------------------------------

REPLICATE = Replicate()


def replicated(*, megatron: str, hf: Sequence[str], vllm: str | Sequence[str] | None, stage: str, size: str,
               experts: str | None = None) -> Family:
    """Every TP rank holds the whole 1-D tensor (norms, biases added after a reduce)."""
    return Family(megatron, (Part("", hf[0], size),), REPLICATE, REPLICATE, vllm, stage, (), experts)


def row(*, megatron: str, hf: Sequence[str], vllm: str | Sequence[str] | None, stage: str, rows: str, cols: str,
        experts: str | None = None) -> Family:
    """Row-parallel linear: TP rank r holds column block r, all rows."""
    return Family(megatron, (Part("", hf[0], rows),), Shard(1), Shard(1), vllm, stage, (cols,), experts)


def column(*, megatron: str, hf: Sequence[str], vllm: str | Sequence[str] | None, stage: str, rows: str,
           cols: str | None = None, experts: str | None = None) -> Family:
    """Column-parallel linear (weight or bias) that is one tensor: TP rank r holds row block r."""
    return Family(megatron, (Part("", hf[0], rows),), Shard(0), Shard(0), vllm, stage, (cols,) if cols else (),
                  experts)


def gated(*, megatron: str, hf: Sequence[str], vllm: str | Sequence[str] | None, stage: str, rows: str,
          cols: str | None = None, experts: str | None = None) -> Family:
    """Gated MLP input: TP rank r holds [gate rows of r; up rows of r], on both sides.

    Megatron's linear_fc1 (partition_stride 2) and vLLM's gate_up_proj agree, so a shard
    needs no conversion. The TP-1 tensor is [gate; up], which is why shards of a larger TP
    concatenated, [gate_0; up_0; gate_1; up_1], are not it. Experts are laid out alike
    (Megatron's local_experts.{j}.linear_fc1, one expert's slice of vLLM's w13_weight).
    """
    parts = (Part("gate", hf[0], rows), Part("up", hf[1], rows))
    return Family(megatron, parts, Stack(), Stack(), vllm, stage, (cols,) if cols else (), experts)


def qkv(*, megatron: str, hf: Sequence[str], vllm: str | Sequence[str] | None, stage: str, heads: str,
        kv_heads: str, head_dim: str, cols: str | None = None) -> Family:
    """Attention input projection (weight or bias).

    Megatron interleaves rows per query group, [q heads of g, k_g, v_g], and TP rank r
    holds a contiguous block of groups. vLLM's qkv_proj on a rank is [q | k | v] of its
    own heads, a KV head held whole by several ranks when TP exceeds the KV heads.
    """
    parts = (Part("q", hf[0], heads, head_dim), Part("k", hf[1], kv_heads, head_dim),
             Part("v", hf[2], kv_heads, head_dim))
    return Family(megatron, parts, Interleave(kv_heads), Stack(replicate_beyond=("k", "v")), vllm,
                  stage, (cols,) if cols else ())


def vocab(*, megatron: str, hf: Sequence[str], vllm: str | Sequence[str] | None, stage: str, rows: str, cols: str
          ) -> Family:
    """Vocab-parallel rows (embedding, output layer), padded at the end.

    Megatron pads the vocab to a multiple of make_vocab_size_divisible_by * TP, vLLM to a
    multiple of 64; each then splits rows evenly. Padding rows have no HF partner, and the
    two paddings differ, so equal TP does not mean equal rows.
    """
    megatron_layout = Shard(0, Pad("make_vocab_size_divisible_by", times_tp=True, owner="Megatron"))
    vllm_layout = Shard(0, Pad(VLLM_VOCAB_MULTIPLE, owner="vLLM"))
    return Family(megatron, (Part("", hf[0], rows),), megatron_layout, vllm_layout, vllm, stage, (cols,))


SHORTHANDS = {"replicated": replicated, "row": row, "column": column, "gated": gated, "qkv": qkv, "vocab": vocab}
"""The spec's `split:` names, each a composition of the placements above."""


# --- what the family modules' public functions do ---------------------------------------


def present(families: Sequence[Family], conditions: dict[Family, bool]) -> tuple[Family, ...]:
    """The families a config has: all, less those whose condition is false."""
    return tuple(family for family in families if conditions.get(family, True))


def stage_params(cfg: SpecConfig, families: Sequence[Family], pp_rank: int, pp_size: int
                 ) -> list[tuple[Family, int | None]]:
    """(family, layer) of each tensor pipeline stage `pp_rank` holds, in model order.

    Layers split evenly over stages; the embedding sits on the first stage and the final
    norm and output layer on the last. With tied embeddings the last stage's copy of the
    embedding is not listed: the first stage's is the source.
    """
    check_rank("pp", pp_rank, pp_size)
    layers = getattr(cfg, "layers", 0)
    if layers % pp_size:
        raise ConfigError(f"pp_size={pp_size} does not divide {cfg.hf_field('layers')}={layers}")
    per_stage = layers // pp_size
    stage_layers = range(pp_rank * per_stage, (pp_rank + 1) * per_stage)
    result: list[tuple[Family, int | None]] = []
    result += [(family, None) for family in families if family.stage == "first" and pp_rank == 0]
    result += [(family, layer) for layer in stage_layers for family in families if family.stage == "layer"]
    result += [(family, None) for family in families if family.stage == "last" and pp_rank == pp_size - 1]
    return result


def hf_shapes(table: Sequence[LocalTensor]) -> dict[str, tuple[int, ...]]:
    """The shape of every canonical tensor of a TP-1 table, in model order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for local in table:
        for piece in local.pieces:
            stops = tuple(stop for _, stop in piece.hf_box)
            shapes[piece.hf_name] = tuple(map(max, shapes.get(piece.hf_name, stops), stops))
    return shapes


class Resolved(NamedTuple):
    """Which family a Megatron name is, at which global layer, and of which expert (the
    name's index: global as a rank of expert-parallel size 1 names it)."""

    family: Family
    layer: int | None
    expert: int | None = None


def resolve(cfg: SpecConfig, families: Sequence[Family], name: str, model: str) -> Resolved:
    """The family, layer and expert of a Megatron tensor name this model has."""
    for family in families:
        match = _name_pattern(family.megatron).fullmatch(name)
        if match is None:
            continue
        found = match.groupdict()
        layer = int(found["layer"]) if "layer" in found else None
        if layer is not None and layer >= cfg.layers:
            raise KeyError(f"{name}: layer {layer} out of range for {cfg.hf_field('layers')}={cfg.layers}")
        expert = int(found["expert"]) if "expert" in found else None
        if expert is not None and expert >= getattr(cfg, family.experts):
            raise KeyError(f"{name}: expert {expert} out of range for "
                           f"{cfg.hf_field(family.experts)}={getattr(cfg, family.experts)}")
        return Resolved(family, layer, expert)
    raise KeyError(f"{name}: not a parameter of this {model} model")


def shard_to_vllm(cfg: SpecConfig, where: Resolved, name: str, shard: torch.Tensor, tp_rank: int, tp_size: int
                  ) -> list[tuple[str, torch.Tensor]]:
    family, layer, expert = where
    if family.experts:
        raise ConfigError(f"{name}: one expert is one slot of vLLM's stacked {family.vllm[0]}: place expert shards "
                          f"with the shard tables")
    check_shape(name, shard, family.megatron_tensor(cfg, layer, tp_rank, tp_size).shape)
    return family.shard_to_vllm(cfg, layer, shard, tp_rank, tp_size)


def full_to_hf(cfg: SpecConfig, where: Resolved, name: str, full: torch.Tensor, layout: str | None
               ) -> list[tuple[str, torch.Tensor]]:
    if layout != TP1:
        raise ValueError(
            f"{name}: convert_to_hf takes the whole tensor in Megatron's TP-1 layout (what megatron-core's "
            f"sharded state dict assembles); say so with layout={TP1!r}, or pass the TP shards, in rank order, to "
            f"convert_shards_to_hf(name, shards, cfg): torch.cat of TP shards is not the TP-1 layout (got layout={layout!r})")
    family, layer, expert = where
    family.check_full(cfg, name, full)
    return _to_hf(cfg, where, [(full, family.megatron_tensor(cfg, layer, 0, 1, expert=expert))])


def shards_to_hf(cfg: SpecConfig, where: Resolved, name: str, shards: Sequence[torch.Tensor]
                 ) -> list[tuple[str, torch.Tensor]]:
    """Each shard's pieces copied into the HF tensors, by the Megatron shard table of
    TP len(shards) (expert-TP for an expert's shards): what the table says is the only
    layout assumed."""
    if isinstance(shards, torch.Tensor) or not len(shards):
        raise ValueError(f"{name}: expected a sequence of every TP rank's shard, in rank order, "
                         f"got {'one tensor' if isinstance(shards, torch.Tensor) else 'none'}")
    family, layer, expert = where
    tp_size = len(shards)
    locals_ = [family.megatron_tensor(cfg, layer, rank, tp_size, expert=expert) for rank in range(tp_size)]
    for rank, (shard, local) in enumerate(zip(shards, locals_)):
        if tuple(shard.shape) != tuple(local.shape):
            raise ValueError(f"{name}: shard {rank} of {tp_size}: expected shape {tuple(local.shape)} (TP {tp_size} "
                             f"from {tp_size} shards), got {tuple(shard.shape)}")
    return _to_hf(cfg, where, list(zip(shards, locals_)))


def _to_hf(cfg: SpecConfig, where: Resolved, held: Sequence[tuple[torch.Tensor, LocalTensor]]
           ) -> list[tuple[str, torch.Tensor]]:
    """Every piece of every (tensor, table entry) copied into the family's HF tensors."""
    family, layer, expert = where
    first = held[0][0]
    hf = {hf_name: first.new_empty(family.hf_shape(cfg, hf_name, layer, expert))
          for hf_name in family.hf_names(layer, expert)}
    for tensor, local in held:
        for piece in local.pieces:
            hf[piece.hf_name][_slices(piece.hf_box)] = tensor[_slices(piece.local_box)]
    return list(hf.items())


def all_or_none(field: str, present: dict[str, bool]) -> bool:
    """One megatron-core switch that gives several tensors together: all present, or none."""
    values = set(present.values())
    if len(values) > 1:
        have = ", ".join(name for name, value in present.items() if value)
        lack = ", ".join(name for name, value in present.items() if not value)
        raise ConfigError(f"megatron-core's {field} switches {', '.join(present)} on together; this config "
                          f"has {have} but not {lack}")
    return values.pop()


# --- reading an HF config --------------------------------------------------------------


def check_architecture(hf: dict, architectures: Sequence[str]) -> None:
    named = hf.get("architectures") or []
    if named and not set(named) & set(architectures):
        raise ConfigError(f"architectures={named}: this module converts {list(architectures)}")


def require_value(hf: dict, field: str, value, why: str) -> None:
    """Refuse a config whose `field` is set to anything but `value`: a setting the
    families cannot describe must not be converted as if it were the one they do."""
    if field in hf and hf[field] != value:
        raise ConfigError(f"{field}={hf[field]!r}: these converters need {value!r} ({why})")


def read_int(hf: dict, field: str, default: int | None = None) -> int:
    value = _read(hf, field, default)
    if type(value) is not int or value <= 0:
        raise ConfigError(f"{field}: expected a positive integer, got {value!r}")
    return value


def read_bool(hf: dict, field: str, default: bool | None = None) -> bool:
    value = _read(hf, field, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{field}: expected true or false, got {value!r}")
    return value


def read_float(hf: dict, field: str, default: float | None = None) -> float:
    value = _read(hf, field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{field}: expected a positive number, got {value!r}")
    return float(value)


def check_rank(axis: str, rank: int, size: int) -> None:
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"{axis}_rank={rank} is not in range for {axis}_size={size}")


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(tensor.shape)}")


# transformers 5 keeps RoPE settings in a `rope_parameters` mapping (what vLLM's
# `hf_config.to_dict()` hands an engine); config.json files written before keep them at
# the top level. Both spell the same model, so a field is looked up in either.
NESTED_FIELDS = ("rope_parameters",)


def _read(hf: dict, field: str, default):
    value = hf.get(field)
    for nested in NESTED_FIELDS:
        inner = hf.get(nested)
        if isinstance(inner, dict) and inner.get(field) is not None:
            if value is not None and inner[field] != value:
                raise ConfigError(f"{field}: {value!r} at the top level but {inner[field]!r} in {nested}")
            value = inner[field]
    if value is None:
        if default is None:
            raise ConfigError(f"{field}: missing from the config")
        value = default
    return value


_PATTERNS: dict[str, re.Pattern] = {}


def _name_pattern(pattern: str) -> re.Pattern:
    if pattern not in _PATTERNS:
        _PATTERNS[pattern] = re.compile(re.escape(pattern).replace(r"\{layer\}", r"(?P<layer>\d+)")
                                        .replace(r"\{expert\}", r"(?P<expert>\d+)"))
    return _PATTERNS[pattern]

