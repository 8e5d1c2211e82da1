"""Runs a real transfer: trainer and engine ranks as separate processes over gloo.

Trainer ranks hold Megatron shards cut by `tests/reference.py` from random HF
weights; engine ranks hold plain tensors in vLLM's layout. After each update every
engine tensor is compared, bitwise, with the reference slicing of the HF weights.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass

import torch

from shardsync.runtime.plan import Layout
from shardsync.runtime.transfer import Receiver, Sender
from shardsync.harness.faults import BusyDeviceTargets, SlowTargets, reuse_slots_early, slow_to_read_outcome
from shardsync.runtime.targets import TensorTargets
from shardsync.harness.local_cluster import free_port, run_ranks
from tests import reference as ref

SEEDS = (11, 23, 37)  # one per update: the trainer's weights change between updates
SLOW_READ_S = 3.0  # how long a `slow_reader` waits before reading the last update's outcomes
SLOW_PIECE_S = 0.01  # how long a "slow-reader" engine takes before each piece it writes


@dataclass(frozen=True)
class Case:
    hf_config: dict
    train_tp: int
    train_pp: int
    infer_tp: int
    engines: int
    dtype: str = "float32"
    bucket_bytes: int = 4096
    updates: int = 2
    timeout: float = 60.0
    timeouts: tuple[tuple[str, float], ...] = ()  # (who, seconds): a rank whose own timeout differs
    in_place: bool = False  # trainers write each update's values into the same tensors, as an optimizer does
    stall: str | None = None  # a rank that connects, then never takes part in an update
    method: str = "auto"
    slow_reader: str | None = None  # a rank that reads the last update's outcomes SLOW_READ_S late
    verify: bool = False
    pack_ahead: bool = False  # colocated trainers pack each whole update before the vote
    device: str = "cpu"
    faults: tuple[tuple[str, str], ...] = ()  # (who, fault of shardsync.harness.faults) injected after connect

    def slow(self, who: str) -> None:
        if who == self.slow_reader:
            slow_to_read_outcome(SLOW_READ_S, update=self.updates)
        for victim, fault in self.faults:
            if victim == who and fault == "reuse-slots-early":
                reuse_slots_early()

    def targets(self, who: str, params: dict):
        faults = {fault for victim, fault in self.faults if victim == who}
        busy = [int(f.split(":")[1]) for f in faults if f.startswith("busy-device:")]  # "busy-device:<update>"
        if busy:
            return BusyDeviceTargets(TensorTargets(params), 3 * self.timeout_of(who), quiet=busy[0] - 1)
        slow = any(fault.startswith("slow-reader") for fault in faults)
        return SlowTargets(TensorTargets(params), SLOW_PIECE_S) if slow else params

    @property
    def layout(self) -> Layout:
        return Layout(self.train_tp, self.train_pp, self.infer_tp, self.engines)

    def timeout_of(self, who: str) -> float:
        return dict(self.timeouts).get(who, self.timeout)

    def options(self, port: int, who: str) -> dict:
        return {"rendezvous": f"127.0.0.1:{port}", "bucket_bytes": self.bucket_bytes, "timeout": self.timeout_of(who),
                "dtype": getattr(torch, self.dtype), "method": self.method, "verify": self.verify,
                "pack_ahead": self.pack_ahead, "device": self.device}


def run(case: Case, allow_errors: bool = False) -> dict:
    """Run every rank of `case`; returns {who: result dict}. Raises if a rank failed,
    unless `allow_errors` (then a failed update's result is {"error", "seconds"})."""
    port = free_port()
    ranks = []  # (who, the rank's function, its arguments, which end with who: the name its options go by)
    for pp in range(case.train_pp):
        for tp in range(case.train_tp):
            who = f"trainer pp{pp} tp{tp}"
            ranks.append((who, _trainer, (case, port, pp, tp, who)))
    for e in range(case.engines):
        for tp in range(case.infer_tp):
            who = f"engine {e} tp{tp}"
            ranks.append((who, _engine, (case, port, e, tp, who)))
    collected = run_ranks(ranks, deadline_s=case.timeout * 2 + 60)
    failed = {who: r["error"] for who, r in collected.items() if r.get("error")}
    if failed and not allow_errors:
        raise AssertionError("ranks failed:\n" + "\n".join(f"--- {who}\n{err}" for who, err in failed.items()))
    return collected


def exact(results: dict, case: Case) -> tuple[dict, dict]:
    """The trainer and the engine results of a run of `case`, once every rank reported
    and every engine tensor equalled the reference after every update."""
    trainers = {who: r for who, r in results.items() if who.startswith("trainer")}
    engines = {who: r for who, r in results.items() if who.startswith("engine")}
    assert len(trainers) == case.train_tp * case.train_pp and len(engines) == case.engines * case.infer_tp
    for who, result in engines.items():
        assert result["mismatches"] == [[]] * case.updates, f"{who}: tensors differ from the reference"
    return trainers, engines


def _trainer(case: Case, port: int, pp: int, tp: int, who: str) -> dict:
    model = ref.Model.from_hf(case.hf_config)
    sender = Sender(case.hf_config, case.layout, pp_rank=pp, tp_rank=tp, **case.options(port, who))
    sender.connect()
    if case.stall == sender.who:
        return _stall(case)
    case.slow(sender.who)
    names = set(sender.local_shapes())
    reports, shards = [], {}
    for seed in SEEDS[:case.updates]:
        full = ref.megatron_full(model, ref.random_hf(model, seed), 128, case.train_tp, seed)
        values = {n: ref.megatron_shard(n, t, tp, case.train_tp).clone().to(case.device)
                  for n, t in full.items() if n in names}
        if case.in_place and shards:
            for name, value in values.items():
                shards[name].copy_(value)
        else:
            shards = values
        failed = _attempt(lambda: reports.append(sender.update(shards)))
        if failed:
            return _drained(case, failed)
    result = {
        "groups_created": sender.channels_created,
        "mappings_created": sender.mappings_created,
        "method": sender.method,
        "channels": len(sender.channels),
        "buffer_bytes": sender.buffer_bytes,
        "bytes_sent": [r.bytes for r in reports],
        "peak_temp_bytes": sender.peak_temp_bytes,
    }
    closing = time.monotonic()
    sender.close()
    result["close_seconds"] = time.monotonic() - closing
    return result


def _engine(case: Case, port: int, engine: int, tp: int, who: str) -> dict:
    model = ref.Model.from_hf(case.hf_config)
    dtype = getattr(torch, case.dtype)
    receiver = Receiver(case.hf_config, case.layout, engine=engine, tp_rank=tp, **case.options(port, who),
                        vllm_config={"forwarded": True})  # an extra keyword, as frameworks pass
    receiver.connect()
    if case.stall == receiver.who:
        return _stall(case)
    case.slow(receiver.who)
    params = {name: torch.zeros(shape, dtype=dtype, device=case.device)
              for name, shape in receiver.tensor_shapes().items()}
    targets = case.targets(receiver.who, params)
    mismatches = []
    for seed in SEEDS[:case.updates]:
        failed = _attempt(lambda: receiver.update(targets))
        if failed:
            return _drained(case, {**failed, "stale": receiver.stale})
        hf = ref.random_hf(model, seed)
        # without a vLLM layout table the engine holds full HF tensors, loaded by name
        expected = hf if receiver.loads_full_tensors else ref.vllm_rank(model, hf, tp, case.infer_tp)
        assert list(expected) == list(params)
        mismatches.append([n for n, t in expected.items() if not torch.equal(params[n].cpu(), t.to(dtype))])
    element = torch.empty((), dtype=dtype).element_size()
    result = {
        "groups_created": receiver.channels_created,
        "mappings_created": receiver.mappings_created,
        "method": receiver.method,
        "channels": len(receiver.channels),
        "buffer_bytes": receiver.buffer_bytes,
        "mismatches": mismatches,
        "peak_temp_bytes": receiver.peak_temp_bytes,
        "real_bytes": 0 if receiver.loads_full_tensors else
        sum(_real_numel(t, n, model, tp, case.infer_tp) for n, t in params.items()) * element,
    }
    closing = time.monotonic()
    receiver.close()
    result["close_seconds"] = time.monotonic() - closing
    return result


def _drained(case: Case, failed: dict) -> dict:
    """A rank's failed result, once the device work it queued before failing has run: a
    peer's stream may wait on this process's events (on the H200, with the trainers
    exiting at once, a busy engine's process hung past the harness's deadline)."""
    if case.device == "cuda":
        torch.cuda.synchronize()
    return failed


def _attempt(update) -> dict | None:
    """Run one update; a failure becomes a result with the error and how long it took."""
    started = time.monotonic()
    try:
        update()
    except Exception:
        return {"error": traceback.format_exc(), "seconds": time.monotonic() - started}
    return None


def _stall(case: Case) -> dict:
    """Stay connected but silent, as a hung peer would, until the others gave up."""
    time.sleep(case.timeout + 5)
    return {"stalled": True}


def _real_numel(tensor, name, model, tp, infer_tp) -> int:
    rows = tensor.shape[0] - ref.vllm_padding_rows(name, model, tp, infer_tp)
    return rows * (tensor.numel() // tensor.shape[0])
