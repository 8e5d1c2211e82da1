"""The compiler: errors a spec author can act on, deterministic output, `--check`."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from shardsync.compiler import SpecError, load_spec, render_kinds, render_module
from shardsync.compiler.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
QWEN3 = (ROOT / "specs" / "qwen3.yaml").read_text()


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


MISTAKES = [
    # (what is changed, replaced by, where the error must point, words it must contain)
    ("    split: row\n", "    split: colum\n", "split: colum", ["params.linear_proj.split", "unknown split kind 'colum'", "row"]),
    ("    split: row\n", "    splt: row\n", "splt: row", ["params.linear_proj.splt", "unknown field", "split"]),
    ("    megatron: decoder.final_layernorm.weight\n", "", "final_layernorm:",
     ["params.final_layernorm", "missing required field 'megatron'"]),
    # vLLM names are all or none: half a table would leave tensors to no one
    ("    vllm: model.norm.weight\n", "", "  final_layernorm:",
     ["params.final_layernorm.vllm", "params.word_embeddings has one", "every family a vllm name, or none"]),
    ("decoder.layers.{layer}.pre_mlp_layernorm.weight", "decoder.layers.{lyr}.pre_mlp_layernorm.weight",
     "{lyr}", ["params.pre_mlp_layernorm.megatron", "{layer}"]),
    ("model.layers.{layer}.self_attn.o_proj.weight", "model.layers.self_attn.o_proj.weight",
     "hf: model.layers.self_attn.o_proj.weight", ["params.linear_proj.hf", "must contain {layer}"]),
    ("    dims: {rows: ffn, cols: hidden}\n", "    dims: {rows: fnn, cols: hidden}\n", "rows: fnn", ["dims.rows", "'fnn'"]),
    ("    when: not tied\n", "    when: not tide\n", "not tide", ["params.output_layer.when", "'not tide'"]),
    ("{field: head_dim, default: hidden // heads}", "{field: head_dim, default: hidden // nheads}",
     "nheads", ["config.head_dim.default", "'nheads'"]),
    ("  ffn: intermediate_size\n", "  ffn: intermediate_size\n  ffn2: [1, 2]\n", "ffn2:", ["config.ffn2", "expected an HF field name"]),
    ("family: qwen3\n", "family: qwen3\nfamily: qwen4\n", "family: qwen4", ["family", "duplicate key"]),
    ("    split: vocab\n", "    split: vocab\n   bad: [\n", "bad: [", ["not valid YAML"]),
    # floats: YAML reads 1e-6 without a dot as a string
    ("default: 1.0e-6}", "default: 1e-6}", "norm_eps:", ["config.norm_eps.default", "positive number", "1.0e-6"]),
    ("type: float, default: 1.0e-6", "type: double, default: 1.0e-6", "norm_eps:", ["config.norm_eps.type", "'float'"]),
    ("    dims: {rows: hidden, cols: attn_width}\n", "    dims: {rows: hidden, cols: norm_eps}\n", "cols: norm_eps",
     ["params.linear_proj.dims.cols", "'norm_eps'"]),
    ("  layernorm_epsilon: norm_eps\n", "  layernorm_epsilon: hidden\n", "layernorm_epsilon: hidden",
     ["megatron.layernorm_epsilon", "float config name (norm_eps, rope_theta)", "'hidden'"]),
    ("  normalization: RMSNorm\n", "  normalization: RMSnorm\n", "normalization: RMSnorm",
     ["megatron.normalization", "RMSNorm, LayerNorm"]),
    ("  rotary_base: rope_theta\n", "  rotary_base: rope_theta\n  rope_scaling: 2\n", "rope_scaling",
     ["megatron.rope_scaling", "unknown field"]),
]


@pytest.mark.parametrize("old,new,at,words", MISTAKES, ids=[m[2] for m in MISTAKES])
def test_a_mistake_names_file_line_and_field(old, new, at, words):
    assert old in QWEN3
    text = QWEN3.replace(old, new, 1)
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "specs/broken.yaml")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("specs/broken.yaml:"), message
    for word in words:
        assert word in message, message
    if at != "final_layernorm:":
        assert caught.value.line == _line_of(text, at), message
    else:  # a missing field is reported at the mapping that lacks it
        assert caught.value.line == _line_of(text, at) + 1, message


def test_cli_reports_a_bad_spec_in_one_line(tmp_path):
    bad = tmp_path / "qwen3.yaml"
    bad.write_text(QWEN3.replace("    split: row\n", "    split: colum\n", 1))
    result = subprocess.run(
        [sys.executable, "-m", "shardsync.cli", "compile", str(bad), "-o", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{bad}:{_line_of(bad.read_text(), 'split: colum')}: params.linear_proj.split" in lines[0]
    assert not (tmp_path / "out").exists()


def test_check_passes_on_the_committed_generated_package():
    result = subprocess.run([sys.executable, "-m", "shardsync.cli", "compile", "--all", "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_check_fails_when_output_differs_or_is_stale(tmp_path):
    def run(*extra):
        return subprocess.run([sys.executable, "-m", "shardsync.cli", "compile", "--all", "-o", str(tmp_path), *extra],
                              capture_output=True, text=True)

    assert run("--check").returncode == 1  # nothing compiled yet
    assert run().returncode == 0
    assert run("--check").returncode == 0
    module = tmp_path / "qwen3.py"
    module.write_text(module.read_text() + "# edited by hand\n")
    result = run("--check")
    assert result.returncode == 1 and "qwen3.py" in result.stderr
    assert run().returncode == 0
    (tmp_path / "mixtral.py").write_text("")
    result = run("--check")
    assert result.returncode == 1 and "mixtral.py has no spec" in result.stderr
    (tmp_path / "mixtral.py").unlink()
    kinds = tmp_path / "_kinds.py"  # the layout library, copied from compiler/_kinds.py
    assert kinds.read_text() == (ROOT / "compiler" / "_kinds.py").read_text()
    kinds.write_text(kinds.read_text().replace("VLLM_VOCAB_MULTIPLE = 64", "VLLM_VOCAB_MULTIPLE = 128"))
    result = run("--check")
    assert result.returncode == 1 and "out of date: " in result.stderr and "_kinds.py" in result.stderr
    assert run().returncode == 0 and run("--check").returncode == 0


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_output_is_deterministic_and_formatted(path):
    first, second = render_module(load_spec(path)), render_module(load_spec(path))
    assert first == second
    compile(first, path.stem, "exec")
    for number, line in enumerate(first.splitlines(), 1):
        assert line == line.rstrip(), f"trailing blanks at line {number}"
        assert len(line) <= 120, f"line {number} is {len(line)} characters"
    assert "\n\n\n\n" not in first


@pytest.mark.parametrize("path", sorted((ROOT / "generated").glob("*.py")), ids=lambda p: p.name)
def test_generated_modules_import_only_torch_the_standard_library_and_kinds(path):
    """So a trainer can vendor generated/ alone: family modules import torch, the standard
    library and their sibling `_kinds` (relatively); `_kinds` itself nothing more than torch."""
    allowed = set(sys.stdlib_module_names) | {"torch"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots = {(node.module or "").split(".")[0]}
        elif isinstance(node, ast.ImportFrom):
            sibling = node.module or ".".join(alias.name for alias in node.names)
            assert node.level == 1 and sibling == "_kinds" and path.name not in ("_kinds.py", "__init__.py"), (
                f"{path.name}: from {'.' * node.level}{node.module or ''} import ...")
            continue
        else:
            continue
        assert roots <= allowed, f"{path.name} imports {roots - allowed}"


def test_kinds_library_is_copied_verbatim():
    assert render_kinds() == (ROOT / "compiler" / "_kinds.py").read_text() == (ROOT / "generated" / "_kinds.py").read_text()


def test_a_spec_without_vllm_names_compiles_to_hf_only_converters(tmp_path):
    """No vllm names at all is a spec without a vLLM layout table: the module still
    converts to HF (the gather method's need) and offers no vLLM tables to plan with."""
    text = "\n".join(line for line in QWEN3.splitlines() if not line.strip().startswith("vllm:"))
    spec = parse_spec(text, "specs/qwen3-hf-only.yaml")
    assert not spec.vllm_layout and load_spec(ROOT / "specs" / "qwen3.yaml").vllm_layout
    package = tmp_path / "vendored"  # as a trainer would vendor generated/: the module and _kinds
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_kinds.py").write_text(render_kinds())
    (package / "qwen3_hf_only.py").write_text(render_module(spec))
    sys.path.insert(0, str(tmp_path))
    try:
        namespace = vars(importlib.import_module("vendored.qwen3_hf_only"))
    finally:
        sys.path.remove(str(tmp_path))
    assert namespace["VLLM_LAYOUT"] is False
    assert "vllm_shard_table" not in namespace and "convert_to_hf_shard" not in namespace
    assert "convert_to_hf" in namespace and "megatron_shard_table" in namespace
