"""The specs' HF names and shapes are those of real transformers models.

Tiny models are built from preset configs with random weights (no hub access);
every HF tensor the converters produce must be a parameter of the real model with
the same shape, and every parameter must be produced.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from shardsync import generated
from shardsync.presets import model_config

VARIANTS = [
    ("qwen3-tiny", {}),
    ("qwen3-tiny", {"tie_word_embeddings": False}),
    ("qwen2-tiny", {}),
    ("qwen2-tiny", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    ("llama-tiny", {}),
    ("llama-tiny", {"attention_bias": True, "mlp_bias": True}),
    ("mistral-tiny", {}),
    ("mistral-tiny", {"tie_word_embeddings": True}),
    ("phi3-tiny", {}),
    ("starcoder2-tiny", {}),
    ("starcoder2-tiny", {"tie_word_embeddings": False}),
    ("starcoder2-tiny", {"use_bias": False}),
]


@pytest.mark.parametrize("preset,overrides", VARIANTS, ids=[f"{p}{'-' + '-'.join(o) if o else ''}" for p, o in VARIANTS])
def test_converted_names_are_the_real_models_parameters(preset, overrides):
    hf = {**model_config(preset), **overrides}
    module = generated.for_architecture(hf["architectures"][0])
    cfg = module.config_from_hf(hf)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    config.architectures = hf["architectures"]
    with torch.device("meta"):
        model = getattr(transformers, hf["architectures"][0])(config)
    real = {name: tuple(p.shape) for name, p in model.named_parameters()}  # a tied lm_head is listed once

    converted = {}
    for family, layer in module.megatron_params(cfg):
        local = family.megatron_tensor(cfg, layer, 0, 1)
        full = torch.zeros(local.shape)
        for name, tensor in module.convert_to_hf(local.name, full, cfg, layout="tp1"):
            converted[name] = tuple(tensor.shape)
    assert converted == real
    assert module.hf_shapes(cfg) == real
