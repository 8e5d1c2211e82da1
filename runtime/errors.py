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


class UpdateRefused(TransferError):
    """An endpoint refused an update before any byte moved; every endpoint raises it
    (the refusing one its own, more precise error). No weights changed."""


class UpdateFailedElsewhere(TransferError):
    """This endpoint received and wrote all of its update, but another member of one of
    its channels did not: the update failed, this rank's weights are whole and new."""


class StaleWeightsError(RuntimeError):
    """An engine whose last update did not complete was asked to serve."""
