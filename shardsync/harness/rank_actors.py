"""Trainer and engine ranks as local processes that take commands, for fault drills.

`shardsync chaos` and the fault tests drive ranks step by step (connect, update,
kill one mid-update, restart it, reconnect, check), which `run_ranks`' one-shot
functions cannot. Each rank is a spawned process serving commands over a pipe;
the driver never waits on one without a deadline, so a hung rank is reported as
hung. Engines hold plain tensors in vLLM's layout; weights for update `seed` are
random HF tensors cut by the shard tables, so every rank can check exactly.

Faults are injected from outside the runtime: an engine's write targets can stop
(or pause) at the first piece, saying so through a flag file, and a received bucket
can be corrupted before its checksum is checked, as a bad link would. Real vLLM
engines take the same commands (`shardsync/harness/vllm_rank.py`, role "vllm-engine").
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shardsync.runtime.plan import Layout
from shardsync.runtime.plan.build import source_table
from shardsync.harness.faults import StopAtFirstPiece, corrupt_next_bucket
from shardsync.harness.shm import mapped_segments
from shardsync.harness.tensors import materialize, random_hf_tensors
from shardsync.runtime.targets import TensorTargets


@dataclass
class RankSpec:
    who: str
    role: str  # "trainer", "engine" (plain tensors) or "vllm-engine" (a real engine, all its TP ranks)
    hf_config: dict
    layout: Layout
    options: dict = field(default_factory=dict)  # Sender/Receiver keyword options (dtype as a name)
    position: tuple[int, ...] = (0, 0)  # (pp, tp) or (pp, tp, dp) of a trainer, (engine, tp) of an engine


class RankProcess:
    """The driver's handle on one rank process."""

    def __init__(self, spec: RankSpec):
        ctx = mp.get_context("spawn")
        self.spec = spec
        # written by an engine when an injected fault reaches its first piece (a file: vLLM's
        # workers are not this process's children by inheritance)
        self.mid_update = Path(tempfile.mkdtemp(prefix="shardsync-rank-")) / "mid-update"
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(spec, child, str(self.mid_update)), name=spec.who,
                                   daemon=spec.role != "vllm-engine")  # vLLM starts processes of its own
        self.process.start()
        self.pending: str | None = None

    @property
    def who(self) -> str:
        return self.spec.who

    def send(self, command: str, *args) -> None:
        self._conn.send((command, args))
        self.pending = command

    def poll(self) -> dict | None:
        if self.pending is None:
            return None
        try:
            if self._conn.poll():
                reply = self._conn.recv()
                self.pending = None
                return reply
        except (EOFError, OSError):
            self.pending = None
            self.process.join(timeout=5)
            return {"error": f"{self.who} died (exit code {self.process.exitcode})", "died": True}
        if not self.process.is_alive():
            self.pending = None
            return {"error": f"{self.who} died (exit code {self.process.exitcode})", "died": True}
        return None

    def reached_mid_update(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.mid_update.exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def kill(self) -> None:
        """SIGKILL the rank and every process it started (a vLLM engine's core and workers)."""
        import psutil

        try:
            victims = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            victims = []
        self.process.kill()
        for child in victims:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.join(timeout=10)


def call(ranks: list[RankProcess], command: str, *args, timeout: float) -> dict[str, dict]:
    """Run `command` on every rank at once; a rank with no reply by the deadline is
    reported {"hung": True} (and keeps running: the caller decides)."""
    for rank in ranks:
        rank.send(command, *args)
    return collect(ranks, timeout)


def collect(ranks: list[RankProcess], timeout: float) -> dict[str, dict]:
    replies: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(replies) < len(ranks):
        for rank in ranks:
            if rank.who not in replies:
                reply = rank.poll()
                if reply is not None:
                    reply["at"] = time.monotonic()  # when the driver heard it
                    replies[rank.who] = reply
        if time.monotonic() > deadline:
            for rank in ranks:
                replies.setdefault(rank.who, {"error": f"{rank.who}: no reply within {timeout:.0f}s", "hung": True})
            break
        time.sleep(0.01)
    return replies


# -- inside a rank process -------------------------------------------------------------


def _serve(spec: RankSpec, conn, mid_update) -> None:
    from shardsync import log_lines

    torch.set_num_threads(1)
    log_lines.show()
    if spec.role == "vllm-engine":
        from shardsync.harness.vllm_rank import VllmEngineRank

        rank = VllmEngineRank(spec, mid_update)
    else:
        rank = _Rank(spec, mid_update)
    while True:
        try:
            command, args = conn.recv()
        except EOFError:
            return
        started = time.monotonic()
        try:
            reply = getattr(rank, command)(*args) or {}
        except BaseException as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}", "error_type": type(exc).__name__,
                     "traceback": traceback.format_exc()}
        reply["seconds"] = time.monotonic() - started
        conn.send(reply)
        if command == "close":
            return


class _Rank:
    def __init__(self, spec: RankSpec, mid_update):
        from shardsync.runtime.transfer import Receiver, Sender

        self.spec = spec
        self.mid_update = mid_update
        options = {**spec.options, "dtype": getattr(torch, spec.options.get("dtype", "float32"))}
        if spec.role == "trainer":
            pp, tp, dp = (tuple(spec.position) + (0,))[:3]
            self.end = Sender(spec.hf_config, spec.layout, pp_rank=pp, tp_rank=tp, dp_rank=dp, **options)
        else:
            engine, tp = spec.position
            self.end = Receiver(spec.hf_config, spec.layout, engine=engine, tp_rank=tp, **options)
        self.params: dict[str, torch.Tensor] | None = None

    # commands ---------------------------------------------------------------------------

    def ready(self) -> dict:
        return {}

    def connect(self) -> dict:
        self.end.connect()
        if self.spec.role == "engine" and self.params is None:
            self.params = {n: torch.zeros(s, dtype=self.end.dtype, device=self.end.device)
                           for n, s in self.end.tensor_shapes().items()}
        return {"epoch": self.end.session.epoch, "groups_created": self.end.channels_created,
                "channels": len(self.end.channels), "mappings_created": self.end.mappings_created}

    def reconnect(self) -> dict:
        before, mapped = self.end.channels_created, self.end.mappings_created
        self.end.reconnect()
        return {"epoch": self.end.session.epoch, "groups_created": self.end.channels_created - before,
                "mappings_created": self.end.mappings_created - mapped}

    def update(self, seed: int, fault: str | None = None) -> dict:
        if self.spec.role == "trainer":
            tensors, allow = self._trainer_tensors(seed, fault)
            report = self.end.update(tensors, allow_nonfinite=allow)
        else:
            report = self.end.update(self._engine_targets(fault))
        return {"update": report.update, "bytes": report.bytes}

    def state(self) -> dict:
        stale = getattr(self.end, "stale", None)
        return {"stale": stale, "updates": self.end.updates, "groups_created": self.end.channels_created,
                "mappings_created": self.end.mappings_created}

    def nonfinite(self) -> dict:
        """Engine tensors holding NaN or Inf."""
        return {"names": [n for n, t in self.params.items() if not bool(t.isfinite().all())]}

    def serve(self) -> dict:
        """What an engine does before generating: refuse stale weights."""
        self.end.check_fresh()
        return {"served": True}

    def check(self, seed: int) -> dict:
        """Engine tensors that differ from what update `seed` must leave."""
        module, cfg = self.end.module, self.end.cfg
        weights = random_hf_tensors(module.hf_shapes(cfg), seed)
        engine, tp = self.spec.position
        layout = self.spec.layout
        expected = materialize(module.vllm_shard_table(cfg, tp, layout.infer_tp, layout.infer_ep), weights, self.end.dtype)
        return {"mismatched": [n for n, t in expected.items() if not torch.equal(self.params[n].cpu(), t)]}

    def resources(self) -> dict:
        import psutil

        process = psutil.Process()
        return {"rss": process.memory_info().rss, "threads": process.num_threads(),
                "fds": len(os.listdir("/proc/self/fd")), "shm_segments": len(mapped_segments())}

    def close(self) -> dict:
        self.end.close()
        return {}

    # inputs, faults included ---------------------------------------------------------------

    def _trainer_tensors(self, seed: int, fault: str | None):
        module, cfg, layout = self.end.module, self.end.cfg, self.spec.layout
        table = source_table(module, cfg, layout, self.end.position)
        tensors = {name: tensor.to(self.end.device) for name, tensor in
                   materialize(table, random_hf_tensors(module.hf_shapes(cfg), seed), torch.float32).items()}
        # a TP- or EP-split weight: each rank sends its own (a replicated one may come from another
        # rank); an MLP's, else (a rank without experts of a model whose every MLP is experts) attention's
        victim = next((n for n in tensors if n.endswith("linear_fc1.weight")), None) or next(
            n for n in tensors if n.endswith("linear_qkv.weight"))
        allow = fault == "nan-allowed"
        if fault in ("nan", "nan-allowed"):
            tensors[victim].view(-1)[3] = float("nan")
        elif fault == "inf":
            tensors[victim].view(-1)[0] = float("inf")
        elif fault == "missing":
            del tensors[victim]
        elif fault == "extra":
            tensors["decoder.layers.99.mlp.linear_fc9.weight"] = torch.zeros(2)
        elif fault == "shape":
            tensors[victim] = tensors[victim][:-1]
        elif fault == "dtype":
            tensors[victim] = tensors[victim].to(torch.int32)
        elif fault == "duplicate":
            return list(tensors.items()) + [(victim, tensors[victim])], allow
        return tensors, allow

    def _engine_targets(self, fault: str | None):
        if fault == "dtype":
            name = next(iter(self.params))
            wrong = dict(self.params)
            wrong[name] = self.params[name].to(torch.float64)
            return wrong
        if fault in ("die", "pause"):
            return StopAtFirstPiece(TensorTargets(self.params), self.mid_update, forever=fault == "die")
        if fault == "corrupt":
            corrupt_next_bucket()
        return self.params
