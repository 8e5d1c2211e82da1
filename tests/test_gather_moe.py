"""Mixture-of-experts layouts end to end, every method on the same processes.

Each layout runs every sender of the trainer (`layout.senders`: with expert
parallelism, ranks at dense DP rank above 0 too) and every engine rank as its own
process; each process connects a shard, a gather and a colocated endpoint (shared
memory on this host) and runs two updates on each. Trainers hand over their tables' tensors cut from random HF weights; every engine
tensor must equal, bitwise, what vLLM's table of that rank takes from those weights
(experts of other EP ranks left out under engine expert parallelism).
"""

from __future__ import annotations

import pytest
import torch

from shardsync.harness.local_cluster import free_port, run_ranks
from shardsync.harness.tensors import materialize, random_hf_tensors
from shardsync.presets import model_config
from shardsync.runtime.methods.gather import gather_groups
from shardsync.runtime.plan import Layout

METHODS = ("shard", "gather", "colocated")
SEEDS = (11, 23)
BUCKET_BYTES = 4096

LAYOUTS = {
    "qwen3-moe TP2 EP2 ETP1 -> 2x TP2": ("qwen3-moe-tiny", Layout(2, 1, 2, 2, train_ep=2, train_etp=1)),
    "qwen3-moe 6 experts TP1 EP2 -> TP4 EP": ("qwen3-moe-tiny-6e", Layout(1, 1, 4, 1, train_ep=2, infer_ep=True)),
    "qwen2-moe shared TP2 ETP2 PP2 -> TP1": ("qwen2-moe-tiny", Layout(2, 2, 1, 1, train_etp=2)),
    "mixtral EP2 -> TP2": ("mixtral-tiny", Layout(1, 1, 2, 1, train_ep=2)),
    # expert TP then EP, and dense-DP-1 senders in both expert gathers
    "qwen3-moe TP2 EP2 ETP2 DP2 -> TP2": ("qwen3-moe-tiny", Layout(2, 1, 2, 1, train_ep=2, train_etp=2)),
}


def _options(ports: dict, method: str) -> dict:
    return {"rendezvous": f"127.0.0.1:{ports[method]}", "bucket_bytes": BUCKET_BYTES, "timeout": 60.0,
            "dtype": torch.float32, "method": method}


def _trainer(model: str, layout: Layout, rank: int, ports: dict) -> dict:
    from shardsync.runtime.transfer import Sender

    hf_config, me = model_config(model), layout.trainer(rank)
    senders = {m: Sender(hf_config, layout, pp_rank=me.pp, tp_rank=me.tp, dp_rank=me.dp, **_options(ports, m))
               for m in METHODS}
    result = {m: {"sent": []} for m in METHODS}
    for method, sender in senders.items():
        sender.connect()
        module, cfg = sender.module, sender.cfg
        for seed in SEEDS:
            from shardsync.runtime.plan.build import source_table

            table = source_table(module, cfg, layout, me)
            tensors = materialize(table, random_hf_tensors(module.hf_shapes(cfg), seed), torch.float32)
            result[method]["sent"].append(sender.update(tensors).bytes)
        result[method].update(peak=sender.peak_temp_bytes, channels=sorted(sender.channels),
                              created=sender.channels_created, buffers=sender.buffer_bytes)
        sender.close()
    return result


def _engine(model: str, layout: Layout, engine: int, tp: int, ports: dict) -> dict:
    from shardsync.runtime.transfer import Receiver

    hf_config = model_config(model)
    result = {}
    for method in METHODS:
        receiver = Receiver(hf_config, layout, engine=engine, tp_rank=tp, **_options(ports, method))
        receiver.connect()
        module, cfg = receiver.module, receiver.cfg
        params = {n: torch.zeros(s) for n, s in receiver.tensor_shapes().items()}
        table = module.vllm_shard_table(cfg, tp, layout.infer_tp, layout.infer_ep)
        mismatched = []
        for seed in SEEDS:
            receiver.update(params)
            expected = materialize(table, random_hf_tensors(module.hf_shapes(cfg), seed), torch.float32)
            assert list(expected) == list(params)
            mismatched.append([n for n, t in expected.items() if not torch.equal(params[n], t)])
        result[method] = {"mismatched": mismatched, "peak": receiver.peak_temp_bytes,
                          "created": receiver.channels_created, "channels": sorted(receiver.channels),
                          "buffers": receiver.buffer_bytes}
        receiver.close()
    return result


@pytest.mark.parametrize("model,layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_every_method_delivers_exactly_what_the_tables_say(model, layout):
    ports = {m: free_port() for m in METHODS}
    ranks = [(f"trainer {s.rank}", _trainer, (model, layout, s.rank, ports)) for s in layout.senders]
    ranks += [(f"engine {e} tp{t}", _engine, (model, layout, e, t, ports))
              for e in range(layout.engines) for t in range(layout.infer_tp)]
    results = run_ranks(ranks, deadline_s=240, fail_fast_s=30)
    failed = {who: r["error"] for who, r in results.items() if "error" in r}
    assert not failed, "\n".join(f"--- {who}\n{e}" for who, e in failed.items())

    engines = {who: r for who, r in results.items() if who.startswith("engine")}
    for who, result in engines.items():
        for method in METHODS:
            assert result[method]["mismatched"] == [[]] * len(SEEDS), (who, method)
    for who, result in results.items():
        for method in METHODS:  # made at connect, none by the updates; two buffers at most
            assert result[method]["created"] == len(result[method]["channels"]) >= 1, (who, method)
            assert result[method]["buffers"] <= 2 * BUCKET_BYTES, (who, method)
        assert result["shard"]["peak"] == result["colocated"]["peak"] == 0, who

    model_config_ = model_config(model)
    from shardsync import generated

    module = generated.for_architecture(model_config_["architectures"][0])
    cfg = module.config_from_hf(model_config_)
    largest_expert = max(torch.Size(shape).numel() for name, shape in module.hf_shapes(cfg).items()
                         if ".experts." in name) * 4
    for sender in layout.senders:
        result = results[f"trainer {sender.rank}"]
        broadcaster = sender == layout.trainer_at(sender.pp, 0, 0)
        groups = [name for name, members in gather_groups(layout, sender.pp, True) if sender in members]
        assert result["gather"]["channels"] == sorted(groups + ([f"broadcast-pp{sender.pp}"] if broadcaster else []))
        if broadcaster:  # every expert of the stage reached it whole, and went out whole
            assert result["gather"]["peak"] >= layout.train_ep * largest_expert, sender
            assert all(b > 0 for b in result["gather"]["sent"]), sender
        else:
            assert result["gather"]["sent"] == [0] * len(SEEDS), sender
            assert result["gather"]["peak"] > 0, sender  # it gathered too
        for method in ("shard", "colocated"):  # every sender sends its own bytes
            assert all(b > 0 for b in result[method]["sent"]), (sender, method)
