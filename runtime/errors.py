"""Errors of the transfer runtime: each names what a user needs to find the fault."""

from __future__ import annotations


class PlanError(ValueError):
    """The plan is not a correct, complete transfer, or the two sides disagree on it."""


class TransferError(RuntimeError):
    """An update failed: names the channel, the peer and the update number."""


class TensorError(ValueError):
    """Local tensors handed to an update do not match the plan (names the tensor)."""


class ModelMismatchError(ValueError):
    """A live trainer model does not match the HF config it is synced as (names the field)."""
