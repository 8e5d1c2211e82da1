"""`shardsync bench`: transfer methods compared on the same processes.

Every rank connects each method once (each over its own store and groups or shared
buffers), then the methods take turns update by update (after two untimed rounds),
each started at one moment on every rank behind a barrier, and which goes first rotates,
so machine noise falls on all alike. Reported per method: the median update time
(slowest trainer rank), of which the walk over the channels; per phase of an update
(tensor checks, vote, transfer, outcome) the slowest rank's time, trainers and
engines apart; its speedup against the gather baseline, bytes each trainer rank sent,
and peak extra memory per rank: the buffers and whole-tensor temporaries each
endpoint tracks, and the process's resident-set growth sampled during that method's
updates. Engines hold plain tensors in vLLM's layout, one set per method, compared
bitwise after every round: the bench also shows the methods deliver the same bytes.
With `engine="vllm"` the engines are real vLLM engines (one process each, started
from dummy weights) holding a connection per method; their post-processed parameters
are compared after the first round.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from shardsync.runtime.methods.base import trainer_name
from shardsync.runtime.plan import Layout
from shardsync.runtime.plan.build import source_table
from shardsync.harness.tensors import materialize, random_hf_tensors
from shardsync.harness.local_cluster import free_port, run_ranks
from shardsync.presets import model_config
from shardsync.runtime.methods import choose

METHODS = ("shard", "gather", "colocated", "colocated-ahead")  # in the order they run in the first round
# what the bench compares beside the methods themselves: a method with options, asked for by name
VARIANTS = {"colocated-ahead": ("colocated", {"pack_ahead": True})}
# untimed rounds first: on CUDA a bucket's copies are captured as a graph the second time
# the same tensors come by, and replayed from the third update on
WARMUP = 2


def applicable_methods(module, device: str = "cpu") -> tuple[str, ...]:
    """Every method the spec allows (shard and colocated need its vLLM layout table).
    The bench's processes all run on this host, so colocated always applies; on CUDA
    they all share one GPU, where NCCL refuses two ranks, so only colocated does."""
    if torch.device(device).type == "cuda":
        return ("colocated",) if module.VLLM_LAYOUT else ()
    return tuple(m for m in METHODS if m not in VARIANTS and (m == "gather" or module.VLLM_LAYOUT))


def rounds_run(repeat: int, trace_dir: str | None) -> int:
    """Rounds of updates a bench runs: untimed first, timed, and the traced one last."""
    return WARMUP + repeat + (1 if trace_dir else 0)


def variant(name: str) -> tuple[str, dict]:
    """The method a bench entry runs, and the endpoint options it adds."""
    return VARIANTS.get(name, (name, {}))


def run_bench(model: str, train_tp: int, train_pp: int, infer_tp: int, engines: int, bucket_mb: float = 16.0,
              repeat: int = 5, overlap: bool = True, dtype: str = "bfloat16", timeout: float = 300.0,
              engine: str = "tensors", work_dir: str = "out/bench", progress=None, train_ep: int = 1,
              train_etp: int | None = None, train_dp: int | None = None, infer_ep: bool = False,
              methods: tuple[str, ...] | None = None, device: str = "cpu", src_dtype: str = "float32",
              trace_dir: str | None = None) -> dict:
    """One process per sender of the trainer (`layout.senders`: with expert parallelism,
    ranks at dense DP rank above 0 too) and per engine rank (per engine with vLLM).
    `methods`: which to compare (default: every method that applies to the model).
    `trace_dir`: after the timed rounds, one more, untimed, each plain-tensor rank's
    update recorded by torch's profiler into `trace_dir` (`bench.timeline` reads them)."""
    from shardsync import generated

    hf_config = model_config(model)
    layout = Layout(train_tp, train_pp, infer_tp, engines, train_ep=train_ep, train_etp=train_etp,
                    train_dp=train_dp, infer_ep=infer_ep)
    module = generated.for_architecture(hf_config["architectures"][0])
    methods = tuple(methods) if methods else applicable_methods(module, device)
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"method {method!r}: the bench compares {', '.join(METHODS)}")
        choose(variant(method)[0], module)  # refuses a method the spec cannot take
    ports = {**{m: free_port() for m in methods}, "barrier": free_port()}
    options = {"bucket_bytes": int(bucket_mb * 2**20), "timeout": timeout, "dtype": dtype, "overlap": overlap,
               "methods": methods, "device": device, "src_dtype": src_dtype, "trace_dir": trace_dir}
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
                progress(done, len(methods) * rounds_run(repeat, trace_dir))
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
    methods = options["methods"]
    trainers = [results[trainer_name(src)] for src in layout.senders]
    engine_results = [r for who, r in sorted(results.items()) if who.startswith("engine")]
    per_update = {m: [max(t["seconds"][m][i] for t in trainers) for i in range(repeat)] for m in methods}
    median = {m: statistics.median(per_update[m]) for m in methods}
    rate = trainers[0]["copy_Bps"]
    # every byte a method copies on this device: each trainer rank packs its bytes once, and
    # (shard to shard) each engine rank unpacks what it received; the gather path copies more
    copied = {m: sum(t["bytes"][m] for t in trainers) * (1 + layout.engines) for m in methods}
    return {
        "model": model, "train_tp": layout.train_tp, "train_pp": layout.train_pp, "infer_tp": layout.infer_tp,
        "engines": layout.engines, "train_ep": layout.train_ep, "train_etp": layout.train_etp,
        "train_dp": layout.train_dp, "infer_ep": layout.infer_ep,
        "trainer_ranks": [trainer_name(src) for src in layout.senders],
        "dtype": options["dtype"], "src_dtype": options["src_dtype"], "bucket_bytes": options["bucket_bytes"],
        "overlap": options["overlap"], "repeat": repeat, "engine": engine, "methods": list(methods),
        "update_s": median,
        "update_s_each": per_update,
        "walk_s": {m: statistics.median(max(t["walked"][m][i] for t in trainers) for i in range(repeat))
                   for m in methods},
        "phase_s": {m: {"trainer": _phase_medians(trainers, m, repeat),
                        "engine": _phase_medians([e for e in engine_results if "phases" in e], m, repeat)}
                    for m in methods},
        "speedup_vs_gather": {m: median["gather"] / median[m] for m in methods} if "gather" in median else {},
        "bytes_sent_per_trainer_rank": {m: [t["bytes"][m] for t in trainers] for m in methods},
        "trainer_peak_extra_bytes": {m: [t["tracked"][m] for t in trainers] for m in methods},
        "engine_peak_extra_bytes": {m: [e["tracked"][m] for e in engine_results] for m in methods},
        "trainer_rss_growth_bytes": {m: [t["rss"][m] for t in trainers] for m in methods},
        "engine_rss_growth_bytes": {m: [e["rss"][m] for e in engine_results] for m in methods},
        "engines_equal": all(e["equal"] for e in engine_results),
        "device": options["device"],
        "copy_rate_GBps": rate / 1e9,
        "copy_bound_s": {m: copied[m] / rate for m in methods if m != "gather"},
        "update_vs_copy_bound": {m: copied[m] / rate / median[m] for m in methods if m != "gather"},
    }


def _phase_medians(ranks: list[dict], method: str, repeat: int) -> dict[str, float]:
    """Per phase of an update, the median over the timed updates of the slowest rank's
    seconds in it (empty for engines that report none: vLLM's workers)."""
    if not ranks:
        return {}
    names = list(ranks[0]["phases"][method][0])
    return {name: statistics.median(max(r["phases"][method][i].get(name, 0.0) for r in ranks) for i in range(repeat))
            for name in names}


def _endpoints(kind, hf_config, layout, ports, options, **position):
    from shardsync.runtime.transfer import Receiver, Sender

    cls = Sender if kind == "trainer" else Receiver
    made = {}
    for name in options["methods"]:
        method, extra = variant(name)
        made[name] = cls(hf_config, layout, rendezvous=f"127.0.0.1:{ports[name]}", method=method,
                         bucket_bytes=options["bucket_bytes"], timeout=options["timeout"],
                         dtype=getattr(torch, options["dtype"]), overlap=options["overlap"],
                         device=options["device"], **extra, **position)
        made[name].connect()
    return made


START_LEAD_S = 0.002  # from the barrier's last arrival to the common start: more than its release takes


def _barrier(ports, who: str, everyone: list[str], timeout: float):
    """A group over every bench process, so that every update starts at once everywhere.

    A collective releases its members a few tenths of a millisecond apart, each out of a
    sleep; timed from there, the first one out would count the others' wake-up as its
    update's time. So the barrier agrees on a start (its last arrival, on the host's
    monotonic clock, which every bench process shares, plus START_LEAD_S) and each
    process spins until then: every rank starts the update at the same moment, awake,
    as a trainer does coming from its optimizer step."""
    from shardsync.runtime.wire.channels import create_group
    from shardsync.runtime.session import open_store

    store = open_store("127.0.0.1", ports["barrier"], who == everyone[0], timeout)
    group = create_group(store, "bench-barrier", everyone.index(who), tuple(everyone), torch.device("cpu"), timeout)

    def wait(step: str) -> None:
        arrived = torch.tensor([time.monotonic()], dtype=torch.float64)
        group.wait(group.max_across(arrived), f"the bench barrier before {step}", None)
        start = float(arrived.item()) + START_LEAD_S
        while time.monotonic() < start:
            pass

    return group, store, wait


def _order(methods: tuple[str, ...], index: int) -> tuple[str, ...]:
    """The methods in round `index`'s order: which goes first rotates, every process alike."""
    turn = index % len(methods)
    return methods[turn:] + methods[:turn]


def _everyone(layout: Layout, engine: str) -> list[str]:
    trainers = [trainer_name(src) for src in layout.senders]
    if engine == "vllm":  # one process per engine; its TP workers are vLLM's
        return trainers + [f"engine {e}" for e in range(layout.engines)]
    return trainers + [f"engine {e} tp{s}" for e in range(layout.engines) for s in range(layout.infer_tp)]


def _trainer(hf_config, layout, rank, ports, options, repeat, rounds, everyone) -> dict:
    src = layout.trainer(rank)
    who = trainer_name(src)
    senders = _endpoints("trainer", hf_config, layout, ports, options, pp_rank=src.pp, tp_rank=src.tp, dp_rank=src.dp)
    sender = next(iter(senders.values()))
    table = source_table(sender.module, sender.cfg, layout, src)
    hf = random_hf_tensors(sender.module.hf_shapes(sender.cfg), seed=5, device=options["device"])
    tensors = materialize(table, hf, getattr(torch, options["src_dtype"]))  # the trainer's shards, cast on the wire
    del hf
    group, _store, barrier = _barrier(ports, who, everyone, options["timeout"])
    copy_rate = _copy_rate(options["device"], getattr(torch, options["dtype"])) if src.rank == 0 else 0.0
    methods = options["methods"]
    seconds = {m: [] for m in methods}
    walked = {m: [] for m in methods}  # of which moving the bytes (the channels' walk), the rest is the session
    phases = {m: [] for m in methods}  # each timed update's seconds per phase (UpdateReport.phases)
    sent = {m: 0 for m in methods}
    rss = {m: 0 for m in methods}
    for index in range(rounds_run(repeat, options["trace_dir"])):
        for method in _order(methods, index):
            with _traced(options, index, repeat, method, who):  # (started before the barrier: it takes a while)
                barrier(f"{method} update {index + 1}")
                with _RssPeak(watching=index < WARMUP) as peak:
                    started = time.perf_counter()
                    report = senders[method].update(tensors)
                    elapsed = time.perf_counter() - started
            if WARMUP <= index < WARMUP + repeat:
                seconds[method].append(elapsed)
                walked[method].append(sum(c.seconds for c in report.channels))
                phases[method].append(report.phases)
            rss[method] = max(rss[method], peak.growth)
            sent[method] = report.bytes
            if who == everyone[0]:
                rounds.put(method)
    result = {"seconds": seconds, "walked": walked, "phases": phases, "bytes": sent, "rss": rss, "copy_Bps": copy_rate,
              "tracked": {m: senders[m].buffer_bytes + senders[m].peak_temp_bytes for m in methods}}
    for endpoint in senders.values():
        endpoint.close()
    group.close()
    return result


def _engine(hf_config, layout, engine, tp, ports, options, repeat, everyone) -> dict:
    who = f"engine {engine} tp{tp}"
    receivers = _endpoints("engine", hf_config, layout, ports, options, engine=engine, tp_rank=tp)
    dtype = getattr(torch, options["dtype"])
    methods = options["methods"]
    params = {m: {n: torch.zeros(s, dtype=dtype, device=options["device"])
                  for n, s in receivers[m].tensor_shapes().items()} for m in methods}
    group, _store, barrier = _barrier(ports, who, everyone, options["timeout"])
    rss = {m: 0 for m in methods}
    phases = {m: [] for m in methods}
    equal = True
    first = params[methods[0]]
    for index in range(rounds_run(repeat, options["trace_dir"])):
        for method in _order(methods, index):
            with _traced(options, index, repeat, method, who):
                barrier(f"{method} update {index + 1}")
                with _RssPeak(watching=index < WARMUP) as peak:
                    report = receivers[method].update(params[method])
            rss[method] = max(rss[method], peak.growth)
            if WARMUP <= index < WARMUP + repeat:
                phases[method].append(report.phases)
        equal &= all(torch.equal(params[m][n], first[n]) for m in methods[1:] for n in first)
    result = {"rss": rss, "equal": equal, "phases": phases,
              "tracked": {m: receivers[m].buffer_bytes + receivers[m].peak_temp_bytes for m in methods}}
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
    methods = options["methods"]
    try:
        for method in methods:
            init = {"train_tp": layout.train_tp, "train_pp": layout.train_pp, "engines": layout.engines,
                    "train_ep": layout.train_ep, "train_etp": layout.train_etp, "train_dp": layout.train_dp,
                    "engine_index": engine, "rendezvous": f"127.0.0.1:{ports[method]}",
                    "bucket_bytes": options["bucket_bytes"], "timeout": options["timeout"],
                    "method": variant(method)[0]}  # (an engine takes no option of a variant's: they are the trainer's)
            llm.collective_rpc("shardsync_init", args=(init,))
        group, _store, barrier = _barrier(ports, f"engine {engine}", everyone, options["timeout"])
        tracked = {m: 0 for m in methods}
        equal = True
        for index in range(rounds_run(repeat, options["trace_dir"])):  # (its workers are not traced)
            for method in _order(methods, index):
                barrier(f"{method} update {index + 1}")
                reports = llm.collective_rpc("shardsync_update", kwargs={"method": method})
                tracked[method] = max([tracked[method]] + [r["tracked_bytes"] for r in reports])
                if index == 0:
                    llm.collective_rpc("shardsync_dump", args=(str(work / method),))
            if index == 0:
                equal = not any(compare_dumps(work / m, work / methods[0], layout.infer_tp)[1] for m in methods[1:])
        llm.collective_rpc("shardsync_close")
        group.close()
    finally:
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    return {"rss": {m: None for m in methods}, "equal": equal, "tracked": tracked}  # RSS: in vLLM's workers


@contextmanager
def _traced(options: dict, index: int, repeat: int, method: str, who: str):
    """The traced round's update recorded by torch's profiler (host ranges, and the
    device's kernels on CUDA) into `<trace_dir>/<method>/<who>.json`."""
    if not options["trace_dir"] or index < WARMUP + repeat:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if options["device"].startswith("cuda") else [])
    with profile(activities=activities) as recorded:
        if options["device"].startswith("cuda"):  # the profiler takes its first device buffer here, not in the update
            torch.ones(1, device=options["device"]).add_(1)
            torch.cuda.synchronize(options["device"])
        yield
    folder = Path(options["trace_dir"]) / method
    folder.mkdir(parents=True, exist_ok=True)
    recorded.export_chrome_trace(str(folder / f"{who.replace(' ', '-')}.json"))


def _copy_rate(device: str, dtype: torch.dtype, nbytes: int = 1 << 30) -> float:
    """Bytes per second of one plain contiguous copy on `device` (median of 5), measured
    while the other bench processes wait at the barrier: the ceiling of every copy here."""
    device = torch.device(device)
    elements = nbytes // torch.empty((), dtype=dtype).element_size()
    if device.type == "cpu":
        elements //= 8  # a copy the size of a bucket or two, not of a GPU's memory
    source = torch.ones(elements, dtype=dtype, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        target.copy_(source)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return source.numel() * source.element_size() / statistics.median(times[1:])


class _RssPeak:
    """The most the process's resident set grew during the block: sampled every 2 ms by a
    thread where `watching` (the bench watches its untimed rounds, the first of which
    touches every buffer an update needs), else only compared at the block's ends. The
    thread wakes 500 times a second in every bench process, and timed updates it
    watched were 6-10% slower on the CPU (bench/RESULTS.md)."""

    def __init__(self, watching: bool = True):
        self.watching = watching

    def __enter__(self):
        import psutil

        self._process = psutil.Process()
        self._start = self._process.memory_info().rss
        self.growth = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True) if self.watching else None
        if self._thread is not None:
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.growth = max(self.growth, self._process.memory_info().rss - self._start)
            self._stop.wait(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.growth = max(self.growth, self._process.memory_info().rss - self._start)
