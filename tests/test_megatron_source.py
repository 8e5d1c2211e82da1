"""A live megatron-core model as the sender's source (no vLLM here: plain receivers).

Each case runs real megatron-core ranks over gloo on the CPU (the demo's CPU shims),
takes a real optimizer step, and checks what arrives against megatron-core's own
sharded state dict gathered and converted whole (the seed's gather path).
"""

from __future__ import annotations

import io

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is installed by `make` (requirements/lock.txt)")

import torch  # noqa: E402

from shardsync.runtime.plan import Layout  # noqa: E402
from shardsync.harness.local_cluster import free_port, run_ranks  # noqa: E402
from shardsync.presets import model_config  # noqa: E402

BATCH = ([[5, 9, 100, 42, 7, 8, 1], [7, 3, 3, 800, 2, 2]], [4, 3], [1.0, -1.0])


def _trainer(hf_config, layout, rank, dist_port, port, params_dtype, wire_dtype):
    from shardsync.harness.megatron_gather import gather_hf_state
    from shardsync.harness.megatron_policy import PolicyRank

    policy = PolicyRank(hf_config, rank, layout.world, dist_port, layout.train_tp, layout.train_pp,
                        params_dtype=params_dtype, timeout_s=120)
    source = policy.source
    sender = source.sender(layout.infer_tp, layout.engines, rendezvous=f"127.0.0.1:{port}", dtype=wire_dtype,
                           timeout=120)
    sender.connect()
    policy.train_step(*BATCH)
    tensors = source.tensors()
    params = dict(source.model.named_parameters())
    shared = sum(any(t.data_ptr() == p.data_ptr() for p in params.values()) for t in tensors.values())
    with policy.device_context():
        full = gather_hf_state(policy.model, source.module, source.cfg)
    sender.update(tensors)
    sender.close()
    return {"full": _pickled(full), "views": shared, "tensors": len(tensors),
            "dtypes": sorted({str(t.dtype) for t in tensors.values()})}


def _engine(hf_config, layout, tp, port, wire_dtype):
    from shardsync.runtime.transfer import Receiver

    receiver = Receiver(hf_config, layout, engine=0, tp_rank=tp, rendezvous=f"127.0.0.1:{port}", dtype=wire_dtype,
                        timeout=120)
    receiver.connect()
    params = {name: torch.zeros(shape, dtype=wire_dtype) for name, shape in receiver.tensor_shapes().items()}
    receiver.update(params)
    receiver.close()
    return {"params": _pickled(params)}


def _pickled(tensors) -> bytes:
    """Tensors out of a rank process as bytes: a tensor put on the result queue as is
    lives in shared memory that goes away with the process."""
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def _unpickled(data: bytes):
    return torch.load(io.BytesIO(data))


@pytest.mark.parametrize("train_tp, train_pp, infer_tp, params_dtype, wire", [
    (2, 1, 2, torch.float32, torch.bfloat16),  # cast to bf16 while packing
    (1, 2, 1, torch.bfloat16, torch.float32),  # bf16 linears and fp32 norms in one model
])
def test_live_parameters_arrive_as_the_gather_path_has_them(train_tp, train_pp, infer_tp, params_dtype, wire):
    from shardsync.harness.tensors import materialize

    hf_config = model_config("qwen3-tiny")
    layout = Layout(train_tp, train_pp, infer_tp, 1)
    dist_port, port = free_port(), free_port()
    ranks = [(f"trainer {r}", _trainer, (hf_config, layout, r, dist_port, port, params_dtype, wire))
             for r in range(layout.world)]
    ranks += [(f"engine tp{s}", _engine, (hf_config, layout, s, port, wire)) for s in range(infer_tp)]
    results = run_ranks(ranks, deadline_s=240, fail_fast_s=20)
    errors = {who: r["error"] for who, r in results.items() if "error" in r}
    assert not errors, errors
    trainer0 = results["trainer 0"]
    if params_dtype == torch.bfloat16:  # linears bf16, megatron-core's torch norms fp32
        assert trainer0["dtypes"] == ["torch.bfloat16", "torch.float32"]
    for r in range(layout.world):
        assert results[f"trainer {r}"]["views"] == results[f"trainer {r}"]["tensors"]  # read in place, no copy
    from shardsync import generated

    module = generated.for_architecture(hf_config["architectures"][0])
    cfg = module.config_from_hf(hf_config)
    full = {name: t.float() for name, t in _unpickled(trainer0["full"]).items()}
    for s in range(infer_tp):
        expected = materialize(module.vllm_shard_table(cfg, s, infer_tp), full, wire)
        got = _unpickled(results[f"engine tp{s}"]["params"])
        assert sorted(got) == sorted(expected)
        different = [n for n in expected if not torch.equal(got[n], expected[n])]
        assert different == [], different


def _check(hf_config, checks):
    from shardsync.runtime.errors import ModelMismatchError
    from shardsync.runtime.integrations.megatron.source import check_model
    from shardsync.harness.megatron_policy import PolicyRank

    policy = PolicyRank(hf_config, 0, 1, free_port(), 1, 1, timeout_s=60)
    messages = {}
    for label, (changes, divisible_by) in checks.items():
        try:
            check_model(policy.model, {**hf_config, **changes}, 1, divisible_by)
            messages[label] = None
        except ModelMismatchError as exc:
            messages[label] = str(exc)
    return messages


def test_a_model_that_differs_from_the_hf_config_is_refused_by_field():
    checks = {
        "same": ({}, 128),
        "kv heads": ({"num_key_value_heads": 1}, 128),
        "norm eps": ({"rms_norm_eps": 1e-5}, 128),
        "rope": ({"rope_theta": 10000.0}, 128),
        "vocab padding": ({}, 100),
        "tied": ({"tie_word_embeddings": False}, 128),
        "ffn": ({"intermediate_size": 512}, 128),
    }
    results = run_ranks([("trainer", _check, (model_config("qwen3-tiny"), checks))], deadline_s=180)
    messages = results["trainer"]
    assert "error" not in messages, messages.get("error")
    assert messages["same"] is None
    assert messages["kv heads"].startswith("TransformerConfig.num_query_groups is 2")
    assert messages["norm eps"].startswith("TransformerConfig.layernorm_epsilon is 1e-06")
    assert "rotary_base is 1e+06" in messages["rope"]
    assert "GPTModel.vocab_size is 1024" in messages["vocab padding"] and "make_vocab_size_divisible_by=100 gives 1000" in messages["vocab padding"]
    assert "share_embeddings_and_output_weights is True" in messages["tied"]
    assert "ffn_hidden_size is 384" in messages["ffn"]
