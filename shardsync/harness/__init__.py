"""What drives the runtime in tests, drills and demos: local process clusters, rank
processes, fault injection, tiny megatron-core models on the CPU, vLLM engine helpers.
Not needed by a trainer or an engine that uses the library."""
