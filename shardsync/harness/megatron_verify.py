"""One megatron-core trainer rank of `shardsync verify --source megatron`.

Every rank of the layout's world runs it, senders or not: a training step and the
gather path are collectives over the whole trainer (with EP, expert tokens cross
dense-DP ranks), so a replica-only rank must step with the others even though it
sends nothing. Rank 0 writes the reference checkpoint through the gather path
(megatron-core's own sharded state dict, independent of the shard tables) before
each update: the engines' fresh loads of it are what the transfer is judged by.
"""

from __future__ import annotations

from pathlib import Path

import torch

BATCH_SHAPE = (4, 12)
ADVANTAGES = [1.0, -0.5, 0.25, -1.0]


def megatron_verify_rank(hf_config: dict, layout, rank: int, dist_port: int, port: int, checkpoints: list[str],
                         dtype: str, timeout: float, method: str = "auto") -> dict:
    """Global trainer rank `rank` of `layout`: before each update one optimizer step on a
    fixed batch (the same on every rank, so DP replicas stay equal), then rank 0 writes
    `checkpoints[i]`, then the senders send. Returns the channels its Sender created at
    connect and during the updates (0 and 0 on a replica-only rank)."""
    from shardsync.harness.engines import write_checkpoint
    from shardsync.harness.megatron_gather import gather_hf_state
    from shardsync.harness.megatron_policy import PolicyRank

    policy = PolicyRank.for_layout(hf_config, layout, rank, dist_port, timeout_s=timeout)
    source = policy.source
    sender = None
    if source.is_sender:
        sender = source.sender(layout.infer_tp, layout.engines, layout.infer_ep, rendezvous=f"127.0.0.1:{port}",
                               dtype=getattr(torch, dtype), timeout=timeout, verify=True, method=method)
        sender.connect()
    after_connect = sender.channels_created if sender is not None else 0
    mapped = sender.mappings_created if sender is not None else 0
    generator = torch.Generator().manual_seed(7)
    vocab = int(hf_config["vocab_size"])
    for path in checkpoints:
        sequences = torch.randint(0, vocab, BATCH_SHAPE, generator=generator).tolist()
        policy.train_step(sequences, [4] * len(sequences), advantages=ADVANTAGES)
        with policy.device_context():
            full = gather_hf_state(policy.model, source.module, source.cfg)
        if full is not None:
            write_checkpoint(Path(path), hf_config, full)
        if sender is not None:
            sender.update(source.tensors())
    if sender is None:
        return {"groups_created": 0, "groups_during_updates": 0, "mappings_created": 0, "mappings_during_updates": 0,
                "sender": False}
    result = {"groups_created": after_connect, "groups_during_updates": sender.channels_created - after_connect,
              "mappings_created": mapped, "mappings_during_updates": sender.mappings_created - mapped, "sender": True}
    sender.close()
    return result
