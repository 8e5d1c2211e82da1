"""Where the runtime meets the frameworks: a megatron-core model as a source, and
vLLM (weight-transfer backend, plugin, worker extension, parameter targets) as a
destination. Each imports its framework only when used."""
