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
PHI3 = (ROOT / "specs" / "phi3.yaml").read_text()  # a composed family (linear_fc1) and fused HF tensors


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
    # a refused HF setting says why, and is a plain literal
    ("megatron:\n  normalization", "requires:\n  decoder_sparse_step: {value: 1}\nmegatron:\n  normalization",
     "decoder_sparse_step:", ["requires.decoder_sparse_step", "missing required field 'why'"]),
    ("megatron:\n  normalization", "requires:\n  mlp_only_layers: {value: {a: 1}, why: dense}\nmegatron:\n  normalization",
     "mlp_only_layers:", ["requires.mlp_only_layers.value", "expected a number, boolean, string or list"]),
]


QKV_FUSED = "    hf:\n      fused: model.layers.{layer}.self_attn.qkv_proj.weight\n"
VOCABULARY_MISTAKES = [
    # one HF tensor for several parts is said with `fused`, not by naming it thrice
    (QKV_FUSED, "    hf:\n" + "".join(f"      {r}: model.layers.{{layer}}.self_attn.qkv_proj.weight\n" for r in "qkv"),
     "      k: model.layers", ["params.linear_qkv.hf.k", "is also params.linear_qkv.hf.q", "{fused: NAME}", "q, k, v"]),
    ("    layout: stack\n", "    layout: stak\n", "layout: stak", ["params.linear_fc1.layout", "unknown placement 'stak'"]),
    ("    layout: stack\n", "    layout: {shard: 0}\n", "layout: {shard", ["shard places one part", "a tensor per part"]),
    ("    layout: stack\n", "    layout: {shard: 2}\n", "layout: {shard", ["expected a dimension 0..1, got 2"]),
    ("    layout: stack\n", "    layout: {stack: {replicate_beyond: [down]}}\n", "replicate_beyond",
     ["stack.replicate_beyond: 'down' is not a part (parts: gate, up)"]),
    ("    layout: stack\n", "    layout: {megatron: stack, vllm: {interleave: heeds}}\n", "interleave: heeds",
     ["params.linear_fc1.layout", "group count, got 'heeds'"]),
    ("    parts: {gate: ffn, up: ffn}\n", "    parts: {gate: fnn, up: ffn}\n", "gate: fnn",
     ["params.linear_fc1.parts.gate.count", "'fnn'"]),
    ("    layout: stack\n", "    layout: stack\n    split: gated\n", "layout: stack",
     ["params.linear_fc1.layout", "not with a shorthand (split, dims)"]),
    ("    parts: {gate: ffn, up: ffn}\n", "    shape: [ffn, hidden]\n    parts: {gate: ffn, up: ffn}\n", "linear_fc1:",
     ["params.linear_fc1", "'shape' (one tensor) or 'parts' (several)"]),
    # the families megatron-core is sized by must be laid out as megatron-core lays them out
    ("    split: row\n    dims: {rows: hidden, cols: attn_width}\n",
     "    split: column\n    dims: {rows: hidden, cols: attn_width}\n", "megatron:",
     ["lacks or lays out otherwise", "linear_proj.weight (row-parallel"]),
]


@pytest.mark.parametrize("old,new,at,words", VOCABULARY_MISTAKES, ids=[m[2] for m in VOCABULARY_MISTAKES])
def test_a_layout_mistake_names_file_line_and_field(old, new, at, words):
    assert old in PHI3
    _assert_refused(PHI3.replace(old, new, 1), at, words)


@pytest.mark.parametrize("old,new,at,words", MISTAKES, ids=[m[2] for m in MISTAKES])
def test_a_mistake_names_file_line_and_field(old, new, at, words):
    assert old in QWEN3
    _assert_refused(QWEN3.replace(old, new, 1), at, words)


def _assert_refused(text: str, at: str, words: list[str]) -> None:
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
    (tmp_path / "falcon.py").write_text("")
    result = run("--check")
    assert result.returncode == 1 and "falcon.py has no spec" in result.stderr
    (tmp_path / "falcon.py").unlink()
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


def _readme_examples() -> dict:
    """The README's worked layout examples, compiled inside a minimal spec."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Worked examples", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    text = "\n".join([
        "family: examples", "architectures: [ExamplesForCausalLM]", "config:", "  hidden: hidden_size",
        "  heads: num_attention_heads", "  kv_heads: num_key_value_heads", "  head_dim: head_dim",
        "  ffn: intermediate_size", "  vocab: vocab_size", "  layers: num_hidden_layers", "  experts: num_experts",
        "  norm_eps: {field: rms_norm_eps, type: float, default: 1.0e-6}",
        "  rope_theta: {field: rope_theta, type: float, default: 10000.0}",
        "derived:", "  attn_width: heads * head_dim",
        "megatron: {normalization: RMSNorm, layernorm_epsilon: norm_eps, rotary_base: rope_theta}", "params:",
    ] + ["  " + line for line in block.splitlines()])
    from shardsync.harness.spec_check import module_from_spec

    module = module_from_spec(parse_spec(text, "README.md"), package="readme_examples")
    hf = {"architectures": ["ExamplesForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 384, "vocab_size": 1000,
          "num_hidden_layers": 1, "num_experts": 8}
    return {"module": module, "cfg": module.config_from_hf(hf)}


def test_the_readmes_worked_layout_examples_hold_what_their_comments_say():
    examples = _readme_examples()
    m, cfg = examples["module"], examples["cfg"]

    def rows(local):
        return [(p.hf_name.split(".")[-2], p.hf_box[0], p.local_box[0]) for p in local.pieces]

    assert all(rows(m.ROUTER.megatron_tensor(cfg, 0, r, 2)) == [("gate", (0, 8), (0, 8))] for r in range(2))
    assert m.LINEAR_PROJ.vllm_tensor(cfg, 0, 1, 2).pieces[0].hf_box == ((0, 64), (64, 128))
    embedding = m.WORD_EMBEDDINGS.megatron_tensor(cfg, None, 1, 2)
    assert rows(embedding) == [("embed_tokens", (512, 1000), (0, 488))] and embedding.padding[0][0] == (488, 512)
    assert rows(m.WORD_EMBEDDINGS.vllm_tensor(cfg, None, 1, 2)) == rows(embedding)
    assert rows(m.LINEAR_FC1.megatron_tensor(cfg, 0, 1, 2)) == [("gate_up_proj", (192, 384), (0, 192)),
                                                                  ("gate_up_proj", (576, 768), (192, 384))]
    assert rows(m.LINEAR_QKV.megatron_tensor(cfg, 0, 1, 2)) == [("q_proj", (64, 128), (0, 64)),
                                                                  ("k_proj", (32, 64), (64, 96)),
                                                                  ("v_proj", (32, 64), (96, 128))]
    for rank in range(4):
        kv = rank // 2 * 32
        assert rows(m.LINEAR_QKV.vllm_tensor(cfg, 0, rank, 4)) == [("q_proj", (rank * 32, rank * 32 + 32), (0, 32)),
                                                                     ("k_proj", (kv, kv + 32), (32, 64)),
                                                                     ("v_proj", (kv, kv + 32), (64, 96))]
    # the composed linear_qkv is `split: qkv` written out: the same tables at every rank
    shorthand = m._kinds.qkv(megatron=m.LINEAR_QKV.megatron, hf=[p.hf for p in m.LINEAR_QKV.parts],
                           vllm=m.LINEAR_QKV.vllm, stage="layer", heads="heads", kv_heads="kv_heads",
                           head_dim="head_dim", cols="hidden")
    assert shorthand == m.LINEAR_QKV
