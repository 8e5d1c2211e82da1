"""How `shardsync bench` shows its result: a table for the terminal, a plot for a file."""

from __future__ import annotations

from shardsync.runtime.plan.summary import human_bytes

_LABELS = {"shard": "shard (peer to peer)", "gather": "gather (baseline)", "colocated": "colocated (shared memory)",
           "colocated-ahead": "colocated, packed ahead"}


def table(result: dict) -> str:
    methods = result["methods"]
    lines = [
        f"{result['model']}: trainer {_trainer_layout(result)} -> {result['engines']} engine(s) "
        f"x TP {result['infer_tp']}{' with EP' if result.get('infer_ep') else ''}, {result['dtype']}, "
        f"buckets of {human_bytes(result['bucket_bytes'])}, "
        f"overlap {'on' if result['overlap'] else 'off'}, median of {result['repeat']} updates per method",
        f"  {'method':<26} {'update s':>9} {'vs gather':>9} {'sent/trainer rank':>28} {'trainer extra peak':>30} "
        f"{'engine extra peak':>18}",
    ]
    for method in methods:
        sent = " ".join(human_bytes(b) for b in result["bytes_sent_per_trainer_rank"][method])
        trainer = " ".join(human_bytes(b) for b in result["trainer_peak_extra_bytes"][method])
        engine = human_bytes(max(result["engine_peak_extra_bytes"][method]))
        speedup = result["speedup_vs_gather"].get(method)
        versus = f"{speedup:.2f}x" if speedup is not None else "-"
        lines.append(f"  {_LABELS[method]:<26} {result['update_s'][method]:>9.3f} {versus:>9} {sent:>28} "
                     f"{trainer:>30} {engine:>18}")
    lines.append(f"  engines hold the same bytes after every method: {'yes' if result['engines_equal'] else 'NO'}")
    bound = result.get("update_vs_copy_bound", {})
    if bound:
        lines.append(f"  {result.get('device', 'cpu')} copy rate {result['copy_rate_GBps']:.0f} GB/s; the update "
                     f"against the time its copies take at that rate: "
                     + ", ".join(f"{m} {ratio:.2f}" for m, ratio in bound.items()))
    for method, roles in result.get("phase_s", {}).items():
        said = "; ".join(f"{role} " + ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in phases.items())
                         for role, phases in roles.items() if phases)
        lines.append(f"  {method} phases (slowest rank, median): {said}")
    lines.append("  (vs gather = gather's median / the method's; extra peak = buffers + whole tensors held, as "
                 "tracked; resident-set growth is in the JSON)")
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

    methods = result["methods"]
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for offset, method in enumerate(methods):
        times = result["update_s_each"][method]
        time_ax.scatter([offset] * len(times), times, alpha=0.5)
    time_ax.bar(range(len(methods)), [result["update_s"][m] for m in methods], alpha=0.4)
    time_ax.set_xticks(range(len(methods)), [_LABELS[m] for m in methods], fontsize=8)
    time_ax.set(title="update time (median, and each update)", ylabel="seconds")
    ranks = len(result["trainer_peak_extra_bytes"][methods[0]])
    width = 0.8 / len(methods)
    for offset, method in enumerate(methods):
        values = [b / 2**20 for b in result["trainer_peak_extra_bytes"][method]]
        values.append(max(result["engine_peak_extra_bytes"][method]) / 2**20)
        mem_ax.bar([i + offset * width for i in range(ranks + 1)], values, width, label=_LABELS[method])
    mem_ax.set_xticks([i + 0.4 - width / 2 for i in range(ranks + 1)],
                      result.get("trainer_ranks", [f"trainer {i}" for i in range(ranks)]) + ["engine rank (max)"],
                      fontsize=8)
    mem_ax.set(title="extra peak memory per rank (tracked)", ylabel="MiB")
    mem_ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']}: {_trainer_layout(result)} -> {result['engines']} x TP "
                 f"{result['infer_tp']}, {result['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
