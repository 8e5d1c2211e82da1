"""The layouts every converter module is built from, once for all model families.

Written by hand in `compiler/_kinds.py`; `shardsync compile` copies it verbatim to
`generated/_kinds.py`, where the family modules import it. It imports only torch and
the standard library, so a trainer can vendor `generated/` alone.

A family module holds its parameter families as data: each is one of the kinds below,
naming its tensors and the config values that size it (the spec's names, not numbers).
Given a config and a TP rank, a kind answers how that rank holds the tensor on each
side, Megatron and vLLM, as `Piece`s: a box of a canonical (full HF) tensor and the box
it fills locally. The runtime plans every transfer from those pieces alone.

A kind first works out what one rank holds (how many heads, which vocab rows), names
those quantities once, and then places boxes with `span` and `row_block`. Those are the
seams along which the kinds are meant to grow into a composable vocabulary (shard a
dimension, replicate, stack parts, interleave per group, replicate beyond a count, pad
before sharding); today there are the five kinds the specs name.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

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
    """What the kinds need of a family module's `Config`, beyond its sizes.

    Kinds hold config names, so an error can name the HF field a user would change.
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


def whole(cfg: SpecConfig, name: str | None) -> Box:
    """A dimension every rank holds entirely; () for none, as a bias has no input dimension."""
    return ((0, getattr(cfg, name)),) if name else ()


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


# --- per-rank quantities ---------------------------------------------------------------


class VocabRange(NamedTuple):
    """The vocab rows one TP rank holds: `per_rank` rows from `start` of the vocab padded to
    `padded`; the first `real_rows` of them are tokens, the rest padding."""

    padded: int
    per_rank: int
    start: int
    real_rows: int


def vocab_range(vocab: int, padded: int, tp_rank: int, tp_size: int) -> VocabRange:
    per_rank = padded // tp_size
    start = tp_rank * per_rank
    return VocabRange(padded, per_rank, start, max(0, min(per_rank, vocab - start)))


class VllmHeads(NamedTuple):
    """Attention heads on one vLLM TP rank, named as QKVParallelLinear names them.

    When TP exceeds the KV heads, each KV head is held whole by `kv_head_replicas` ranks.
    """

    q_heads_per_rank: int
    kv_heads_per_rank: int
    kv_head_replicas: int
    first_kv_head: int


class MegatronGroups(NamedTuple):
    """Query groups on one Megatron TP rank: each is a KV head and the query heads that share it."""

    q_heads_per_group: int
    groups_per_rank: int
    first_group: int


# --- the kinds ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    """A parameter family: its name on each side and how it is split over TP.

    Names are patterns over `{layer}`, the global layer number, whatever the pipeline stage.
    Kinds whose Megatron and vLLM layouts agree implement `_local` for both sides.
    """

    megatron: str
    hf: tuple[str, ...]
    vllm: str | None  # None when the spec has no vLLM layout table
    stage: str  # "layer", "first" or "last": the pipeline stage that holds it

    def hf_names(self, layer: int | None) -> tuple[str, ...]:
        return tuple(name.format(layer=layer) for name in self.hf)

    def megatron_tensor(self, cfg: SpecConfig, layer: int | None, tp_rank: int, tp_size: int) -> LocalTensor:
        return self._local(self.megatron.format(layer=layer), cfg, layer, tp_rank, tp_size)

    def vllm_tensor(self, cfg: SpecConfig, layer: int | None, tp_rank: int, tp_size: int) -> LocalTensor:
        return self._local(self._vllm_name(layer), cfg, layer, tp_rank, tp_size)

    def shard_to_vllm(self, cfg: SpecConfig, shard: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """Same layout on both sides: a Megatron shard is already vLLM's tensor."""
        return shard

    def full_to_hf(self, cfg: SpecConfig, full: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (full,)

    def check_full(self, cfg: SpecConfig, name: str, full: torch.Tensor) -> None:
        check_shape(name, full, self.megatron_tensor(cfg, None, 0, 1).shape)

    def _vllm_name(self, layer: int | None) -> str:
        if self.vllm is None:
            raise ConfigError(f"{self.megatron}: the spec gives no vLLM name, so there is no vLLM layout")
        return self.vllm.format(layer=layer)

    def _local(self, name: str, cfg: SpecConfig, layer: int | None, tp_rank: int, tp_size: int) -> LocalTensor:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Replicated(Family):
    """Every TP rank holds the whole tensor (norms, biases added after a reduce)."""

    size: str

    def _local(self, name: str, cfg: SpecConfig, layer: int | None, tp_rank: int, tp_size: int) -> LocalTensor:
        box = whole(cfg, self.size)
        (hf,) = self.hf_names(layer)
        return LocalTensor(name, shape_of(box), (Piece(hf, box, box),))


@dataclasses.dataclass(frozen=True)
class RowParallel(Family):
    """Row-parallel linear: TP rank r holds column block r, all rows."""

    rows: str
    cols: str

    def _local(self, name: str, cfg: SpecConfig, layer: int | None, tp_rank: int, tp_size: int) -> LocalTensor:
        rows = whole(cfg, self.rows)
        cols_per_rank = cfg.share(self.cols, tp_size)
        (hf,) = self.hf_names(layer)
        piece = Piece(hf, rows + (span(tp_rank * cols_per_rank, cols_per_rank),), rows + ((0, cols_per_rank),))
        return LocalTensor(name, shape_of(piece.local_box), (piece,))


@dataclasses.dataclass(frozen=True)
class MergedColumnParallel(Family):
    """Gated MLP input: TP rank r holds [gate rows of r; up rows of r].

    Megatron's linear_fc1 (partition_stride 2) and vLLM's gate_up_proj agree, so a shard
    needs no conversion. The TP-1 tensor is [gate; up], which is why shards of a larger TP
    concatenated, [gate_0; up_0; gate_1; up_1], are not it.
    """

    rows: str
    cols: str | None = None

    def _local(self, name: str, cfg: SpecConfig, layer: int | None, tp_rank: int, tp_size: int) -> LocalTensor:
        rows_per_rank = cfg.share(self.rows, tp_size)
        cols = whole(cfg, self.cols)
        rows = row_block(tp_rank * rows_per_rank, rows_per_rank, cols)
        gate, up = self.hf_names(layer)
        pieces = (
            Piece(gate, rows, row_block(0, rows_per_rank, cols)),
            Piece(up, rows, row_block(rows_per_rank, rows_per_rank, cols)),
        )
        return LocalTensor(name, (2 * rows_per_rank,) + shape_of(cols), pieces)

    def full_to_hf(self, cfg: SpecConfig, full: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gate, up = full.chunk(2)
        return (gate, up)


@dataclasses.dataclass(frozen=True)
class QKVParallel(Family):
    """Attention input projection (weight or bias).

    Megatron interleaves rows per query group, [q heads of g, k_g, v_g], and TP rank r
    holds a contiguous block of groups. vLLM's qkv_proj on a rank is [q | k | v] of its
    own heads, a KV head held whole by several ranks when TP exceeds the KV heads.
    """

    heads: str
    kv_heads: str
    head_dim: str
    cols: str | None = None

    def megatron_groups(self, cfg: SpecConfig, tp_rank: int, tp_size: int) -> MegatronGroups:
        groups_per_rank = cfg.share(self.kv_heads, tp_size)
        q_heads_per_group = getattr(cfg, self.heads) // getattr(cfg, self.kv_heads)
        return MegatronGroups(q_heads_per_group, groups_per_rank, tp_rank * groups_per_rank)

    def vllm_heads(self, cfg: SpecConfig, tp_rank: int, tp_size: int) -> VllmHeads:
        q_heads_per_rank = cfg.share(self.heads, tp_size)
        total_kv_heads = getattr(cfg, self.kv_heads)
        if tp_size < total_kv_heads:
            kv_heads_per_rank, kv_head_replicas = cfg.share(self.kv_heads, tp_size), 1
        elif tp_size % total_kv_heads:
            raise ConfigError(f"tp_size={tp_size} must be a multiple of "
                              f"{cfg.hf_field(self.kv_heads)}={total_kv_heads} when larger")
        else:
            kv_heads_per_rank, kv_head_replicas = 1, tp_size // total_kv_heads
        first_kv_head = tp_rank // kv_head_replicas * kv_heads_per_rank
        return VllmHeads(q_heads_per_rank, kv_heads_per_rank, kv_head_replicas, first_kv_head)

    def megatron_tensor(self, cfg: SpecConfig, layer: int | None, tp_rank: int, tp_size: int) -> LocalTensor:
        head_dim = getattr(cfg, self.head_dim)
        groups = self.megatron_groups(cfg, tp_rank, tp_size)
        q_rows = groups.q_heads_per_group * head_dim
        group_rows = q_rows + 2 * head_dim
        cols = whole(cfg, self.cols)
        q, k, v = self.hf_names(layer)
        pieces = []
        for local in range(groups.groups_per_rank):
            group = groups.first_group + local
            top = local * group_rows
            pieces += [
                Piece(q, row_block(group * q_rows, q_rows, cols), row_block(top, q_rows, cols)),
                Piece(k, row_block(group * head_dim, head_dim, cols), row_block(top + q_rows, head_dim, cols)),
                Piece(v, row_block(group * head_dim, head_dim, cols), row_block(top + q_rows + head_dim, head_dim, cols)),
            ]
        name = self.megatron.format(layer=layer)
        return LocalTensor(name, (groups.groups_per_rank * group_rows,) + shape_of(cols), tuple(pieces))

    def vllm_tensor(self, cfg: SpecConfig, layer: int | None, tp_rank: int, tp_size: int) -> LocalTensor:
        name = self._vllm_name(layer)
        head_dim = getattr(cfg, self.head_dim)
        heads = self.vllm_heads(cfg, tp_rank, tp_size)
        q_rows = heads.q_heads_per_rank * head_dim
        kv_rows = heads.kv_heads_per_rank * head_dim
        first_kv_row = heads.first_kv_head * head_dim
        cols = whole(cfg, self.cols)
        q, k, v = self.hf_names(layer)
        pieces = (
            Piece(q, row_block(tp_rank * q_rows, q_rows, cols), row_block(0, q_rows, cols)),
            Piece(k, row_block(first_kv_row, kv_rows, cols), row_block(q_rows, kv_rows, cols)),
            Piece(v, row_block(first_kv_row, kv_rows, cols), row_block(q_rows + kv_rows, kv_rows, cols)),
        )
        return LocalTensor(name, (q_rows + 2 * kv_rows,) + shape_of(cols), pieces)

    def shard_to_vllm(self, cfg: SpecConfig, shard: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        groups = self.megatron_groups(cfg, tp_rank, tp_size)
        return torch.cat(self._split_groups(cfg, shard, groups.groups_per_rank))

    def full_to_hf(self, cfg: SpecConfig, full: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._split_groups(cfg, full, getattr(cfg, self.kv_heads))

    def _split_groups(self, cfg: SpecConfig, tensor: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
        """Megatron's per-group [q, k, v] rows regrouped as (all q, all k, all v)."""
        head_dim = getattr(cfg, self.head_dim)
        q_heads_per_group = getattr(cfg, self.heads) // getattr(cfg, self.kv_heads)
        rest = tensor.shape[1:]
        grouped = tensor.reshape(groups, (q_heads_per_group + 2) * head_dim, *rest)
        q, k, v = grouped.split([q_heads_per_group * head_dim, head_dim, head_dim], dim=1)
        return tuple(part.reshape(-1, *rest) for part in (q, k, v))


@dataclasses.dataclass(frozen=True)
class VocabParallel(Family):
    """Vocab-parallel rows (embedding, output layer), padded at the end.

    Megatron pads the vocab to a multiple of make_vocab_size_divisible_by * TP, vLLM to a
    multiple of 64; each then splits rows evenly. Padding rows have no HF partner, and the
    two paddings differ, so equal TP does not mean equal rows.
    """

    rows: str
    cols: str

    def megatron_range(self, cfg: SpecConfig, tp_rank: int, tp_size: int) -> VocabRange:
        vocab = getattr(cfg, self.rows)
        padded = round_up(vocab, cfg.make_vocab_size_divisible_by * tp_size)
        return vocab_range(vocab, padded, tp_rank, tp_size)

    def vllm_range(self, cfg: SpecConfig, tp_rank: int, tp_size: int) -> VocabRange:
        vocab = getattr(cfg, self.rows)
        padded = round_up(vocab, VLLM_VOCAB_MULTIPLE)
        if padded % tp_size:
            raise ConfigError(f"tp_size={tp_size} does not divide vLLM's padded {cfg.hf_field(self.rows)}={padded}")
        return vocab_range(vocab, padded, tp_rank, tp_size)

    def megatron_tensor(self, cfg: SpecConfig, layer: int | None, tp_rank: int, tp_size: int) -> LocalTensor:
        rows = self.megatron_range(cfg, tp_rank, tp_size)
        return self._rows(self.megatron.format(layer=layer), cfg, layer, rows)

    def vllm_tensor(self, cfg: SpecConfig, layer: int | None, tp_rank: int, tp_size: int) -> LocalTensor:
        name = self._vllm_name(layer)
        return self._rows(name, cfg, layer, self.vllm_range(cfg, tp_rank, tp_size))

    def shard_to_vllm(self, cfg: SpecConfig, shard: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """The shard's real rows, Megatron's padding dropped.

        Where they land in vLLM's rank tensor (padded differently) the shard tables say.
        """
        return shard[: self.megatron_range(cfg, tp_rank, tp_size).real_rows]

    def full_to_hf(self, cfg: SpecConfig, full: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (full[: getattr(cfg, self.rows)],)

    def check_full(self, cfg: SpecConfig, name: str, full: torch.Tensor) -> None:
        """Any Megatron padding is accepted: it depends on the TP the shards came from."""
        rows, cols = getattr(cfg, self.rows), getattr(cfg, self.cols)
        if full.dim() != 2 or full.shape[0] < rows or full.shape[1] != cols:
            raise ValueError(f"{name}: expected shape ({rows} or more padded rows, {cols}), got {tuple(full.shape)}")

    def _rows(self, name: str, cfg: SpecConfig, layer: int | None, rows: VocabRange) -> LocalTensor:
        cols = whole(cfg, self.cols)
        (hf,) = self.hf_names(layer)
        pieces = (Piece(hf, row_block(rows.start, rows.real_rows, cols), row_block(0, rows.real_rows, cols)),)
        padding = (row_block(rows.real_rows, rows.per_rank - rows.real_rows, cols),)
        return LocalTensor(name, (rows.per_rank,) + shape_of(cols),
                           pieces if rows.real_rows else (), padding if rows.real_rows < rows.per_rank else ())


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
            shapes[piece.hf_name] = tuple(stop for _, stop in piece.hf_box)
    return shapes


def resolve(cfg: SpecConfig, families: Sequence[Family], name: str, model: str) -> tuple[Family, int | None]:
    """The family and layer of a Megatron tensor name this model has."""
    for family in families:
        match = _name_pattern(family.megatron).fullmatch(name)
        if match is None:
            continue
        layer = int(match["layer"]) if "layer" in match.groupdict() else None
        if layer is not None and layer >= cfg.layers:
            raise KeyError(f"{name}: layer {layer} out of range for {cfg.hf_field('layers')}={cfg.layers}")
        return family, layer
    raise KeyError(f"{name}: not a parameter of this {model} model")


def shard_to_vllm(cfg: SpecConfig, family: Family, layer: int | None, name: str, shard: torch.Tensor,
                  tp_rank: int, tp_size: int) -> list[tuple[str, torch.Tensor]]:
    check_shape(name, shard, family.megatron_tensor(cfg, layer, tp_rank, tp_size).shape)
    return [(family._vllm_name(layer), family.shard_to_vllm(cfg, shard, tp_rank, tp_size))]


def full_to_hf(cfg: SpecConfig, family: Family, layer: int | None, name: str, full: torch.Tensor,
               layout: str | None) -> list[tuple[str, torch.Tensor]]:
    if layout != TP1:
        raise ValueError(
            f"{name}: convert_to_hf takes the whole tensor in Megatron's TP-1 layout (what megatron-core's "
            f"sharded state dict assembles); say so with layout={TP1!r}, or pass the TP shards, in rank order, to "
            f"convert_shards_to_hf(name, shards, cfg): torch.cat of TP shards is not the TP-1 layout (got layout={layout!r})")
    family.check_full(cfg, name, full)
    return list(zip(family.hf_names(layer), family.full_to_hf(cfg, full)))


def shards_to_hf(cfg: SpecConfig, family: Family, layer: int | None, name: str,
                 shards: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Each shard's pieces copied into the HF tensors, by the Megatron shard table of
    TP len(shards): what the table says is the only layout assumed."""
    if isinstance(shards, torch.Tensor) or not len(shards):
        raise ValueError(f"{name}: expected a sequence of every TP rank's shard, in rank order, "
                         f"got {'one tensor' if isinstance(shards, torch.Tensor) else 'none'}")
    tp_size = len(shards)
    locals_ = [family.megatron_tensor(cfg, layer, rank, tp_size) for rank in range(tp_size)]
    for rank, (shard, local) in enumerate(zip(shards, locals_)):
        if tuple(shard.shape) != tuple(local.shape):
            raise ValueError(f"{name}: shard {rank} of {tp_size}: expected shape {tuple(local.shape)} (TP {tp_size} "
                             f"from {tp_size} shards), got {tuple(shard.shape)}")
    shapes = hf_shapes([family.megatron_tensor(cfg, layer, 0, 1)])
    first = shards[0]
    hf = {hf_name: first.new_empty(shape) for hf_name, shape in shapes.items()}
    for shard, local in zip(shards, locals_):
        for piece in local.pieces:
            hf[piece.hf_name][_slices(piece.hf_box)] = shard[_slices(piece.local_box)]
    return [(hf_name, hf[hf_name]) for hf_name in family.hf_names(layer)]


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
        _PATTERNS[pattern] = re.compile(re.escape(pattern).replace(r"\{layer\}", r"(?P<layer>\d+)"))
    return _PATTERNS[pattern]

