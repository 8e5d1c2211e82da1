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
    sent = {rank: 0 for rank in range(layout.src_ranks)}
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
            {"rank": rank, "pp": layout.src_position(rank)[0], "tp": layout.src_position(rank)[1], "bytes_sent": sent[rank]}
            for rank in range(layout.src_ranks)
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
        f"{model} ({summary['family']}): trainer TP {layout['train_tp']} PP {layout['train_pp']} -> "
        f"{layout['engines']} engine(s) x TP {layout['infer_tp']}, {dtype}, plan {summary['plan_hash'][:12]}",
        "",
        f"{'channel':<18} {'from':<16} {'to':<22} {'copies':>7} {'bytes':>12}",
    ]
    for c in summary["channels"]:
        src = next(s for s in summary["src_ranks"] if s["rank"] == c["src_rank"])
        engines = ",".join(str(d["engine"]) for d in c["dst_ranks"])
        to = f"engine {engines} tp{c['dst_ranks'][0]['tp']}"
        lines.append(f"{c['name']:<18} {'trainer pp%d tp%d' % (src['pp'], src['tp']):<16} {to:<22} "
                     f"{c['copies']:>7} {human_bytes(c['bytes']):>12}")
    lines += ["", "trainer ranks:"]
    lines += [f"  pp{s['pp']} tp{s['tp']}: sends {human_bytes(s['bytes_sent'])}" for s in summary["src_ranks"]]
    lines += ["engine ranks:"]
    lines += [f"  engine {d['engine']} tp{d['tp']}: receives {human_bytes(d['bytes_received'])}" for d in summary["dst_ranks"]]
    lines += [f"gathers: {summary['gathers']}   bytes per engine: {human_bytes(summary['bytes_per_engine'])}"]
    return "\n".join(lines)
