"""Every spec's Megatron table against a real megatron-core GPTModel (local layer spec).

For each spec in specs/, each preset of its architectures and every combination of its
boolean config fields (tied or not, biases on or off), the GPTModel that the spec's
`megatron_config` / `megatron_model_args` describe is built at TP 1 and at both ranks of
TP 2 (in this process: a fake world on the meta device) and its parameter names and
shapes must equal `megatron_shard_table`: none missing, none extra. And a spec naming a
parameter no GPTModel has is refused by `shardsync check-spec` in one line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is installed by `make` (requirements/lock.txt)")

from shardsync.compiler import load_spec  # noqa: E402
from shardsync.harness import spec_check  # noqa: E402
from shardsync.presets import model_config, preset_names  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
# configs a spec refuses itself (its ConfigError), so no model is built for them
REFUSED = {
    # megatron-core's add_bias_linear gives linear_proj, fc1 and fc2 biases together
    "llama": "megatron-core's add_bias_linear switches linear_proj.bias, linear_fc1.bias, linear_fc2.bias on together",
    "qwen3": "tp_size=2 does not divide num_key_value_heads=1",  # qwen3-tiny-mqa at TP 2
}


# A GPTModel of more expert modules than this takes minutes to build even on the meta
# device (Qwen3-235B-A22B: 94 layers x 128 experts); `shardsync check-spec` builds those.
MAX_EXPERT_MODULES = 256


def _expert_modules(config: dict) -> int:
    return config["num_hidden_layers"] * config.get("num_experts", config.get("num_local_experts", 0))


def _presets(spec):
    return [(name, model_config(name)) for name in preset_names()
            if any(a in spec.architectures for a in model_config(name)["architectures"])
            and _expert_modules(model_config(name)) <= MAX_EXPERT_MODULES]


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_the_spec_names_exactly_the_parameters_of_the_gpt_model_it_implies(path):
    spec = load_spec(path)
    module = spec_check.module_from_spec(spec)
    configs = _presets(spec)
    assert configs, f"no preset for {spec.architectures}: add a tiny one to shardsync/models/"
    report = spec_check.check_module(module, configs, tp_sizes=(1, 2))
    problems = [f"{d.message} ({where})" for d, where in report.problems]
    assert problems == [], "\n".join(problems)
    switches = spec_check.bool_fields(module)
    assert report.variants == len(configs) * 2 ** len(set(switches.values()))
    assert "tie_word_embeddings" in switches.values()
    assert all(reason.startswith(REFUSED[spec.family]) for reason in report.skipped), report.skipped
    # every variant the spec serves was built at TP 1 and both ranks of TP 2 (plus the probe)
    refused = sum(len(labels) for labels in report.skipped.values())
    refused_tp2 = sum(len(labels) for labels in report.skipped.values() if labels[0].endswith("TP 2"))
    assert report.builds == 1 + 3 * (report.variants - refused) + refused_tp2


def test_every_spec_variant_switch_is_covered():
    """The variants are every combination of the spec's boolean fields: biases and tying."""
    wanted = {"llama": {"attention_bias", "mlp_bias", "tie_word_embeddings"},
              "qwen2": {"tie_word_embeddings"}, "mistral": {"tie_word_embeddings"},
              "qwen3": {"attention_bias", "tie_word_embeddings"}, "phi3": {"tie_word_embeddings"},
              "starcoder2": {"use_bias", "tie_word_embeddings"},
              "qwen3_moe": {"attention_bias", "norm_topk_prob", "tie_word_embeddings"},
              "qwen2_moe": {"norm_topk_prob", "tie_word_embeddings"}, "mixtral": {"tie_word_embeddings"}}
    for path in SPECS:
        module = spec_check.module_from_spec(load_spec(path))
        assert set(spec_check.bool_fields(module).values()) == wanted[module.FAMILY], module.FAMILY


def test_a_model_that_differs_from_the_table_is_reported_by_name(monkeypatch):
    """A megatron_config that disagrees with the families (qk_layernorm off for Qwen3)
    gives a missing line per family; at TP 2 a shape difference names both shapes."""
    module = spec_check.module_from_spec(load_spec(ROOT / "specs" / "qwen3.yaml"))
    cfg = module.config_from_hf(model_config("qwen3-tiny"))
    config = module.megatron_config
    monkeypatch.setattr(module, "megatron_config", lambda c: {**config(c), "qk_layernorm": False})
    messages = sorted(d.message for d in spec_check.check_names(module, cfg, 1, 2))
    assert messages == [
        "decoder.layers.{layer}.self_attention.k_layernorm.weight: GPTModel (local layer spec, qk_layernorm=False) "
        "has no such parameter",
        "decoder.layers.{layer}.self_attention.q_layernorm.weight: GPTModel (local layer spec, qk_layernorm=False) "
        "has no such parameter",
    ]
    monkeypatch.setattr(module, "megatron_config", lambda c: {**config(c), "ffn_hidden_size": 256})
    fc1, fc2 = spec_check.check_names(module, cfg, 1, 2)
    assert (fc1.kind, fc1.family, fc2.kind, fc2.family) == ("shape", "linear_fc1", "shape", "linear_fc2")
    assert fc1.message == (
        "decoder.layers.{layer}.mlp.linear_fc1.weight: the spec gives decoder.layers.0.mlp.linear_fc1.weight "
        "[384, 128], GPTModel (local layer spec, gated_linear_unit=True) has [256, 128]")
    monkeypatch.setattr(module, "megatron_config", lambda c: {**config(c), "num_query_groups": 3})
    [build] = spec_check.check_names(module, cfg, 0, 2)
    assert build.kind == "build" and "num_query_groups=3" in build.message, build.message


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "shardsync.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_a_spec_with_a_megatron_name_gpt_model_cannot_have_is_refused_in_one_line(tmp_path):
    text = (ROOT / "specs" / "qwen3.yaml").read_text()
    wrong = "decoder.layers.{layer}.self_attention.q_norm.weight"
    bad = tmp_path / "qwen3.yaml"
    bad.write_text(text.replace("decoder.layers.{layer}.self_attention.q_layernorm.weight", wrong))
    compiled = _cli("compile", bad, "-o", tmp_path / "out")  # compile itself needs no megatron-core
    assert compiled.returncode == 0, compiled.stderr
    assert "shardsync check-spec" in compiled.stderr
    result = _cli("check-spec", bad, "--model", "qwen3-tiny")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "q_layernorm.weight" in row)
    assert lines[0].startswith(
        f"{bad}:{line}: params.q_layernorm.megatron: {wrong}: GPTModel (local layer spec, qk_layernorm=True) "
        f"has no such parameter; it has decoder.layers.{{layer}}.self_attention.q_layernorm.weight"), lines[0]


def test_check_spec_passes_the_committed_specs_by_family():
    result = _cli("check-spec", "qwen2", "mistral", "--model", "qwen2-tiny", "--model", "mistral-tiny", "--tp", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert [row.split(":")[0] for row in out] == ["specs/qwen2.yaml", "specs/mistral.yaml"], result.stdout
    assert all("Megatron names and shapes equal GPTModel's" in row for row in out)


def test_compile_does_not_import_megatron_core(tmp_path):
    probe = ("import sys; from shardsync.cli import main; "
             f"rc = main(['compile', '{ROOT / 'specs' / 'qwen3.yaml'}', '-o', '{tmp_path}']); "
             "assert rc == 0; assert not [m for m in sys.modules if m.startswith('megatron')], 'megatron imported'")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_spec_that_refuses_every_config_is_a_problem(tmp_path):
    """Without k_layernorm, qk_layernorm can give q_layernorm alone: no config can be built."""
    text = (ROOT / "specs" / "qwen3.yaml").read_text()
    start = text.index("  k_layernorm:")
    bad = tmp_path / "qwen3.yaml"
    bad.write_text(text[:start] + text[text.index("  linear_proj:"):])
    module = spec_check.module_from_spec(load_spec(bad))
    report = spec_check.check_module(module, [("qwen3-tiny", model_config("qwen3-tiny"))])
    [(problem, _)] = report.problems
    assert problem.kind == "build" and problem.message.startswith(
        "the spec refuses every config it was checked with: megatron-core's qk_layernorm switches "
        "q_layernorm.weight, k_layernorm.weight on together"), problem.message
