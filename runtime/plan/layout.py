"""Parallelism on both sides of a transfer: what every plan is built for."""

from __future__ import annotations

from dataclasses import dataclass

from shardsync.runtime.errors import PlanError


@dataclass(frozen=True)
class Layout:
    """Parallelism on both sides. Source ranks are numbered pp * train_tp + tp."""

    train_tp: int
    train_pp: int
    infer_tp: int
    engines: int

    def __post_init__(self):
        for name in ("train_tp", "train_pp", "infer_tp", "engines"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def src_ranks(self) -> int:
        return self.train_tp * self.train_pp

    def src_rank(self, pp: int, tp: int) -> int:
        return pp * self.train_tp + tp

    def src_position(self, rank: int) -> tuple[int, int]:
        """(pp, tp) of a source rank."""
        return divmod(rank, self.train_tp)
