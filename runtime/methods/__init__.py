"""Transfer methods: how an endpoint's share of an update reaches the engines.

Each implements `base.Method` and moves its buckets through `wire.pipe`; `choose`
picks one from what the spec offers, `build` makes it for one endpoint.
"""

from __future__ import annotations

from shardsync.runtime.errors import PlanError
from shardsync.runtime.methods.base import Context, Method
from shardsync.runtime.methods.colocated import ColocatedMethod
from shardsync.runtime.methods.gather import GatherMethod
from shardsync.runtime.methods.shard import ShardMethod

METHODS = ("auto", "shard", "gather", "colocated")
_BUILDERS = {"shard": ShardMethod, "gather": GatherMethod, "colocated": ColocatedMethod}


def choose(method: str, module) -> tuple[str, str]:
    """(method, why): the shard path wherever the spec has a vLLM layout table. Colocated
    is only ever asked for: whether trainer and engines share a host or GPU is the
    deployment's to know (a consumer on another host is refused at connect)."""
    if method not in METHODS:
        raise PlanError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "auto":
        if module.VLLM_LAYOUT:
            return "shard", f"{module.FAMILY} layout tables"
        return "gather", f"the {module.FAMILY} spec has no vLLM layout table; the engine's loader takes full tensors"
    if method in ("shard", "colocated") and not module.VLLM_LAYOUT:
        raise PlanError(f"method {method!r} needs a vLLM layout table and the {module.FAMILY} spec names no vllm "
                        f"tensors: add them, or use method 'auto' or 'gather'")
    return method, "asked for"


def build(method: str, context: Context) -> Method:
    """One endpoint's side of `method` (as `choose` returned it)."""
    if context.pack_ahead and method != "colocated":
        raise PlanError(f"pack_ahead: only the colocated method packs a whole update before the vote (its "
                        f"trainers' slots hold one); method {method!r} packs as its buckets go")
    return _BUILDERS[method](context)


__all__ = ["METHODS", "Context", "Method", "build", "choose"]
