"""A live megatron-core model stage as a Sender's tensors."""
