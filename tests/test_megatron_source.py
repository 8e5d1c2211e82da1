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
    assert "GPTModel.vocab_size is 1024" in messages["vocab padding"]
    assert "make_vocab_size_divisible_by=100 gives 1000" in messages["vocab padding"]
    assert "share_embeddings_and_output_weights is True" in messages["tied"]
    assert "ffn_hidden_size is 384" in messages["ffn"]


# ---- mixture of experts ------------------------------------------------------------

def _moe_rank(hf_config, layout, rank, dist_port, checks):
    """One MoE trainer rank: a step, its tensors, the gather path's HF state (rank 0), its
    Sender's table, and on rank 0 `check_model` against changed HF configs."""
    from shardsync.runtime.errors import ModelMismatchError, PlanError
    from shardsync.runtime.integrations.megatron.source import check_model
    from shardsync.harness.megatron_gather import gather_hf_state
    from shardsync.harness.megatron_policy import PolicyRank

    policy = PolicyRank.for_layout(hf_config, layout, rank, dist_port, timeout_s=120)
    loss = policy.train_step(*BATCH)
    source = policy.source
    tensors = source.tensors()
    params = [p.data_ptr() for p in source.model.parameters()]
    views = sum(t.data_ptr() in params for t in tensors.values())
    with policy.device_context():
        full = gather_hf_state(policy.model, source.module, source.cfg)
    if source.is_sender:
        shapes = source.sender(layout.infer_tp, layout.engines, rendezvous="127.0.0.1:1", timeout=5).local_shapes()
    else:
        try:
            source.sender(layout.infer_tp, layout.engines, rendezvous="127.0.0.1:1", timeout=5)
            shapes = "no refusal"
        except PlanError as exc:
            shapes = str(exc)
    messages = {}
    for label, change in (checks if rank == 0 else {}).items():
        saved = {k: getattr(source.model.config, k) for k in change.get("model", {})}
        for k, v in change.get("model", {}).items():
            setattr(source.model.config, k, v)
        try:
            check_model(policy.model, {**hf_config, **change.get("hf", {})}, layout.train_tp)
            messages[label] = None
        except ModelMismatchError as exc:
            messages[label] = str(exc)
        for k, v in saved.items():
            setattr(source.model.config, k, v)
    position = tuple(getattr(source, f) for f in ("pp_rank", "tp_rank", "dp_rank", "ep_rank", "etp_rank", "edp_rank"))
    return {"tensors": _pickled(tensors), "full": _pickled(full), "views": views, "shapes": shapes,
            "position": position, "messages": messages, "eval": policy.eval_mode,
            "loss": loss, "is_sender": source.is_sender}


MOE_CHECKS = {
    "same": {},
    "topk": {"hf": {"num_experts_per_tok": 1}},
    "experts": {"hf": {"num_experts": 8}},
    "expert ffn": {"hf": {"moe_intermediate_size": 96}},
    "routing": {"hf": {"norm_topk_prob": False}},
    "score function": {"model": {"moe_router_score_function": "sigmoid"}},
}


def _run_moe(model: str, layout: Layout, checks: dict) -> dict:
    hf_config = model_config(model)
    dist_port = free_port()
    ranks = [(f"trainer {r}", _moe_rank, (hf_config, layout, r, dist_port, checks)) for r in range(layout.world)]
    results = run_ranks(ranks, deadline_s=240, fail_fast_s=20)
    errors = {who: r["error"] for who, r in results.items() if "error" in r}
    assert not errors, errors
    return results


def _check_moe_tensors(model: str, layout: Layout, results: dict) -> None:
    """Every sender's tensors are the oracle's cut of the gathered HF state, by name,
    shape and value (vocab padding rows aside), and exactly the names and shapes its
    `source_table` gives; replica-only ranks say why they send nothing."""
    from shardsync import generated
    from shardsync.runtime.plan.build import source_table
    from tests.reference import Model, megatron_moe_rank, megatron_padding_rows

    hf_config = model_config(model)
    module = generated.for_architecture(hf_config["architectures"][0])
    cfg = module.config_from_hf(hf_config)
    full = _unpickled(results["trainer 0"]["full"])
    assert {n: tuple(t.shape) for n, t in full.items()} == dict(module.hf_shapes(cfg))  # the gather path, whole
    m = Model.from_hf(hf_config)
    senders = {src.rank for src in layout.senders}
    for r in range(layout.world):
        result, src = results[f"trainer {r}"], layout.trainer(r)
        assert result["position"] == (src.pp, src.tp, src.dp, src.ep, src.etp, src.edp)
        assert result["is_sender"] == (r in senders)
        assert result["loss"] is None or result["loss"] == result["loss"]  # finite: a real step ran
        if r not in senders:
            assert "holds only replicas" in result["shapes"], result["shapes"]
            continue
        table = {local.name: tuple(local.shape) for local in source_table(module, cfg, layout, src)}
        got = _unpickled(result["tensors"])
        assert {n: tuple(t.shape) for n, t in got.items()} == table == result["shapes"]
        assert result["views"] == len(got)  # read in place, no copy
        oracle = megatron_moe_rank(m, full, src.tp, layout.train_tp, src.ep, layout.train_ep, src.etp,
                                   layout.train_etp, vocab_divisible=128)
        different = []
        for name, tensor in got.items():
            rows = tensor.shape[0] - megatron_padding_rows(name, m, src.tp, layout.train_tp, 128)
            if not torch.equal(tensor[:rows], oracle[name][:rows]):
                different.append(name)
        assert different == [], f"trainer {r}: {different}"


def test_qwen3_moe_tp2_ep2_senders_hold_what_the_oracle_cuts_and_a_wrong_router_is_refused():
    layout = Layout(2, 1, 2, 1, train_ep=2, train_etp=1)  # world 2: rank r holds experts [2r, 2r + 1]
    results = _run_moe("qwen3-moe-tiny", layout, MOE_CHECKS)
    _check_moe_tensors("qwen3-moe-tiny", layout, results)
    assert results["trainer 0"]["eval"]  # MoE at TP 2 trains in eval() mode on CPU
    _check_refusals(results)


def test_qwen3_moe_tp2_ep2_etp2_dp2_every_rank_sends():
    # expert TP 2 x EP 2 spans 4 ranks: dense DP 2, and dp1's ranks hold experts 2, 3
    layout = Layout(2, 1, 2, 1, train_ep=2)
    assert layout.world == 4 and len(layout.senders) == 4
    _check_moe_tensors("qwen3-moe-tiny", layout, _run_moe("qwen3-moe-tiny", layout, {}))


def _check_refusals(results: dict) -> None:
    messages = results["trainer 0"]["messages"]
    assert messages["same"] is None
    assert messages["topk"].startswith("TransformerConfig.moe_router_topk is 2; the HF config implies 1 "
                                       "(from HF num_experts_per_tok=1)"), messages["topk"]
    assert messages["experts"].startswith("TransformerConfig.num_moe_experts is 4; the HF config implies 8 "
                                          "(from HF num_experts=8)"), messages["experts"]
    assert "is 64; the HF config implies 96 (from HF moe_intermediate_size=96)" in messages["expert ffn"]
    assert messages["routing"].startswith("TransformerConfig.moe_router_pre_softmax is False; the HF config "
                                          "implies True (from HF norm_topk_prob=False)"), messages["routing"]
    assert messages["score function"].startswith("TransformerConfig.moe_router_score_function is 'sigmoid'")


def test_qwen2_moe_tp2_shared_expert_and_its_gate_and_a_wrong_shared_size_is_refused():
    layout = Layout(2, 1, 1, 2)  # expert TP 2, EP 1: world 2
    checks = {"same": {}, "shared ffn": {"hf": {"shared_expert_intermediate_size": 128}}}
    results = _run_moe("qwen2-moe-tiny", layout, checks)
    _check_moe_tensors("qwen2-moe-tiny", layout, results)
    assert any("shared_experts.gate_weight" in n for n in _unpickled(results["trainer 1"]["tensors"]))
    messages = results["trainer 0"]["messages"]
    assert messages["same"] is None
    assert messages["shared ffn"].startswith("TransformerConfig.moe_shared_expert_intermediate_size is 64; the HF "
                                             "config implies 128 (from HF shared_expert_intermediate_size=128)")


def test_mixtral_ep2_with_data_parallel_replicas_that_send_nothing():
    layout = Layout(1, 1, 2, 1, train_ep=2, train_dp=4)  # ranks 2, 3: expert-DP 1, dense DP 2, 3
    results = _run_moe("mixtral-tiny", layout, {"same": {}, "experts": {"hf": {"num_local_experts": 2}}})
    _check_moe_tensors("mixtral-tiny", layout, results)
    assert not results["trainer 0"]["eval"]  # TP 1: a real train() step
    assert [r for r in range(4) if not results[f"trainer {r}"]["is_sender"]] == [2, 3]
    messages = results["trainer 0"]["messages"]
    assert messages["same"] is None
    assert "(from HF num_local_experts=2)" in messages["experts"]


def _plain_engine(hf_config, layout, engine, tp, port, wire_dtype, updates):
    """A plain engine rank: vLLM's layout as zeros, written by each update in place."""
    from shardsync.runtime.transfer import Receiver

    receiver = Receiver(hf_config, layout, engine=engine, tp_rank=tp, rendezvous=f"127.0.0.1:{port}",
                        dtype=wire_dtype, timeout=120, verify=True)  # as megatron_verify_rank's senders
    receiver.connect()
    params = {name: torch.zeros(shape, dtype=wire_dtype) for name, shape in receiver.tensor_shapes().items()}
    for _ in range(updates):
        receiver.update(params)
    receiver.close()
    return {"params": _pickled(params)}


def test_verify_rank_moves_a_live_moe_model_into_engines_as_its_gather_path_checkpoint_has_it(tmp_path):
    """`megatron_verify_rank` on every rank of TP 1 x EP 2 x DP 4 (two replica-only ranks
    that still step), two updates into a plain engine of TP 2: what arrives after the
    last is the vLLM cut of the checkpoint rank 0 wrote through the gather path."""
    from safetensors.torch import load_file

    from shardsync import generated
    from shardsync.harness.megatron_verify import megatron_verify_rank
    from shardsync.harness.tensors import materialize

    hf_config = model_config("mixtral-tiny")
    layout = Layout(1, 1, 2, 1, train_ep=2, train_dp=4)
    checkpoints = [str(tmp_path / f"ckpt-{u}") for u in (1, 2)]
    dist_port, port = free_port(), free_port()
    ranks = [(f"trainer {r}", megatron_verify_rank,
              (hf_config, layout, r, dist_port, port, checkpoints, "float32", 120)) for r in range(layout.world)]
    ranks += [(f"engine {e} tp{s}", _plain_engine, (hf_config, layout, e, s, port, torch.float32, 2))
              for e in range(layout.engines) for s in range(layout.infer_tp)]
    results = run_ranks(ranks, deadline_s=300, fail_fast_s=20)
    errors = {who: r["error"] for who, r in results.items() if "error" in r}
    assert not errors, errors
    assert [results[f"trainer {r}"]["sender"] for r in range(4)] == [True, True, False, False]
    assert all(results[f"trainer {r}"]["groups_during_updates"] == 0 for r in range(4))
    assert sum(results[f"trainer {r}"]["groups_created"] for r in range(4)) > 0
    module = generated.for_architecture(hf_config["architectures"][0])
    cfg = module.config_from_hf(hf_config)
    full = load_file(str(tmp_path / "ckpt-2" / "model.safetensors"))
    first = load_file(str(tmp_path / "ckpt-1" / "model.safetensors"))
    assert any(not torch.equal(full[n], first[n]) for n in full if ".experts." in n)  # the experts trained
    for e in range(layout.engines):
        for s in range(layout.infer_tp):
            expected = materialize(module.vllm_shard_table(cfg, s, layout.infer_tp), full, torch.float32)
            got = _unpickled(results[f"engine {e} tp{s}"]["params"])
            assert sorted(got) == sorted(expected)
            different = [n for n in expected if not torch.equal(got[n], expected[n])]
            assert different == [], different
