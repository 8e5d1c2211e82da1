"""`shardsync soak`: many consecutive updates on the same channels, checksums on.

Every update is checked exact on every engine; channels (and, colocated, shared
buffers) must be created once; and each rank's RSS, thread count, open file
descriptors and mapped shared-memory segments at the end are compared with those
right after the first update (a leak per update shows as growth).
"""

from __future__ import annotations

import time

from shardsync.runtime.methods.base import trainer_name
from shardsync.runtime.plan import Layout
from shardsync.harness.local_cluster import free_port
from shardsync.presets import model_config
from shardsync.harness.rank_actors import RankProcess, RankSpec, call

RSS_MARGIN_BYTES = 16 << 20  # allocator noise; a leak over hundreds of updates is larger


def run_soak(model: str = "qwen3-tiny", train_tp: int = 2, infer_tp: int = 1, engines: int = 2, updates: int = 200,
             timeout: float = 30.0, progress=None, train_ep: int = 1, train_etp: int | None = None,
             train_dp: int | None = None, infer_ep: bool = False, method: str = "auto") -> dict:
    """One process per sender of the trainer (`layout.senders`) and per engine rank."""
    hf_config = model_config(model)
    layout = Layout(train_tp, 1, infer_tp, engines, train_ep=train_ep, train_etp=train_etp, train_dp=train_dp,
                    infer_ep=infer_ep)
    options = {"rendezvous": f"127.0.0.1:{free_port()}", "timeout": timeout, "bucket_bytes": 1 << 16,
               "verify": True, "dtype": "float32", "method": method}
    specs = [RankSpec(trainer_name(src), "trainer", hf_config, layout, options, (src.pp, src.tp, src.dp))
             for src in layout.senders]
    specs += [RankSpec(f"engine {e} tp{tp}", "engine", hf_config, layout, options, (e, tp))
              for e in range(engines) for tp in range(infer_tp)]
    ranks = [RankProcess(spec) for spec in specs]
    engine_ranks = [r for r in ranks if r.spec.role == "engine"]
    result = {"model": model, "train_tp": train_tp, "infer_tp": infer_tp, "engines": engines,
              "train_ep": layout.train_ep, "train_etp": layout.train_etp, "train_dp": layout.train_dp,
              "infer_ep": infer_ep, "method": method, "updates": 0,
              "exact_updates": 0, "verify": True}
    try:
        connected = _ok(call(ranks, "connect", timeout=3 * timeout), "connect")
        channels_at_connect = sum(r["groups_created"] for r in connected.values())
        mappings_at_connect = sum(r["mappings_created"] for r in connected.values())
        started = time.monotonic()
        for update in range(1, updates + 1):
            _ok(call(ranks, "update", update, timeout=3 * timeout), f"update {update}")
            checks = _ok(call(engine_ranks, "check", update, timeout=3 * timeout), f"check {update}")
            result["updates"] = update
            result["exact_updates"] += all(not c["mismatched"] for c in checks.values())
            if update == 1:
                first = _ok(call(ranks, "resources", timeout=timeout), "resources")
            if progress is not None:
                progress(update)
        seconds = time.monotonic() - started
        last = _ok(call(ranks, "resources", timeout=timeout), "resources")
        states = _ok(call(ranks, "state", timeout=timeout), "state")
        channels_at_end = sum(r["groups_created"] for r in states.values())
        mappings_at_end = sum(r["mappings_created"] for r in states.values())
    finally:
        for rank in ranks:
            rank.kill()
    result.update({
        "seconds": round(seconds, 1),
        "channels_created_at_connect": channels_at_connect,
        "channels_created_during_updates": channels_at_end - channels_at_connect,
        "buffers_mapped_at_connect": mappings_at_connect,
        "buffers_mapped_during_updates": mappings_at_end - mappings_at_connect,
        "after_first_update": {who: _plain(r) for who, r in first.items()},
        "at_end": {who: _plain(r) for who, r in last.items()},
    })
    growth = {who: {k: last[who][k] - first[who][k] for k in ("rss", "threads", "fds", "shm_segments")}
              for who in first}
    result["growth"] = growth
    result["ok"] = (result["exact_updates"] == updates and result["channels_created_during_updates"] == 0
                    and result["buffers_mapped_during_updates"] == 0
                    and all(g["rss"] <= RSS_MARGIN_BYTES and g["threads"] <= 0 and g["fds"] <= 0
                            and g["shm_segments"] <= 0 for g in growth.values()))
    return result


def _ok(replies: dict, what: str) -> dict:
    failed = {who: r["error"] for who, r in replies.items() if r.get("error")}
    if failed:
        raise RuntimeError(f"soak: {what} failed: {failed}")
    return replies


def _plain(resources: dict) -> dict:
    return {k: resources[k] for k in ("rss", "threads", "fds", "shm_segments")}
