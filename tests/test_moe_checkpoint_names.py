"""The oracle's MoE HF names and shapes are what transformers writes to a checkpoint.

transformers 5 holds an MoE layer's experts fused in memory (`mlp.experts.gate_up_proj`
[E, 2I, H], `mlp.experts.down_proj` [E, H, I], Mixtral's block included) but
`save_pretrained` writes one tensor per expert (`mlp.experts.{e}.gate_proj/up_proj/
down_proj`, Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2`): those are the names the
engines' loaders and `tests/reference.py` use. Each tiny MoE preset (and a few variants
and drawn configs) is built with random weights, saved into tmp_path and its
safetensors keys and shapes compared with `reference.hf_shapes`; the saved values are
compared with the in-memory fused tensors (gate first), and a checkpoint of the
oracle's random tensors loads without a missing or unexpected key into fused experts
[gate_e; up_e].
"""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from safetensors import safe_open
from safetensors.torch import save_file

from shardsync.presets import model_config
from tests import reference as ref
from tests.strategies import moe_configs

VARIANTS = [
    ("qwen3-moe-tiny", {}),
    ("qwen3-moe-tiny", {"tie_word_embeddings": True}),
    ("qwen3-moe-tiny", {"mlp_only_layers": [1]}),  # layer 1 dense: mlp.gate_proj etc.
    ("qwen3-moe-tiny", {"decoder_sparse_step": 2}),  # layer 0 dense, layer 1 sparse
    ("qwen3-moe-tiny-pad", {}),
    ("qwen3-moe-tiny-6e", {}),
    ("qwen2-moe-tiny", {}),
    ("qwen2-moe-tiny", {"mlp_only_layers": [0]}),
    ("mixtral-tiny", {}),
    ("mixtral-tiny", {"tie_word_embeddings": True}),
]


def _model(hf: dict):
    arch = hf["architectures"][0]
    config_class = getattr(transformers, arch.replace("ForCausalLM", "Config"))  # e.g. Qwen3MoeConfig
    config = config_class(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    config.architectures = hf["architectures"]
    torch.manual_seed(0)
    return getattr(transformers, arch)(config).float()


def _saved(model, path) -> dict[str, torch.Tensor]:
    model.save_pretrained(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


@pytest.mark.parametrize("preset,overrides", VARIANTS,
                         ids=[f"{p}{'-' + '-'.join(o) if o else ''}" for p, o in VARIANTS])
def test_checkpoint_names_and_shapes_are_the_oracles(preset, overrides, tmp_path):
    hf = {**model_config(preset), **overrides}
    m = ref.Model.from_hf(hf)
    model = _model(hf)
    saved = _saved(model, tmp_path)
    assert {k: tuple(t.shape) for k, t in saved.items()} == ref.hf_shapes(m)
    assert m.moe_layers  # every variant keeps a sparse layer

    # the per-expert tensors are the fused in-memory ones, gate rows first
    gate, up, down = ref.hf_expert_names(m)
    params = dict(model.named_parameters())
    for i in m.moe_layers:
        fused = f"model.layers.{i}.mlp.experts."
        block = f"model.layers.{i}.{ref.moe_block(m)}.experts."
        for e in range(m.experts):
            gate_up = params[fused + "gate_up_proj"][e]
            assert torch.equal(saved[f"{block}{e}.{gate}.weight"], gate_up[:m.moe_ffn])
            assert torch.equal(saved[f"{block}{e}.{up}.weight"], gate_up[m.moe_ffn:])
            assert torch.equal(saved[f"{block}{e}.{down}.weight"], params[fused + "down_proj"][e])

    # a checkpoint of the oracle's random tensors loads with no key missing or left
    # over, into fused experts holding [gate_e; up_e] and down_e
    hf_tensors = ref.random_hf(m, seed=7)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.json").write_text((tmp_path / "config.json").read_text())
    save_file(hf_tensors, str(ours / "model.safetensors"), metadata={"format": "pt"})
    loaded, info = type(model).from_pretrained(ours, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    params = dict(loaded.named_parameters())
    for i in m.moe_layers:
        block = f"model.layers.{i}.{ref.moe_block(m)}.experts."
        for e in range(m.experts):
            g, u, d = (hf_tensors[f"{block}{e}.{x}.weight"] for x in (gate, up, down))
            assert torch.equal(params[f"model.layers.{i}.mlp.experts.gate_up_proj"][e], torch.cat([g, u]))
            assert torch.equal(params[f"model.layers.{i}.mlp.experts.down_proj"][e], d)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_drawn_configs_checkpoint_names_are_the_oracles(family, tmp_path_factory):
    @settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(hf=moe_configs(family, dense_layers=True))
    def check(hf):
        saved = _saved(_model(hf), tmp_path_factory.mktemp(family))
        assert {k: tuple(t.shape) for k, t in saved.items()} == ref.hf_shapes(ref.Model.from_hf(hf))

    check()


def _checkpoint_shapes(model, m: ref.Model) -> dict[str, tuple[int, ...]]:
    """A model's parameters under the names save_pretrained writes: fused experts split per
    expert, Mixtral's in-memory `mlp` block renamed `block_sparse_moe`."""
    gate, up, down = ref.hf_expert_names(m)
    shapes = {}
    for name, p in model.named_parameters():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if layer is not None and int(layer) in m.moe_layers and ".mlp." in name:
            block = f"model.layers.{layer}.{ref.moe_block(m)}."
            if name.endswith("mlp.experts.gate_up_proj"):
                experts, rows, hidden = p.shape
                for e in range(experts):
                    shapes[f"{block}experts.{e}.{gate}.weight"] = (rows // 2, hidden)
                    shapes[f"{block}experts.{e}.{up}.weight"] = (rows // 2, hidden)
                continue
            if name.endswith("mlp.experts.down_proj"):
                for e in range(p.shape[0]):
                    shapes[f"{block}experts.{e}.{down}.weight"] = tuple(p.shape[1:])
                continue
            name = block + name.split(".mlp.", 1)[1]
        shapes[name] = tuple(p.shape)
    return shapes


# total parameters (the published model cards: 30.5B, 235B, 57B, 46.7B)
REAL = {"qwen3-30b-a3b": 30_532_122_624, "qwen3-235b-a22b": 235_093_634_560,
        "qwen2-57b-a14b": 57_408_658_944, "mixtral-8x7b": 46_702_792_704}


@pytest.mark.parametrize("preset", sorted(REAL))
def test_real_moe_presets_build_with_the_oracles_shapes(preset):
    hf = model_config(preset)
    m = ref.Model.from_hf(hf)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    with torch.device("meta"):
        model = getattr(transformers, hf["architectures"][0])(config)
    shapes = ref.hf_shapes(m)
    assert _checkpoint_shapes(model, m) == shapes
    assert sum(torch.Size(s).numel() for s in shapes.values()) == REAL[preset]
    assert len(m.moe_layers) == m.layers
