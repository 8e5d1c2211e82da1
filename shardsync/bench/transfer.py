"""`shardsync bench`: the shard path and the gather baseline, on the same processes.

Every rank connects both methods once (each over its own store and groups), then
the two alternate update by update, each started together on every rank behind a
barrier, so machine noise falls on both alike. Reported per method: the median
update time (slowest trainer rank), bytes each trainer rank sent, and peak extra
memory per rank: the buffers and whole-tensor temporaries each endpoint tracks, and
the process's resident-set growth sampled during that method's updates. Engines
hold plain tensors in vLLM's layout, one set per method, compared bitwise after
every round: the bench also shows the two methods deliver the same bytes. With
`engine="vllm"` the engines are real vLLM engines (one process each, started from
dummy weights) holding a connection per method; their post-processed parameters are
compared after the first round.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import threading
import time

import torch

from shardsync.runtime.methods.base import trainer_name
from shardsync.runtime.plan import Layout
from shardsync.runtime.plan.build import source_table
from shardsync.harness.tensors import materialize, random_hf_tensors
from shardsync.harness.local_cluster import free_port, run_ranks
from shardsync.presets import model_config

METHODS = ("shard", "gather")


def run_bench(model: str, train_tp: int, train_pp: int, infer_tp: int, engines: int, bucket_mb: float = 16.0,
              repeat: int = 5, overlap: bool = True, dtype: str = "bfloat16", timeout: float = 300.0,
              engine: str = "tensors", work_dir: str = "out/bench", progress=None, train_ep: int = 1,
              train_etp: int | None = None, train_dp: int | None = None, infer_ep: bool = False) -> dict:
    """One process per sender of the trainer (`layout.senders`: with expert parallelism,
    ranks at dense DP rank above 0 too) and per engine rank (per engine with vLLM)."""
    hf_config = model_config(model)
    layout = Layout(train_tp, train_pp, infer_tp, engines, train_ep=train_ep, train_etp=train_etp,
                    train_dp=train_dp, infer_ep=infer_ep)
    ports = {"shard": free_port(), "gather": free_port(), "barrier": free_port()}
    options = {"bucket_bytes": int(bucket_mb * 2**20), "timeout": timeout, "dtype": dtype, "overlap": overlap}
    rounds = mp.get_context("spawn").Queue()
    everyone = _everyone(layout, engine)
    ranks = [(trainer_name(src), _trainer, (hf_config, layout, src.rank, ports, options, repeat, rounds, everyone))
             for src in layout.senders]
    if engine == "vllm":
        ranks += [(f"engine {e}", _vllm_engine, (hf_config, layout, e, ports, options, repeat, everyone, work_dir))
                  for e in range(engines)]
    else:
        ranks += [(f"engine {e} tp{s}", _engine, (hf_config, layout, e, s, ports, options, repeat, everyone))
                  for e in range(engines) for s in range(infer_tp)]
    results: dict = {}
    runner = threading.Thread(target=lambda: results.update(run_ranks(ranks, deadline_s=timeout * (repeat + 4),
                                                                      fail_fast_s=30)), daemon=True)
    runner.start()
    done = 0
    while runner.is_alive():
        try:
            rounds.get(timeout=0.5)
            done += 1
            if progress is not None:
                progress(done, 2 * repeat)
        except Exception:  # noqa: BLE001 - queue.Empty: nothing finished in this half second
            pass
    runner.join()
    if not results:
        raise RuntimeError("the bench ranks did not finish (see the errors above)")
    failed = {who: r["error"] for who, r in results.items() if "error" in r}
    if failed:
        raise RuntimeError("bench ranks failed:\n" + "\n".join(f"--- {who}\n{e}" for who, e in failed.items()))
    return _summary(model, layout, options, repeat, results, engine)


def _summary(model, layout, options, repeat, results, engine) -> dict:
    trainers = [results[trainer_name(src)] for src in layout.senders]
    engine_results = [r for who, r in sorted(results.items()) if who.startswith("engine")]
    per_update = {m: [max(t["seconds"][m][i] for t in trainers) for i in range(repeat)] for m in METHODS}
    median = {m: statistics.median(per_update[m]) for m in METHODS}
    return {
        "model": model, "train_tp": layout.train_tp, "train_pp": layout.train_pp, "infer_tp": layout.infer_tp,
        "engines": layout.engines, "train_ep": layout.train_ep, "train_etp": layout.train_etp,
        "train_dp": layout.train_dp, "infer_ep": layout.infer_ep,
        "trainer_ranks": [trainer_name(src) for src in layout.senders],
        "dtype": options["dtype"], "bucket_bytes": options["bucket_bytes"],
        "overlap": options["overlap"], "repeat": repeat, "engine": engine,
        "shardsync_s": median["shard"], "baseline_s": median["gather"],
        "speedup": median["gather"] / median["shard"],
        "update_s": per_update,
        "bytes_sent_per_trainer_rank": {m: [t["bytes"][m] for t in trainers] for m in METHODS},
        "trainer_peak_extra_bytes": {m: [t["tracked"][m] for t in trainers] for m in METHODS},
        "engine_peak_extra_bytes": {m: [e["tracked"][m] for e in engine_results] for m in METHODS},
        "trainer_rss_growth_bytes": {m: [t["rss"][m] for t in trainers] for m in METHODS},
        "engine_rss_growth_bytes": {m: [e["rss"][m] for e in engine_results] for m in METHODS},
        "engines_equal": all(e["equal"] for e in engine_results),
    }


def _endpoints(kind, hf_config, layout, ports, options, **position):
    from shardsync.runtime.transfer import Receiver, Sender

    cls = Sender if kind == "trainer" else Receiver
    made = {}
    for method in METHODS:
        made[method] = cls(hf_config, layout, rendezvous=f"127.0.0.1:{ports[method]}", method=method,
                           bucket_bytes=options["bucket_bytes"], timeout=options["timeout"],
                           dtype=getattr(torch, options["dtype"]), overlap=options["overlap"], **position)
        made[method].connect()
    return made


def _barrier(ports, who: str, everyone: list[str], timeout: float):
    """A group over every bench process, so both methods' updates start together."""
    from shardsync.runtime.wire.channels import create_group
    from shardsync.runtime.session import open_store

    store = open_store("127.0.0.1", ports["barrier"], who == everyone[0], timeout)
    group = create_group(store, "bench-barrier", everyone.index(who), tuple(everyone), torch.device("cpu"), timeout)

    def wait(step: str) -> None:
        group.wait(group.max_across(torch.zeros(1)), f"the bench barrier before {step}", None)

    return group, store, wait


def _order(index: int) -> tuple[str, ...]:
    """The methods in round `index`'s order: which goes first alternates, every process alike."""
    return METHODS if index % 2 == 0 else METHODS[::-1]


def _everyone(layout: Layout, engine: str) -> list[str]:
    trainers = [trainer_name(src) for src in layout.senders]
    if engine == "vllm":  # one process per engine; its TP workers are vLLM's
        return trainers + [f"engine {e}" for e in range(layout.engines)]
    return trainers + [f"engine {e} tp{s}" for e in range(layout.engines) for s in range(layout.infer_tp)]


def _trainer(hf_config, layout, rank, ports, options, repeat, rounds, everyone) -> dict:
    src = layout.trainer(rank)
    who = trainer_name(src)
    senders = _endpoints("trainer", hf_config, layout, ports, options, pp_rank=src.pp, tp_rank=src.tp, dp_rank=src.dp)
    sender = senders["shard"]
    table = source_table(sender.module, sender.cfg, layout, src)
    hf = random_hf_tensors(sender.module.hf_shapes(sender.cfg), seed=5)
    tensors = materialize(table, hf, torch.float32)  # the trainer's fp32 shards, cast to the wire dtype
    del hf
    group, _store, barrier = _barrier(ports, who, everyone, options["timeout"])
    seconds = {m: [] for m in METHODS}
    sent = {m: 0 for m in METHODS}
    rss = {m: 0 for m in METHODS}
    for index in range(repeat):
        for method in _order(index):
            barrier(f"{method} update {index + 1}")
            with _RssPeak() as peak:
                started = time.perf_counter()
                report = senders[method].update(tensors)
                seconds[method].append(time.perf_counter() - started)
            rss[method] = max(rss[method], peak.growth)
            sent[method] = report.bytes
            if who == everyone[0]:
                rounds.put(method)
    result = {"seconds": seconds, "bytes": sent, "rss": rss,
              "tracked": {m: senders[m].buffer_bytes + senders[m].peak_temp_bytes for m in METHODS}}
    for endpoint in senders.values():
        endpoint.close()
    group.close()
    return result


def _engine(hf_config, layout, engine, tp, ports, options, repeat, everyone) -> dict:
    who = f"engine {engine} tp{tp}"
    receivers = _endpoints("engine", hf_config, layout, ports, options, engine=engine, tp_rank=tp)
    dtype = getattr(torch, options["dtype"])
    params = {m: {n: torch.zeros(s, dtype=dtype) for n, s in receivers[m].tensor_shapes().items()} for m in METHODS}
    group, _store, barrier = _barrier(ports, who, everyone, options["timeout"])
    rss = {m: 0 for m in METHODS}
    equal = True
    for index in range(repeat):
        for method in _order(index):
            barrier(f"{method} update {index + 1}")
            with _RssPeak() as peak:
                receivers[method].update(params[method])
            rss[method] = max(rss[method], peak.growth)
        equal &= all(torch.equal(params["shard"][n], params["gather"][n]) for n in params["shard"])
    result = {"rss": rss, "equal": equal,
              "tracked": {m: receivers[m].buffer_bytes + receivers[m].peak_temp_bytes for m in METHODS}}
    for endpoint in receivers.values():
        endpoint.close()
    group.close()
    return result


def _vllm_engine(hf_config, layout, engine, ports, options, repeat, everyone, work_dir) -> dict:
    """A real vLLM engine with a connection per method, driven through its worker extension."""
    import json
    import os
    from pathlib import Path

    from shardsync.harness.engines import ENGINE_ENV, INSPECTABLE_EXTENSION, compare_dumps

    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    from vllm import LLM

    work = Path(work_dir).resolve() / f"engine{engine}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps({**hf_config, "torch_dtype": options["dtype"]}))
    llm = LLM(model=str(work), load_format="dummy", skip_tokenizer_init=True, dtype=options["dtype"],
              enforce_eager=True, tensor_parallel_size=layout.infer_tp, max_model_len=256, seed=0,
              enable_expert_parallel=layout.infer_ep,
              worker_extension_cls=INSPECTABLE_EXTENSION)
    try:
        for method in METHODS:
            init = {"train_tp": layout.train_tp, "train_pp": layout.train_pp, "engines": layout.engines,
                    "train_ep": layout.train_ep, "train_etp": layout.train_etp, "train_dp": layout.train_dp,
                    "engine_index": engine, "rendezvous": f"127.0.0.1:{ports[method]}",
                    "bucket_bytes": options["bucket_bytes"], "timeout": options["timeout"], "method": method}
            llm.collective_rpc("shardsync_init", args=(init,))
        group, _store, barrier = _barrier(ports, f"engine {engine}", everyone, options["timeout"])
        tracked = {m: 0 for m in METHODS}
        equal = True
        for index in range(repeat):
            for method in _order(index):
                barrier(f"{method} update {index + 1}")
                reports = llm.collective_rpc("shardsync_update", kwargs={"method": method})
                tracked[method] = max([tracked[method]] + [r["tracked_bytes"] for r in reports])
                if index == 0:
                    llm.collective_rpc("shardsync_dump", args=(str(work / method),))
            if index == 0:
                _, mismatched = compare_dumps(work / "shard", work / "gather", layout.infer_tp)
                equal = not mismatched
        llm.collective_rpc("shardsync_close")
        group.close()
    finally:
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    return {"rss": {m: None for m in METHODS}, "equal": equal, "tracked": tracked}  # RSS: in vLLM's workers


class _RssPeak:
    """The most the process's resident set grew during the block, sampled every 2 ms."""

    def __enter__(self):
        import psutil

        self._process = psutil.Process()
        self._start = self._process.memory_info().rss
        self.growth = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.growth = max(self.growth, self._process.memory_info().rss - self._start)
            self._stop.wait(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.growth = max(self.growth, self._process.memory_info().rss - self._start)
