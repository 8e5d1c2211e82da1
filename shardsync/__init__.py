"""shardsync: move an RL trainer's weights into inference engines, shard to shard.

This package holds the command line and the model presets; the work is done by
`compiler` (specs -> `generated` converters) and `runtime` (plans and transfers).
"""
