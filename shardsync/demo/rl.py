"""`shardsync demo` (what `make demo` runs): the RL loop, step by step, with its evidence.

Runs `shardsync.demo.rl_loop` (megatron-core trainer ranks and vLLM engines on Ray),
prints one row per step as it ends, and writes `summary.json` and `plot.png`. The
train/rollout logprob gap is the end-to-end check of every sync: in float32 it must
stay flat and tiny; a broken sync shows up as a gap that grows.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from shardsync.runtime.plan.summary import human_bytes
from shardsync.demo.rl_loop import LoopConfig, RLLoop, StepRecord, loop_layout

FLOAT32_BOUND = 1e-4
_COLUMNS = (f"{'step':>4} {'sync s':>8} {'moved':>10} {'|dlogp| mean':>13} {'|dlogp| max':>12} {'channels':>8} "
            f"{'reward':>7}")


def run_demo(config: LoopConfig, out_dir: str = "out/demo", log=print) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = loop_layout(config)
    expert_parallel = layout.train_ep > 1 or layout.train_etp != layout.train_tp
    experts = f" EP {layout.train_ep} ETP {layout.train_etp}" if expert_parallel else ""
    log(f"shardsync demo: {config.model}, megatron-core trainer TP {layout.train_tp}{experts} DP {layout.train_dp} "
        f"PP {layout.train_pp} ({layout.world} ranks, {len(layout.senders)} sending) -> {config.engines} vLLM "
        f"engine(s) x TP {config.infer_tp}, {config.dtype}, {config.steps} steps (Ray), method {config.method}")
    log("starting Ray, the trainer ranks and the engines (about a minute on a small CPU machine) ...")
    started = time.monotonic()
    records: list[StepRecord] = []
    initial: dict = {}
    error = None
    try:
        loop = RLLoop(config, out, log=log)
    except Exception as exc:  # noqa: BLE001 - reported in one line; Ray is already shut down
        log(f"shardsync demo: could not start: {type(exc).__name__}: {_last_line(exc)}")
        return 1
    try:
        sync_s, moved, channels = loop.sync()
        log(f"initial sync (engines start from dummy weights): {sync_s:.2f} s, {human_bytes(moved)}, "
            f"{channels} channels created")
        initial = {"sync_s": sync_s, "bytes": moved, "channels_created": channels}
        _run_steps(loop, config.steps, records, log)
    except Exception as exc:  # noqa: BLE001 - the steps so far are still written
        error = f"{type(exc).__name__}: {_last_line(exc)}"
        log(f"shardsync demo: stopped after {len(records)} step(s): {error}")
    finally:
        try:
            loop.close()
        except Exception as exc:  # noqa: BLE001 - the steps' evidence is still written
            error = error or f"closing: {type(exc).__name__}: {_last_line(exc)}"
            log(f"shardsync demo: closing the actors failed: {type(exc).__name__}: {_last_line(exc)}")
    bound = FLOAT32_BOUND if config.dtype == "float32" else None
    ok = error is None and (bound is None or all(r.logprob_abs_diff_max <= bound for r in records))
    summary = {"config": asdict(config), "initial_sync": initial, "steps": [r.as_dict() for r in records],
               "logprob_bound": bound, "ok": ok, "error": error, "seconds": time.monotonic() - started}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(records, bound, out / "plot.png")
    if records:
        log(f"\nchannels: {initial['channels_created']} created at the first connect, "
            f"{records[-1].channels_created - initial['channels_created']} during {len(records)} steps")
    if bound is not None and records:
        worst = max(r.logprob_abs_diff_max for r in records)
        log(f"train/rollout |logprob diff|: max {worst:.2e} over all steps (bound {bound:.0e}): "
            f"{'ok' if worst <= bound else 'EXCEEDED: a sync went wrong'}")
    log(f"wrote {out / 'summary.json'} and {out / 'plot.png'}")
    return 0 if ok else 1


def _last_line(exc: Exception) -> str:
    """Ray wraps a remote failure in its traceback: its last line says what happened."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else repr(exc)


def _run_steps(loop: RLLoop, steps: int, records: list[StepRecord], log) -> None:
    from tqdm import tqdm

    with tqdm(total=steps, desc="RL steps", unit="step", disable=None) as bar:  # no bar when not a terminal
        bar.write(_COLUMNS)
        for _ in range(steps):
            record = loop.step()
            records.append(record)
            bar.write(f"{record.step:>4} {record.sync_s:>8.3f} {human_bytes(record.bytes):>10} "
                      f"{record.logprob_abs_diff_mean:>13.2e} {record.logprob_abs_diff_max:>12.2e} "
                      f"{record.channels_created:>8} {record.reward_mean:>7.3f}")
            bar.update(1)


def _plot(records: list[StepRecord], bound: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r.step for r in records]
    fig, (sync_ax, gap_ax) = plt.subplots(1, 2, figsize=(10, 4))
    sync_ax.bar(steps, [r.sync_s for r in records], color="tab:blue")
    sync_ax.set(title="sync time per step", xlabel="step", ylabel="seconds")
    gap_ax.plot(steps, [r.logprob_abs_diff_mean for r in records], "o-", label="mean")
    gap_ax.plot(steps, [r.logprob_abs_diff_max for r in records], "s-", label="max")
    if bound is not None:
        gap_ax.axhline(bound, color="tab:red", linestyle="--", label=f"bound {bound:.0e}")
    gap_ax.set(title="|train - rollout logprob|", xlabel="step", yscale="log")
    for ax in (sync_ax, gap_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    gap_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
