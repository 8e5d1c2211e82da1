"""vLLM as a destination: the `shardsync` weight-transfer backend, its plugin, a
worker extension for `collective_rpc`, and the targets that write into vLLM's
parameters (restoring and re-processing packed layers)."""
