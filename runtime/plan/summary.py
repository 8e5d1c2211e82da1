"""What a plan moves, per channel and per rank: for `shardsync plan` and reports."""

from __future__ import annotations

from shardsync.runtime.plan import Plan


def summarize(plan: Plan) -> dict:
    """Bytes are in the destination dtype, padding excluded, counted once per broadcast."""
    layout = plan.layout
    channels = [
        {
            "name": c.name,
            "src_rank": c.src_rank,
            "dst_ranks": [{"engine": e, "tp": c.dst_tp} for e in range(c.engines)],
            "copies": len(c.copies),
            "bytes": c.numel * plan.dtype_bytes,
        }
        for c in plan.channels
    ]
    sent = {src.rank: 0 for src in layout.senders}
    received = {tp: 0 for tp in range(layout.infer_tp)}
    for c, row in zip(plan.channels, channels):
        sent[c.src_rank] += row["bytes"]
        received[c.dst_tp] += row["bytes"]
    return {
        "family": plan.family,
        "layout": vars(layout),
        "dtype_bytes": plan.dtype_bytes,
        "plan_hash": plan.digest,
        # copies reading anything but the source rank's own shard: a gather in disguise
        "gathers": sum(1 for c in plan.channels for x in c.copies if x.src_tensor not in plan.src_shapes[c.src_rank]),
        "channels": channels,
        "src_ranks": [
            {"rank": src.rank, "pp": src.pp, "tp": src.tp, "dp": src.dp, "ep": src.ep, "etp": src.etp,
             "bytes_sent": sent[src.rank]}
            for src in layout.senders
        ],
        "dst_ranks": [
            {"engine": e, "tp": tp, "bytes_received": received[tp]}
            for e in range(layout.engines) for tp in range(layout.infer_tp)
        ],
        "bytes_per_engine": sum(received.values()),
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def as_table(summary: dict, model: str, dtype: str) -> str:
    layout = summary["layout"]
    lines = [
        f"{model} ({summary['family']}): trainer {_trainer_layout(layout)} -> "
        f"{layout['engines']} engine(s) x TP {layout['infer_tp']}{' with EP' if layout['infer_ep'] else ''}, {dtype}, "
        f"plan {summary['plan_hash'][:12]}",
        "",
        f"{'channel':<18} {'from':<16} {'to':<22} {'copies':>7} {'bytes':>12}",
    ]
    for c in summary["channels"]:
        src = next(s for s in summary["src_ranks"] if s["rank"] == c["src_rank"])
        engines = ",".join(str(d["engine"]) for d in c["dst_ranks"])
        to = f"engine {engines} tp{c['dst_ranks'][0]['tp']}"
        lines.append(f"{c['name']:<18} {'trainer ' + _rank_label(src):<16} {to:<22} "
                     f"{c['copies']:>7} {human_bytes(c['bytes']):>12}")
    lines += ["", "trainer ranks:"]
    lines += [f"  rank {s['rank']} ({_rank_label(s)}, ep{s['ep']} etp{s['etp']}): sends {human_bytes(s['bytes_sent'])}"
              for s in summary["src_ranks"]]
    lines += ["engine ranks:"]
    lines += [f"  engine {d['engine']} tp{d['tp']}: receives {human_bytes(d['bytes_received'])}" for d in summary["dst_ranks"]]
    lines += [f"gathers: {summary['gathers']}   bytes per engine: {human_bytes(summary['bytes_per_engine'])}"]
    return "\n".join(lines)


def _trainer_layout(layout: dict) -> str:
    text = f"TP {layout['train_tp']} PP {layout['train_pp']}"
    if layout["train_ep"] > 1 or layout["train_etp"] != layout["train_tp"] or layout["train_dp"] > 1:
        text += f" EP {layout['train_ep']} ETP {layout['train_etp']} DP {layout['train_dp']}"
    return text


def _rank_label(src: dict) -> str:
    return f"pp{src['pp']} tp{src['tp']}" + (f" dp{src['dp']}" if src["dp"] else "")
