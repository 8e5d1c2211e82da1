"""One trainer rank of the demo's policy: a megatron-core GPTModel stage that scores
rollouts and takes policy-gradient steps, through Megatron's own pipeline schedules.

Batches are token sequences (prompt + completion) with where the completion starts.
Logprobs come from Megatron's vocab-parallel cross entropy, with the vocabulary
padding masked out: vLLM never puts probability on padding rows, and a trainer that
does reports a train/rollout gap that is not the sync's.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from shardsync.runtime.integrations.megatron.source import MegatronSource
from shardsync.harness.megatron_cpu import build_gpt_model, cpu_shims, init_parallel, needs_eval_mode


class PolicyRank:
    """Model stage, optimizer and source for one trainer rank.

    `world_size` is the whole trainer (tp x dp x pp): data-parallel replicas are real
    ranks that run every step, since megatron-core's expert ranks span them. Every rank
    gets the same batch, so replicas stay equal and any of them could report."""

    def __init__(self, hf_config: dict, rank: int, world_size: int, port: int, tp: int, pp: int, *,
                 ep: int = 1, etp: int | None = None, lr: float = 1e-3, seed: int = 1234,
                 params_dtype=torch.float32, timeout_s: float = 300.0):
        from megatron.core import parallel_state

        # on a machine without CUDA, every call into megatron-core runs under the CPU shims
        self.device_context = cpu_shims if not torch.cuda.is_available() else contextlib.nullcontext
        with self.device_context():
            self._build(hf_config, rank, world_size, port, tp, pp, ep, etp, lr, seed, params_dtype, timeout_s)
        self.parallel_state = parallel_state

    @classmethod
    def for_layout(cls, hf_config: dict, layout, rank: int, port: int, **options) -> "PolicyRank":
        """Global trainer rank `rank` of a Layout (its TP, PP, EP, ETP; DP from its world)."""
        return cls(hf_config, rank, layout.world, port, layout.train_tp, layout.train_pp, ep=layout.train_ep,
                   etp=layout.train_etp, **options)

    def _build(self, hf_config, rank, world_size, port, tp, pp, ep, etp, lr, seed, params_dtype, timeout_s) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        init_parallel(rank, world_size, port, tp, pp, seed=seed, timeout_s=timeout_s, ep=ep, etp=etp)
        self.hf_config = hf_config
        self.vocab = int(hf_config["vocab_size"])
        model = build_gpt_model(hf_config, params_dtype=params_dtype)
        self.eval_mode = needs_eval_mode(model)
        # Megatron's own gradient path: DDP buffers, then finalize_model_grads (which sums
        # q/k-norm grads over TP and tied-embedding grads over the pipeline) and its optimizer
        self.model = DistributedDataParallel(model.config, DistributedDataParallelConfig(), module=model)
        model.config.finalize_model_grads_func = finalize_model_grads
        # replicas start equal, as megatron-core's training loop makes them: over DP (and
        # expert DP) by DDP, over TP for what TP does not split
        self.model.broadcast_params()
        if self.eval_mode:
            _broadcast_tp_replicas(model)
            model.config.finalize_model_grads_func = _with_tp_replica_grads_averaged(finalize_model_grads, model)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0, clip_grad=0.0, params_dtype=params_dtype,
                            use_distributed_optimizer=False), [self.model])
        if self.eval_mode:
            self.model.eval()
        self.source = MegatronSource(self.model, hf_config)

    @property
    def is_last_stage(self) -> bool:
        return self.parallel_state.is_pipeline_last_stage()

    @property
    def reports(self) -> bool:
        """The rank whose results the driver reads: last stage, TP rank 0, DP rank 0."""
        return (self.is_last_stage and self.parallel_state.get_tensor_model_parallel_rank() == 0
                and self.parallel_state.get_data_parallel_rank() == 0)

    def logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]] | None:
        """Logprob of every completion token (on the last stage; None elsewhere)."""
        with torch.no_grad(), self.device_context():
            outputs = self._run(sequences, starts, None, forward_only=True)
        if not self.is_last_stage:
            return None
        logprobs = outputs[0]["logprobs"]
        return [logprobs[i, start - 1: len(seq) - 1].tolist() for i, (seq, start) in enumerate(zip(sequences, starts))]

    def train_step(self, sequences: list[list[int]], starts: list[int], advantages: list[float]) -> float | None:
        """One policy-gradient step: loss = -mean(advantage * logprob) over completion tokens."""
        with self.device_context():
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            outputs = self._run(sequences, starts, torch.tensor(advantages, dtype=torch.float32), forward_only=False)
            self.optimizer.step()
        return float(outputs[0]["loss"]) if self.is_last_stage else None

    def _run(self, sequences, starts, advantages, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batch = _batch(sequences, starts, advantages)
        length = batch["tokens"].shape[1]
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, vocab=self.vocab), data_iterator=iter([batch]),
            model=[self.model], num_microbatches=1, seq_length=length, micro_batch_size=len(sequences),
            forward_only=forward_only)


def _tp_replicas(model) -> list[torch.nn.Parameter]:
    """Parameters every TP rank holds whole (norms, router, shared-expert gate): not split
    by TP and not experts (those have their own expert groups)."""
    return [p for p in model.parameters()
            if not getattr(p, "tensor_model_parallel", False) and getattr(p, "allreduce", True)]


def _broadcast_tp_replicas(model) -> None:
    """TP rank 0's values of the TP-replicated parameters on every TP rank. An MoE model's
    router is initialized from each rank's own CPU generator, whose state the expert
    initialization before it has moved differently per rank."""
    from megatron.core import parallel_state

    group, src = parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_src_rank()
    for param in _tp_replicas(model):
        torch.distributed.broadcast(param.data, src=src, group=group)


def _with_tp_replica_grads_averaged(finalize, model):
    """`finalize_model_grads`, then the TP-replicated parameters' gradients averaged over
    TP. In eval() mode at TP > 1 (see `needs_eval_mode`) megatron-core's MoE layer gives
    each TP rank its own gradient for the router and the norms around it, which sequence
    parallelism would have summed; unaveraged, the TP replicas drift apart and no rank
    holds the model. Gloo has no AVG: sum, then divide."""
    from megatron.core import parallel_state

    replicas = _tp_replicas(model)

    def finalize_and_average(*args, **kwargs):
        finalize(*args, **kwargs)
        group = parallel_state.get_tensor_model_parallel_group()
        size = torch.distributed.get_world_size(group)
        for param in replicas:
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None:
                torch.distributed.all_reduce(grad, group=group)
                grad.div_(size)

    return finalize_and_average


def _batch(sequences, starts, advantages) -> dict:
    length = max(len(s) for s in sequences)
    tokens = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length - 1)
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        tokens[i, : len(seq)] = torch.tensor(seq)
        mask[i, start - 1: len(seq) - 1] = 1.0  # position p predicts token p + 1
    positions = torch.arange(length).unsqueeze(0).expand(len(sequences), -1)
    return {"tokens": tokens, "positions": positions, "mask": mask, "advantages": advantages}


def _forward_step(data_iterator, model, vocab: int):
    batch = next(data_iterator)
    logits = model(batch["tokens"], batch["positions"], None)
    return logits, partial(_loss, batch, vocab)


def _loss(batch: dict, vocab: int, logits: torch.Tensor):
    logprobs = token_logprobs(logits[:, :-1], batch["tokens"][:, 1:], vocab)
    mask = batch["mask"]
    if batch["advantages"] is None:
        loss = -(logprobs * mask).sum() / mask.sum()
    else:
        loss = -(batch["advantages"][:, None] * logprobs * mask).sum() / mask.sum()
    return loss, {"loss": loss.detach(), "logprobs": logprobs.detach()}


def token_logprobs(vocab_parallel_logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """log p(target) from [batch, seq, vocab / tp] logits, padding rows excluded."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    per_rank = vocab_parallel_logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * per_rank
    ids = torch.arange(first, first + per_rank)
    logits = vocab_parallel_logits.float().masked_fill(ids >= vocab, float("-inf"))
    # Megatron's cross entropy takes [seq, batch, vocab] and returns -log p
    return -vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), targets.t().contiguous()).t()
