"""Parallelism on both sides of a transfer: what every plan is built for.

Trainer ranks are numbered as megatron-core's rank generators number them (order
tp-cp-ep-dp-pp, context parallel 1): the dense generator over (tp, dp, pp) and the
expert generator over (etp, ep, expert-dp, pp) cover the same ranks, so one global
rank has both a dense and an expert position. A rank sends what it holds at
data-parallel rank 0 of its kind: dense tensors from dense-DP-0 ranks, experts from
expert-DP-0 ranks (with EP, those are often dense DP ranks other than 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shardsync.runtime.errors import PlanError


@dataclass(frozen=True)
class TrainerRank:
    """One trainer rank's place in both of megatron-core's rank grids."""

    rank: int  # global, in the trainer's world
    pp: int
    tp: int
    dp: int
    ep: int
    etp: int
    edp: int  # expert data parallel

    @property
    def sends_dense(self) -> bool:
        return self.dp == 0

    @property
    def sends_experts(self) -> bool:
        return self.edp == 0


@dataclass(frozen=True)
class Layout:
    """Parallelism on both sides.

    `train_ep` and `train_etp` are megatron-core's expert parallel and expert tensor
    parallel sizes (defaults 1 and `train_tp`); `train_dp` its data-parallel size
    (default: the smallest that EP x ETP allows, lcm(TP, EP x ETP) / TP). `infer_ep`
    places the engine's experts as vLLM's `enable_expert_parallel` does.
    """

    train_tp: int
    train_pp: int
    infer_tp: int
    engines: int
    train_ep: int = 1
    train_etp: int | None = None
    train_dp: int | None = None
    infer_ep: bool = False

    def __post_init__(self):
        if self.train_etp is None:
            object.__setattr__(self, "train_etp", self.train_tp)
        for name in ("train_tp", "train_pp", "infer_tp", "engines", "train_ep", "train_etp"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name} must be at least 1, got {getattr(self, name)}")
        expert_ranks = self.train_ep * self.train_etp
        if self.train_dp is None:
            object.__setattr__(self, "train_dp", math.lcm(self.train_tp, expert_ranks) // self.train_tp)
        if self.train_dp < 1:
            raise PlanError(f"train_dp must be at least 1, got {self.train_dp}")
        if (self.train_tp * self.train_dp) % expert_ranks:
            raise PlanError(f"train_ep x train_etp = {self.train_ep} x {self.train_etp} must divide train_tp x train_dp "
                            f"= {self.train_tp} x {self.train_dp} (megatron-core's expert ranks tile each stage's "
                            f"ranks); the smallest train_dp that allows it is "
                            f"{math.lcm(self.train_tp, expert_ranks) // self.train_tp}")
        if self.infer_ep and self.infer_tp < 2:
            raise PlanError("infer_ep needs infer_tp of at least 2: vLLM's expert parallelism spans the engine's TP ranks")

    @property
    def has_expert_parallelism(self) -> bool:
        return self.train_ep > 1 or self.train_etp != self.train_tp or self.infer_ep

    @property
    def world(self) -> int:
        """Trainer ranks in all: tp x dp x pp."""
        return self.train_tp * self.train_dp * self.train_pp

    def trainer(self, rank: int) -> TrainerRank:
        """A global trainer rank's dense and expert positions."""
        if not 0 <= rank < self.world:
            raise PlanError(f"trainer rank {rank} is outside the trainer's world of {self.world} "
                            f"(tp {self.train_tp} x dp {self.train_dp} x pp {self.train_pp})")
        pp, local = divmod(rank, self.train_tp * self.train_dp)
        dp, tp = divmod(local, self.train_tp)
        edp, expert_local = divmod(local, self.train_ep * self.train_etp)
        ep, etp = divmod(expert_local, self.train_etp)
        return TrainerRank(rank, pp, tp, dp, ep, etp, edp)

    def trainer_at(self, pp: int, tp: int, dp: int = 0) -> TrainerRank:
        for name, value, size in (("pp", pp, self.train_pp), ("tp", tp, self.train_tp), ("dp", dp, self.train_dp)):
            if not 0 <= value < size:
                raise PlanError(f"trainer position {name}{value} is outside train_{name}={size}")
        return self.trainer(tp + self.train_tp * (dp + self.train_dp * pp))

    @property
    def senders(self) -> tuple[TrainerRank, ...]:
        """The trainer ranks that take part in a transfer, in rank order: every rank at
        dense or expert data-parallel rank 0 (the others hold replicas)."""
        ranks = (self.trainer(r) for r in range(self.world))
        return tuple(t for t in ranks if t.sends_dense or t.sends_experts)
