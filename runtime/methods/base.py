"""The interface every transfer method implements, and what each is built from.

An endpoint (`runtime/transfer.py`) owns the session: the plan agreement, the vote
and the outcome of every update, staleness and errors. A method owns the bytes:
what it planned (its digest), what connects this endpoint to its peers (groups, or
buffers shared on one host), the buffers buckets go through, and the per-update
loops. The endpoint never asks which method it holds: it builds one from a
`Context`, agrees on its digest, connects it, and calls `send` or `receive`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import torch

from shardsync.runtime.plan import Layout, Plan
from shardsync.runtime.plan.build import source_label
from shardsync.runtime.plan.layout import TrainerRank
from shardsync.runtime.reports import ChannelReport, Receipt
from shardsync.runtime.wire.channels import Channels, PeerWatch
from shardsync.runtime.wire.pipe import BucketPipe


def trainer_name(src: TrainerRank) -> str:
    return f"trainer {source_label(src)}"


def engine_name(engine: int, tp: int) -> str:
    return f"engine {engine} tp{tp}"


@dataclass(frozen=True)
class Context:
    """Where an endpoint sits and what shapes its wire: everything a method needs,
    so that no method reads its endpoint."""

    module: object  # the generated converter module of the model family
    cfg: object  # its config, from the HF config
    layout: Layout
    plan: Plan | None  # None for a spec without a vLLM layout table
    trainer: TrainerRank | None  # on a trainer rank, its dense and expert positions, else None
    engine: tuple[int, int] | None  # (engine, tp) on an engine rank, else None
    dtype: torch.dtype  # on the wire
    device: torch.device
    capacity: int  # elements of `dtype` per bucket
    timeout: float
    verify: bool  # a checksum per bucket
    overlap: bool  # pack bucket k+1 while bucket k is on the wire
    pack_ahead: bool  # this endpoint, a colocated trainer, packs each whole update before the vote into its slots
    channel_options: dict  # forwarded to channel creation (the address to listen on, a framework's extras)


@dataclass(frozen=True)
class PackedAhead:
    """A trainer rank's share of an update, packed before its vote (`Method.pack_ahead`)."""

    flag: torch.Tensor  # int32 [1], raised by the packs where they read a NaN or Inf
    # where the engines' copies are gated on the device by the flags (`wire.device_gate`): whether the packs
    # found a NaN or Inf, read after the vote (it waits for them: TimeoutError past the timeout); None where
    # the flag must be read before the vote (`FiniteCheck.read`)
    after_vote: Callable[[], bool] | None = None


class Method(Protocol):
    """One endpoint's side of a transfer method, built once and kept across reconnects."""

    @property
    def digest(self) -> str:
        """What every endpoint must have planned alike; compared at connect."""

    @property
    def channels(self) -> Mapping[str, object]:
        """What connects this endpoint to its peers now, by name (empty when closed)."""

    @property
    def channels_created(self) -> int:
        """Channels or buffers created by every connect so far; an update creates none."""

    @property
    def mappings_created(self) -> int:
        """Shared buffers (and interprocess events) created or mapped by every connect
        so far: the colocated method's; an update maps none."""

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the persistent bucket buffers."""

    @property
    def peak_temp_bytes(self) -> int:
        """The most bytes of whole tensors held at once beyond the buffers."""

    def connect(self, store, watch: PeerWatch) -> None:
        """Create this endpoint's channels (or buffers) over the rendezvous store; `watch`
        (the session) names the peers that went silent when a wait fails, and tells a
        wait that lasts whether the update already failed elsewhere."""

    def pack_ahead(self, tensors: Mapping[str, torch.Tensor], update: int, nonfinite_allowed: bool = False,
                   vet: Callable[[tuple[str, ...]], None] | None = None) -> PackedAhead | None:
        """A trainer rank's whole share of `update` packed before the vote, where the
        method was built to (no reader sees it before `send`), and how to learn whether
        its packs read a NaN or Inf: a flag read before the vote, which its reader
        lowers again (`FiniteCheck.read`; one left raised by packs whose update ended
        before the read is a false alarm the endpoint's exact search clears), or, where
        the engines' copies are gated on the device by it, a read after the vote.
        `nonfinite_allowed`: the packs raise no flag the engines would gate on. `vet`:
        called with the names of the tensors each pack reads, before it reads them;
        what it raises stops the packing and leaves this method. None where nothing was
        packed ahead: the endpoint checks the tensors itself."""

    def send(self, tensors: Mapping[str, torch.Tensor], update: int) -> tuple[ChannelReport, ...]:
        """A trainer rank's share of `update`; raises TransferError naming channel,
        peer and update if it did not reach every receiver intact."""

    def receive(self, sink, update: int) -> Receipt:
        """An engine rank's share of `update`, written into `sink` (counted targets, or
        the engine's loader for full tensors); reports, does not judge."""

    def close(self) -> None:
        """Release the channels (or buffers' handles); a later connect re-creates them."""


class OverChannels:
    """What a method that moves its buckets over channels holds and counts: its groups
    (`channels`, created at connect) and its two bucket buffers (`pipe`)."""

    channels: Channels
    pipe: BucketPipe
    mappings_created = 0  # nothing shared: every byte goes over a channel

    @property
    def channels_created(self) -> int:
        return self.channels.created

    @property
    def buffer_bytes(self) -> int:
        return self.pipe.nbytes

    def pack_ahead(self, tensors, update: int, nonfinite_allowed: bool = False, vet=None) -> None:
        return None  # packed as the buckets go

    def close(self) -> None:
        self.channels.close()
