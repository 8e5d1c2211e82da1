"""`shardsync transfer-demo`: the transport alone between local processes, channel by channel.

Trainer ranks hold random weights cut into their Megatron shards; engine ranks hold
plain tensors in vLLM's layout. Two updates run over the same channels; after each,
every engine tensor is compared with the shard tables' slicing of the weights.
"""

from __future__ import annotations

import time

import torch

from shardsync.runtime.methods.base import trainer_name
from shardsync.runtime.plan import Layout
from shardsync.runtime.plan.build import source_table
from shardsync.runtime.plan.summary import human_bytes
from shardsync.harness.tensors import materialize, random_hf_tensors
from shardsync.runtime.transfer import Receiver, Sender
from shardsync.harness.local_cluster import free_port, run_ranks
from shardsync.presets import model_config

UPDATES = 2


def run_demo(model: str = "qwen3-tiny", train_tp: int = 2, infer_tp: int = 2, engines: int = 2,
             dtype: str = "bfloat16", bucket_bytes: int = 1 << 20, timeout: float = 60.0, train_ep: int = 1,
             train_etp: int | None = None, train_dp: int | None = None, infer_ep: bool = False,
             method: str = "auto") -> int:
    """One process per sender of the trainer (`layout.senders`) and per engine rank."""
    hf_config = model_config(model)
    layout = Layout(train_tp, 1, infer_tp, engines, train_ep=train_ep, train_etp=train_etp, train_dp=train_dp,
                    infer_ep=infer_ep)
    options = {"rendezvous": f"127.0.0.1:{free_port()}", "bucket_bytes": bucket_bytes, "timeout": timeout,
               "dtype": dtype, "method": method}
    experts = (f" EP {layout.train_ep} ETP {layout.train_etp} DP {layout.train_dp} "
               f"({len(layout.senders)} sending ranks)" if layout.train_ep > 1 or layout.train_etp != train_tp else "")
    print(f"shardsync demo: {model}, trainer TP {train_tp}{experts} -> {engines} engines x TP {infer_tp}"
          f"{' with EP' if infer_ep else ''} (plain tensors), {dtype}, buckets of {human_bytes(bucket_bytes)}, "
          f"method {method}")
    ranks = [(trainer_name(src), _trainer, (hf_config, layout, src.rank, options)) for src in layout.senders]
    ranks += [(f"engine {e} tp{tp}", _engine, (hf_config, layout, e, tp, options))
              for e in range(engines) for tp in range(infer_tp)]
    print(f"starting {len(ranks)} processes (each imports torch first) ...", flush=True)
    started = time.monotonic()
    results = run_ranks(ranks, deadline_s=timeout * 3)
    failed = {who: r["error"] for who, r in results.items() if "error" in r}
    for who, error in failed.items():
        print(f"{who} failed:\n{error}")
    if failed:
        return 1
    trainers = [results[trainer_name(src)] for src in layout.senders]
    engine_results = [r for who, r in sorted(results.items()) if who.startswith("engine")]
    print(f"plan {trainers[0]['plan']}: {sum(t['channels'] for t in trainers)} channels, "
          f"connected in {max(t['connect_s'] for t in trainers):.2f} s")
    width = max([16] + [len(r[0]) + 1 for t in trainers for r in t["reports"][0]])  # dp in a name makes it longer
    for update in range(UPDATES):
        print(f"\nupdate {update + 1}")
        print(f"  {'channel':<{width}} {'from':<{width}} {'to':<16} {'copies':>6} {'bytes':>11} {'seconds':>8} "
              f"{'MiB/s':>8}")
        for trainer in trainers:
            for name, copies, sent, seconds in trainer["reports"][update]:
                src, dst = name.split("-to-")
                engines_to = ",".join(str(e) for e in range(engines))
                sender = "trainer " + src.replace("-", " ")
                print(f"  {name:<{width}} {sender:<{width}} {f'engine {engines_to} {dst}':<16} "
                      f"{copies:>6} {human_bytes(sent):>11} {seconds:>8.3f} {sent / seconds / 2**20:>8.1f}")
        exact = sum(1 for r in engine_results if not r["mismatches"][update])
        print(f"  engine ranks exact after the update: {exact}/{len(engine_results)}")
    at_connect = sum(r["groups_created"][0] for r in results.values())
    during = sum(r["groups_created"][1] - r["groups_created"][0] for r in results.values())
    print(f"\nchannel group memberships created: {at_connect} at connect, {during} during {UPDATES} updates "
          f"(total {time.monotonic() - started:.1f} s)")
    mapped = sum(r["mappings_created"][0] for r in results.values())
    if mapped:
        mapped_later = sum(r["mappings_created"][1] - r["mappings_created"][0] for r in results.values())
        print(f"shared buffers created or mapped: {mapped} at connect, {mapped_later} during {UPDATES} updates")
    return 0 if all(not any(r["mismatches"]) for r in engine_results) else 1


def _trainer(hf_config: dict, layout: Layout, rank: int, options: dict) -> dict:
    src = layout.trainer(rank)
    sender = Sender(hf_config, layout, pp_rank=src.pp, tp_rank=src.tp, dp_rank=src.dp, **_with_dtype(options))
    started = time.monotonic()
    sender.connect()
    connect_s = time.monotonic() - started
    after_connect, mapped = sender.channels_created, sender.mappings_created
    table = source_table(sender.module, sender.cfg, layout, src)
    reports = []
    for seed in range(UPDATES):
        weights = random_hf_tensors(sender.module.hf_shapes(sender.cfg), seed)
        report = sender.update(materialize(table, weights, torch.float32))
        reports.append([(c.name, c.copies, c.bytes, c.seconds) for c in report.channels])
    result = {"plan": sender.plan.digest[:12], "channels": len(sender.channels), "connect_s": connect_s,
              "reports": reports, "groups_created": (after_connect, sender.channels_created),
              "mappings_created": (mapped, sender.mappings_created)}
    sender.close()
    return result


def _engine(hf_config: dict, layout: Layout, engine: int, tp: int, options: dict) -> dict:
    receiver = Receiver(hf_config, layout, engine=engine, tp_rank=tp, **_with_dtype(options))
    receiver.connect()
    after_connect, mapped = receiver.channels_created, receiver.mappings_created
    dtype = receiver.dtype
    params = {name: torch.zeros(shape, dtype=dtype) for name, shape in receiver.tensor_shapes().items()}
    table = receiver.module.vllm_shard_table(receiver.cfg, tp, layout.infer_tp, layout.infer_ep)
    mismatches = []
    for seed in range(UPDATES):
        receiver.update(params)
        expected = materialize(table, random_hf_tensors(receiver.module.hf_shapes(receiver.cfg), seed), dtype)
        mismatches.append([n for n, t in expected.items() if not torch.equal(params[n], t)])
    created = receiver.channels_created
    result = {"mismatches": mismatches, "groups_created": (after_connect, created),
              "mappings_created": (mapped, receiver.mappings_created)}
    receiver.close()
    return result


def _with_dtype(options: dict) -> dict:
    return {**options, "dtype": getattr(torch, options["dtype"])}
