"""A spec's Megatron tables against a real megatron-core GPTModel (local layer spec).

For a converter module (generated, or rendered from a spec in memory) and an HF config,
`check_names` builds the GPTModel that `megatron_config(cfg)` and `megatron_model_args(cfg)`
describe, one TP rank at a time, and compares its `named_parameters()` (layer numbers
made global) with `megatron_shard_table(cfg, rank, tp)`: every name the spec gives that
the model lacks, every parameter the model has that no family names, and every shape
that differs, each one `Difference`.

No process group is needed: the rank is built in this process inside a fake world
(torch's `FakeProcessGroup`, so megatron-core's own `parallel_state` computes the TP
rank and sizes) and on the meta device, so even an 8B config costs milliseconds and no
memory. megatron-core is imported only here and only when a check runs: `shardsync
compile` never needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from shardsync.harness.megatron_cpu import cpu_shims
from shardsync.runtime.integrations.megatron.source import global_parameters

LOCAL_SPEC = "GPTModel (local layer spec"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LAYER_PATTERN = "decoder.layers.{layer}."
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_EXPERT_PATTERN = ".local_experts.{expert}."
_SEQ_LENGTH = 64

# which TransformerConfig / GPTModel switch decides whether a parameter exists
_SWITCHES = (
    ("_layernorm.weight", ("qk_layernorm",), ("self_attention.q_layernorm", "self_attention.k_layernorm")),
    ("linear_qkv.bias", ("add_qkv_bias",), ()),
    (".bias", ("add_bias_linear",), ()),
    ("output_layer.", ("share_embeddings_and_output_weights",), ()),
    ("layernorm.", ("normalization",), ()),
    ("linear_fc1.", ("gated_linear_unit",), ()),
)


@dataclass(frozen=True)
class Difference:
    """One way the spec's table and the model differ, for one Megatron name pattern.

    kind: "impossible" (no GPTModel of the spec's sizes has it, whatever its switches),
    "missing" (the spec names it, this model has no such parameter), "extra" (the
    model has it, no family names it), "shape" (both have it, shapes differ) or "build"
    (megatron-core refused the config the spec implies; `name` is empty).
    `name` is the pattern with `{layer}`; `family` the spec's param key when it names it.
    """

    kind: str
    name: str
    family: str | None
    message: str


@dataclass(frozen=True)
class Variant:
    """An HF config to check: a preset (or given config) with some boolean fields set."""

    label: str
    hf_config: dict


def bool_fields(module) -> dict[str, str]:
    """The module's boolean config names (the switches of `when:`, `tied`, ...) -> HF field."""
    return {f.name: module.Config.HF_FIELDS[f.name] for f in fields(module.Config)
            if f.type in (bool, "bool") and f.name in module.Config.HF_FIELDS}


def variants(module, hf_config: dict, label: str) -> list[Variant]:
    """`hf_config` with every combination of the module's boolean HF fields."""
    switches = sorted(set(bool_fields(module).values()))
    result = []
    for values in itertools.product((False, True), repeat=len(switches)):
        changes = dict(zip(switches, values))
        shown = ", ".join(f"{k}={v}" for k, v in changes.items())
        result.append(Variant(f"{label} ({shown})" if shown else label, {**hf_config, **changes}))
    return result


def family_keys(module) -> dict[str, str]:
    """Megatron name pattern -> the spec's param key (its constant in the module, lower-cased)."""
    family_type = module.Family
    return {value.megatron: name.lower() for name, value in vars(module).items()
            if isinstance(value, family_type) and name.isupper()}


def pattern(name: str) -> str:
    """A global Megatron name with its layer number as `{layer}` and its local expert
    number as `{expert}`."""
    return _EXPERT.sub(_EXPERT_PATTERN, _LAYER.sub(_LAYER_PATTERN, name))


def global_names(model) -> dict[str, tuple[int, ...]]:
    """A model stage's parameters by global Megatron name, with their shapes."""
    return {name: tuple(param.shape) for name, param in global_parameters(model).items()}


@contextlib.contextmanager
def fake_world(tp_rank: int, tp_size: int) -> Iterator[None]:
    """megatron-core's parallel state for TP rank `tp_rank` of `tp_size`, in this process:
    a fake process group (no peers, no communication), torn down on exit."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron.core import parallel_state

    dist.init_process_group("fake", store=FakeStore(), rank=tp_rank, world_size=tp_size)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size,
                                                 create_gloo_process_groups=False)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def build_model(config_fields: dict, model_args: dict, vocab_size: int, tp_rank: int, tp_size: int):
    """TP rank `tp_rank`'s GPTModel (local layer spec) on the meta device, uninitialized."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Apex is not installed", "GPTModel is deprecated", ...
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer import TransformerConfig

        quiet = logging.getLogger("megatron.core.models.gpt.gpt_model")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with fake_world(tp_rank, tp_size), cpu_shims(), torch.device("meta"):
                assert parallel_state.get_tensor_model_parallel_rank() == tp_rank
                config = TransformerConfig(**config_fields, activation_func=F.silu, tensor_model_parallel_size=tp_size,
                                           use_cpu_initialization=True, perform_initialization=False)
                spec = get_gpt_layer_local_spec(num_experts=config_fields.get("num_moe_experts"),
                                                qk_layernorm=config_fields["qk_layernorm"],
                                                normalization=config_fields["normalization"])
                return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
                                max_sequence_length=_SEQ_LENGTH, position_embedding_type="rope", **model_args)
        finally:
            quiet.setLevel(level)


def check_names(module, cfg, tp_rank: int, tp_size: int) -> list[Difference]:
    """How TP rank `tp_rank` of `tp_size` of the GPTModel the spec implies differs from
    the spec's `megatron_shard_table` (PP 1). Raises the module's ConfigError where the
    spec itself refuses this config or layout."""
    table = module.megatron_shard_table(cfg, tp_rank, tp_size, 0, 1)
    config_fields = module.megatron_config(cfg)
    model_args = module.megatron_model_args(cfg)
    embedding = next(f for f in module.families(cfg) if f.stage == "first")
    vocab_size = embedding.megatron_tensor(cfg, None, 0, tp_size).shape[0] * tp_size
    if torch.distributed.is_initialized():
        raise RuntimeError("a torch.distributed process group is already initialized in this process; "
                           "the Megatron name check builds its own (fake) one")
    try:
        model = build_model(config_fields, model_args, vocab_size, tp_rank, tp_size)
    except Exception as exc:  # megatron-core refuses with ValueError, AssertionError, ...
        return [_build_failure(exc, config_fields, model_args)]
    return compare({local.name: tuple(local.shape) for local in table}, global_names(model), family_keys(module),
                   {**config_fields, **model_args})


def compare(wanted: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], keys: dict[str, str],
            switches: dict) -> list[Difference]:
    """Spec table vs model, grouped by name pattern: a missing name with a close extra
    name of the model is one Difference naming both."""
    missing, extra, shapes = {}, {}, {}
    for name, shape in wanted.items():
        if name not in found:
            missing.setdefault(pattern(name), []).append(name)
        elif found[name] != shape:
            shapes.setdefault(pattern(name), (name, shape, found[name]))
    for name in found:
        if name not in wanted:
            extra.setdefault(pattern(name), []).append(name)
    result = []
    for name, concrete in missing.items():
        close = difflib.get_close_matches(name, list(extra), n=1, cutoff=0.6)
        model = _model_text(close[0] if close else name, switches)
        if close:
            extra.pop(close[0])
            why = f"{model} has no such parameter; it has {close[0]}"
        else:
            why = f"{model} has no such parameter" + _layers_text(concrete, wanted)
        result.append(Difference("missing", name, keys.get(name), f"{name}: {why}"))
    for name, (concrete, spec_shape, model_shape) in shapes.items():
        result.append(Difference("shape", name, keys.get(name),
                                 f"{name}: the spec gives {concrete} {list(spec_shape)}, "
                                 f"{_model_text(name, switches)} has {list(model_shape)}"))
    for name, concrete in extra.items():
        result.append(Difference("extra", name, None,
                                 f"{_model_text(name, switches)} has {name} {list(found[concrete[0]])}, "
                                 f"which no family of the spec names"))
    return result


def _model_text(name: str, switches: dict) -> str:
    for needle, names, where in _SWITCHES:
        if needle in name and (not where or any(w in name for w in where)):
            shown = ", ".join(f"{n}={switches[n]!r}" for n in names if n in switches)
            return f"{LOCAL_SPEC}, {shown})" if shown else f"{LOCAL_SPEC})"
    return f"{LOCAL_SPEC})"


def _layers_text(concrete: list[str], wanted: dict) -> str:
    numbers = sorted({int(m.group(1)) for n in concrete if (m := _LAYER.match(n))})
    if not numbers:
        return ""
    layers = sorted({int(m.group(1)) for n in wanted if (m := _LAYER.match(n))})
    return "" if numbers == layers else f" in layers {numbers}"


def _build_failure(exc: Exception, config_fields: dict, model_args: dict) -> Difference:
    text = " ".join(str(exc).split()) or type(exc).__name__
    named = [f for f in {**config_fields, **model_args} if re.search(rf"\b{re.escape(f)}\b", text)]
    fields_text = ", ".join(f"{f}={({**config_fields, **model_args})[f]!r}" for f in named)
    where = f" ({fields_text})" if fields_text else ""
    return Difference("build", "", None, f"megatron-core cannot build the GPTModel the spec implies{where}: "
                                         f"{type(exc).__name__}: {text}")


# the switches that add parameters to the local layer spec, all on: a name this model
# lacks is one no GPTModel of the spec's normalization can have
EVERY_SWITCH = {"qk_layernorm": True, "add_qkv_bias": True, "add_bias_linear": True}


def every_switch_fields(module, cfg) -> dict:
    """`megatron_config(cfg)` with every parameter-adding switch on (the sizes alone do not
    depend on the switches, so a spec whose families split one switch is probed too),
    less linear biases where megatron-core refuses them (a shared expert)."""
    sizes = module.megatron_sizes(cfg)
    switches = dict(EVERY_SWITCH)
    if sizes.get("moe_shared_expert_intermediate_size"):
        switches["add_bias_linear"] = False
    return {**sizes, **switches}


def impossible_names(module, cfg) -> list[Difference]:
    """Families whose Megatron name no GPTModel (local layer spec) of these sizes and this
    normalization has, whatever its switches (built once, every switch on, untied, TP 1)."""
    config_fields = every_switch_fields(module, cfg)
    model_args = {**module.megatron_model_args(cfg), "share_embeddings_and_output_weights": False}
    embedding = next(f for f in module.ALL_FAMILIES if f.stage == "first")
    vocab_size = embedding.megatron_tensor(cfg, None, 0, 1).shape[0]
    try:
        model = build_model(config_fields, model_args, vocab_size, 0, 1)
    except Exception as exc:  # megatron-core refuses with ValueError, AssertionError, ...
        return [_build_failure(exc, config_fields, model_args)]
    possible = sorted({pattern(name) for name in global_names(model)})
    switches = {**config_fields, **model_args}
    result = []
    for family in module.ALL_FAMILIES:
        if family.megatron in possible:
            continue
        close = difflib.get_close_matches(family.megatron, possible, n=1, cutoff=0.6)
        it_has = f"; it has {close[0]}" if close else ""
        model = _model_text(close[0] if close else family.megatron, switches)
        result.append(Difference("impossible", family.megatron, family_keys(module).get(family.megatron),
                                 f"{family.megatron}: {model} has no such "
                                 f"parameter{it_has}"))
    return result


@dataclass
class Report:
    """What checking one module over configs, variants and TP sizes found."""

    family: str
    builds: int = 0
    variants: int = 0
    problems: list = dataclasses.field(default_factory=list)  # (Difference, where it was first seen)
    skipped: dict = dataclasses.field(default_factory=dict)  # the spec's refusal -> [labels refused]


def check_module(module, configs: list[tuple[str, dict]], tp_sizes=(1, 2), vary: bool = True) -> Report:
    """Every TP rank of every size, for every config (label, HF dict) and, with `vary`,
    every combination of the module's boolean fields. A difference seen under several
    configs or ranks is reported once, with the first place it was seen; a config or TP
    size the spec itself refuses (its ConfigError) is not built, only counted."""
    report = Report(module.FAMILY)
    for label, hf in configs:  # first: names no GPTModel can have (then every variant would differ)
        try:
            cfg = module.config_from_hf(hf)
        except module.ConfigError:
            continue
        report.builds += 1
        report.problems = [(d, f"{label}, every switch on, TP 1") for d in impossible_names(module, cfg)]
        if report.problems:
            return report
        break
    seen = set()
    for label, hf in configs:
        for variant in (variants(module, hf, label) if vary else [Variant(label, hf)]):
            report.variants += 1
            try:
                cfg = module.config_from_hf(variant.hf_config)
                module.megatron_config(cfg)
            except module.ConfigError as exc:
                report.skipped.setdefault(str(exc), []).append(variant.label)
                continue
            for tp in tp_sizes:
                for rank in range(tp):
                    try:
                        differences = check_names(module, cfg, rank, tp)
                    except module.ConfigError as exc:
                        report.skipped.setdefault(str(exc), []).append(f"{variant.label}, TP {tp}")
                        break
                    report.builds += 1
                    for difference in differences:
                        key = (difference.kind, difference.name, difference.family,
                               difference.message if difference.kind == "build" else "")
                        if key not in seen:
                            seen.add(key)
                            report.problems.append((difference, f"{variant.label}, TP {tp} rank {rank}"))
    if report.builds <= 1 and report.skipped:  # only the probe was built: nothing this spec can serve
        reason, labels = next(iter(report.skipped.items()))
        report.problems.append((Difference("build", "", None, f"the spec refuses every config it was checked "
                                                              f"with: {reason}"), labels[0]))
    return report


def module_from_spec(spec, package: str = "shardsync_spec_check"):
    """The converter module a spec compiles to, rendered and imported in memory (with its
    own copy of the layout library), so a spec outside specs/ can be checked as is."""
    import importlib.util
    import sys
    import types

    from shardsync.compiler import render_kinds, render_module

    name = f"{package}_{spec.family}_{spec.sha256[:12]}"
    if f"{name}.{spec.family}" in sys.modules:
        return sys.modules[f"{name}.{spec.family}"]
    parent = types.ModuleType(name)
    parent.__path__ = []
    sys.modules[name] = parent
    for child, source in (("_kinds", render_kinds()), (spec.family, render_module(spec))):
        module_spec = importlib.util.spec_from_loader(f"{name}.{child}", loader=None)
        module = importlib.util.module_from_spec(module_spec)
        module.__file__ = f"<{spec.source_name} rendered: {child}.py>"
        sys.modules[module.__name__] = module
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        setattr(parent, child, module)
    return sys.modules[f"{name}.{spec.family}"]
