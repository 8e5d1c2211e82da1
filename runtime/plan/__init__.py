"""Planning a transfer: pure Python over shapes and boxes, no tensor and no process.

From the generated shard tables, `build_plan` works out which box of which trainer
tensor goes to which engine tensor, checks that every destination element is written
exactly once, and hashes the result so that every endpoint can compare plans before a
byte moves. Bucket schedules and summaries are computed from the plan alone.
"""

from shardsync.runtime.plan.build import Channel, Copy, Plan, build_plan, plan_digest
from shardsync.runtime.plan.layout import Layout

__all__ = ["Channel", "Copy", "Layout", "Plan", "build_plan", "plan_digest"]
