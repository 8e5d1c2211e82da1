"""Benchmarks as commands: `shardsync bench` (methods end to end) and `bench-pack`
(pack/unpack against the device copy rate)."""
