"""How `shardsync bench` shows its result: a table for the terminal, a plot for a file."""

from __future__ import annotations

from shardsync.runtime.plan.summary import human_bytes

_LABELS = {"shard": "shardsync (shard to shard)", "gather": "baseline (gather + broadcast)"}


def table(result: dict) -> str:
    lines = [
        f"{result['model']}: trainer {_trainer_layout(result)} -> {result['engines']} engine(s) "
        f"x TP {result['infer_tp']}{' with EP' if result.get('infer_ep') else ''}, {result['dtype']}, "
        f"buckets of {human_bytes(result['bucket_bytes'])}, "
        f"overlap {'on' if result['overlap'] else 'off'}, median of {result['repeat']} updates per method",
        f"  {'method':<30} {'update s':>9} {'sent/trainer rank':>28} {'trainer extra peak':>30} {'engine extra peak':>20}",
    ]
    for method in ("shard", "gather"):
        sent = " ".join(human_bytes(b) for b in result["bytes_sent_per_trainer_rank"][method])
        trainer = " ".join(human_bytes(b) for b in result["trainer_peak_extra_bytes"][method])
        engine = human_bytes(max(result["engine_peak_extra_bytes"][method]))
        seconds = result["shardsync_s"] if method == "shard" else result["baseline_s"]
        lines.append(f"  {_LABELS[method]:<30} {seconds:>9.3f} {sent:>28} {trainer:>30} {engine:>20}")
    lines.append(f"  speedup (baseline / shardsync): {result['speedup']:.2f}x; engines hold the same bytes after "
                 f"both: {'yes' if result['engines_equal'] else 'NO'}")
    lines.append("  (extra peak = buffers + whole tensors held, as tracked; resident-set growth is in the JSON)")
    return "\n".join(lines)


def _trainer_layout(result: dict) -> str:
    """TP and PP, and the expert and data parallel sizes where the run has experts spread."""
    text = f"TP {result['train_tp']} PP {result['train_pp']}"
    if result.get("train_ep", 1) > 1 or result.get("train_etp", result["train_tp"]) != result["train_tp"]:
        text += f" EP {result['train_ep']} ETP {result['train_etp']} DP {result['train_dp']}"
    return text


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ("shard", "gather")
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for offset, method in enumerate(methods):
        times = result["update_s"][method]
        time_ax.scatter([offset] * len(times), times, alpha=0.5)
    time_ax.bar(range(2), [result["shardsync_s"], result["baseline_s"]], alpha=0.4, color=["tab:blue", "tab:orange"])
    time_ax.set_xticks(range(2), [_LABELS[m] for m in methods], fontsize=8)
    time_ax.set(title=f"update time (median, and each update): {result['speedup']:.2f}x", ylabel="seconds")
    ranks = len(result["trainer_peak_extra_bytes"]["shard"])
    width = 0.38
    for offset, method in enumerate(methods):
        values = [b / 2**20 for b in result["trainer_peak_extra_bytes"][method]]
        values.append(max(result["engine_peak_extra_bytes"][method]) / 2**20)
        mem_ax.bar([i + offset * width for i in range(ranks + 1)], values, width, label=_LABELS[method])
    mem_ax.set_xticks([i + width / 2 for i in range(ranks + 1)],
                      result.get("trainer_ranks", [f"trainer {i}" for i in range(ranks)]) + ["engine rank (max)"],
                      fontsize=8)
    mem_ax.set(title="extra peak memory per rank (tracked)", ylabel="MiB")
    mem_ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']}: {_trainer_layout(result)} -> {result['engines']} x TP "
                 f"{result['infer_tp']}, {result['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
