"""Wires a training run from the composed config: the only place that instantiates from config.

config -> process group -> tokenizer -> data (rank 0 first) -> model (under zero.Init for ZeRO-3) -> LoRA ->
DeepSpeed engine -> loop -> final/ (HF format) + eval_results.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from finetune import distributed
from finetune.config import ConfigError, RunConfig, parse_config
from finetune.distributed import DistInfo
from finetune.model import GPTJConfig, GPTJPreTrainedModel, build_model
from finetune.model.gptj import init_module_weights
from finetune.model.tokenizer import GPTJTokenizer
from finetune.planning.choice import largest_parameter_numel
from finetune.tasks import Task, get_task
from finetune.training import nvme
from finetune.training.checkpoints import Checkpointer
from finetune.training.compile import CompileWatch, check_toolchain
from finetune.training.data_order import total_optimizer_steps
from finetune.training.engine import build_ds_config, initialize, load_ds_json, offload_devices, zero_stage
from finetune.training.errors import RankFailureError, TrainingError
from finetune.training.evaluation import write_eval_results
from finetune.training.loop import LoopResult, collective_failure, train
from finetune.training.resume import (
    RunLayout,
    check_convertible,
    check_same_model,
    model_signature,
    needs_conversion,
    plan_batch_layout,
    stage_change_supported,
)

TRAINING_ERROR_EXIT_CODE = 3  # stopped by the loop itself (see finetune.training.errors); 2 is a user error


def register_resolvers() -> None:
    """`${launch_stamp:}` for the default run dir: equal on every rank of one launch (see distributed.launch_stamp)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("launch_stamp"):
        OmegaConf.register_new_resolver("launch_stamp", distributed.launch_stamp, use_cache=True)


def hydra_run_dir() -> Path:
    """The run dir Hydra created for this process (the working directory when run outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()


def agree_on_run_dir(info: DistInfo, own_dir: Path) -> Path:
    """Rank 0's run dir on every rank; a rank whose clock put Hydra's dir elsewhere removes its empty stray."""
    run_dir = Path(distributed.broadcast_object(str(own_dir.resolve())))
    if own_dir.resolve() != run_dir and own_dir.is_dir():
        with contextlib.suppress(OSError):
            own_dir.rmdir()  # only when empty: never delete anything a user put there
    return run_dir


def model_config(run: RunConfig, task_overrides: dict[str, Any]) -> GPTJConfig:
    """The GPT-J config to build: the checkpoint's (model.path) or the preset's, with model.overrides and the
    task's tweaks (num_labels, pad_token_id, ...) applied."""
    import dataclasses

    from finetune.model.hf_weights import read_config, resolve_model_dir

    overrides = {**run.model.overrides, **task_overrides}
    if run.model.path is None:
        return GPTJConfig.preset(run.model.name, **overrides)
    base = read_config(resolve_model_dir(run.model.path))
    unknown = set(overrides) - {f.name for f in dataclasses.fields(GPTJConfig)}
    if unknown:
        raise ConfigError(
            f"model.overrides has unknown GPT-J config keys {sorted(unknown)}; use GPTJConfig field names."
        )
    return dataclasses.replace(base, **overrides)


def build_training_model(
    run: RunConfig, config: GPTJConfig, *, ds_config: dict[str, Any], info: DistInfo
) -> GPTJPreTrainedModel:
    """The model to train, on CPU (DeepSpeed moves it): pretrained weights from model.path or a seeded random init.

    ZeRO-3 builds it under `deepspeed.zero.Init`, so each rank only ever holds its partition; random init then
    runs module by module on rank 0 inside GatheredParameters (zero.Init partitions right after each submodule's
    __init__). Both paths draw the same random numbers from the same seed, so ZeRO-3 and ZeRO-2 start equal.
    """
    import deepspeed

    from finetune.builders import torch_dtype
    from finetune.model.hf_weights import load_state_into, resolve_model_dir

    dtype = torch_dtype(run.model.dtype)
    partitioned = zero_stage(ds_config) == 3
    if run.lora.quantized:
        return _quantized_training_model(run, config, dtype=dtype, partitioned=partitioned)
    fused = run.model.uses_fused_projections(run.lora)
    if partitioned:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build_model(config, task=run.task, init=False, fused_projections=fused)
    else:  # meta: the checkpoint's tensors become the parameters, no throwaway init
        model = build_model(config, task=run.task, device="meta" if run.model.path else None, init=False,
                            fused_projections=fused)
    if run.model.path is not None:
        load_state_into(model, resolve_model_dir(run.model.path), dtype=dtype)
    else:
        torch.manual_seed(run.trainer.seed)
        for module in model.modules():  # the order of model.init_weights(): same numbers on every path
            params = list(module.parameters(recurse=False))
            if not params:
                continue
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=partitioned):
                if info.is_main or not partitioned:
                    init_module_weights(module, config.initializer_range)
        if not partitioned:
            model = model.to(dtype)
    return _for_training(model, run, config)


def _for_training(model: GPTJPreTrainedModel, run: RunConfig, config: GPTJConfig) -> GPTJPreTrainedModel:
    from finetune.builders import loss_chunk_tokens

    model.gradient_checkpointing_enable(run.model.gradient_checkpointing)
    if run.task == "clm":
        model.loss_chunk_tokens = loss_chunk_tokens(run.model, config)
    return model


def _quantized_training_model(run: RunConfig, config: GPTJConfig, *, dtype: torch.dtype,
                              partitioned: bool) -> GPTJPreTrainedModel:
    """lora=qlora: the base with its block linears in 4-bit NF4, computing in trainer.precision. From model.path
    each weight is quantized as it is read (the 16-bit model is never whole in memory); a random init is drawn
    as for lora=lora (same seed, same numbers) and then quantized layer by layer.

    ZeRO-3 (`partitioned`): the model is built whole on every rank and `deepspeed.initialize` partitions it. The
    packed 4-bit bytes are then stored in the precision's float dtype (bitsandbytes' quant_storage, as transformers'
    `bnb_4bit_quant_storage` for ZeRO-3), the dtype the engine casts float parameters to, so ZeRO-3 partitions and
    gathers them as bytes; the quantization constants stay on each parameter object, whole on every rank."""
    from finetune.builders import torch_dtype
    from finetune.model.hf_weights import resolve_model_dir
    from finetune.model.quantized import NF4Settings, load_quantized_into, quantize_linears

    from deepspeed.accelerator import get_accelerator

    precision = torch_dtype(run.trainer.precision)
    settings = NF4Settings(compute_dtype=precision, quant_storage=precision if partitioned else torch.uint8)
    if run.model.path is not None:
        model = build_model(config, task=run.task, device="meta", init=False)
        # Straight onto this rank's accelerator, where DeepSpeed would move it: a GPU quantizes GPT-J 6B in seconds.
        load_quantized_into(model, resolve_model_dir(run.model.path), dtype=dtype, settings=settings,
                            device=get_accelerator().current_device_name())
    else:
        model = quantize_linears(original_base_model(run, config), settings)
    return _for_training(model, run, config)


def original_base_model(run: RunConfig, config: GPTJConfig) -> GPTJPreTrainedModel:
    """The base model in model.dtype, unquantized and not ZeRO-partitioned: model.path's weights or the seeded
    random init (the numbers build_training_model draws). QLoRA merges its adapter into these weights."""
    from finetune.builders import torch_dtype
    from finetune.model.hf_weights import load_state_into, resolve_model_dir

    dtype = torch_dtype(run.model.dtype)
    if run.model.path is not None:
        model = build_model(config, task=run.task, device="meta", init=False)
        load_state_into(model, resolve_model_dir(run.model.path), dtype=dtype)
        return model
    model = build_model(config, task=run.task, init=False)
    torch.manual_seed(run.trainer.seed)
    for module in model.modules():  # the order of model.init_weights(), as in build_training_model
        if list(module.parameters(recurse=False)):
            init_module_weights(module, config.initializer_range)
    return model.to(dtype)


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    # ZeRO-3 partitioned parameters keep their full size in ds_numel, 4-bit ones (packed 2 per byte) in their
    # quantization state's shape.
    def numel(p: torch.nn.Parameter) -> int:
        state = getattr(p, "quant_state", None)
        return math.prod(state.shape) if state is not None else getattr(p, "ds_numel", p.numel())

    return sum(numel(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def export_final(engine, *, run: RunConfig, config: GPTJConfig, tokenizer: GPTJTokenizer, info: DistInfo,
                 run_dir: Path) -> Optional[Path]:
    """Write run_dir/final in HF format (rank 0; every rank takes part in gathering ZeRO-3 weights).

    With LoRA, final/ holds the adapter (peft format, base = model.path) and the tokenizer; with merged weights
    (lora.merge_into_final, or always after a random-init base, whose adapter alone could not be used) final/
    holds the merged model and the adapter moves to final/adapter/: transformers applies an adapter it finds
    next to the weights, which would add the LoRA delta a second time.
    """
    from finetune.builders import torch_dtype
    from finetune.model.hf_weights import save_pretrained

    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()  # full on rank 0, None elsewhere
    elif info.is_main:
        state = {k: v.detach().to("cpu", copy=True) for k, v in engine.module.state_dict().items()}
    if not info.is_main:
        return None
    final = run_dir / "final"
    dtype = torch_dtype(run.model.dtype)
    private = run.trainer.private_outputs
    if not run.lora.enabled:
        save_pretrained(state, final, config=config, task=run.task, dtype=dtype, overwrite=True,
                        extra_writer=tokenizer.save_pretrained, private=private)
        return final
    from finetune.model.hf_weights import make_staging_dir, publish_dir
    from finetune.training.lora import merged_state_dict, save_adapter

    def write_adapter(directory: Path) -> None:
        save_adapter(engine.module, directory, gathered_state_dict=state, base_model_name_or_path=run.model.path)

    if not (run.lora.merge_into_final or run.model.path is None):
        staging = make_staging_dir(final, private=private)
        write_adapter(staging)
        tokenizer.save_pretrained(staging)
        publish_dir(staging, final, private=private)
        return final
    adapter_staging = run_dir / ".final.adapter.staging"
    shutil.rmtree(adapter_staging, ignore_errors=True)
    write_adapter(adapter_staging)  # before merging: merged_state_dict consumes `state`
    if run.lora.quantized:  # into the original 16-bit weights, not the 4-bit ones trained on
        from finetune.training.lora import merged_quantized_state_dict

        original = original_base_model(run, config).state_dict()
        merged = merged_quantized_state_dict(dict(state), original, run.lora)
    else:
        merged = merged_state_dict(dict(state), run.lora)

    def add_tokenizer_and_adapter(directory: Path) -> None:
        tokenizer.save_pretrained(directory)
        adapter_staging.rename(directory / "adapter")

    save_pretrained(merged, final, config=config, task=run.task, dtype=dtype, overwrite=True,
                    extra_writer=add_tokenizer_and_adapter, private=private)
    return final


AUTO_CHOICE_FILE = "deepspeed_auto.json"  # in the run dir: the config `deepspeed=auto` picked, and for how many ranks


def deepspeed_json(run: RunConfig, *, is_main: bool = True, run_dir: Optional[Path] = None,
                   world_size: int = 1, resuming: Optional[RunLayout] = None) -> tuple[dict[str, Any], str]:
    """The DeepSpeed JSON to fill and where it came from: deepspeed.config_file, or for `deepspeed=auto` the memory
    planner's choice. A config that cannot fit the cluster is refused here, before data and model (ConfigError;
    deepspeed.check_memory=false skips that). Collective when it plans: every rank calls it.

    `deepspeed=auto` records its pick in run_dir. A relaunch of that run dir (a resume) on the same number of
    ranks keeps it. On another number it plans again: a checkpoint (`resuming`, its layout) is converted to the
    new pick's partitioning; where DeepSpeed cannot convert between the two (another ZeRO stage), the old pick is
    kept if it fits the new cluster, and refused with what to do if it does not."""
    from finetune.planning import choice as memory_choice

    if run.deepspeed.config_file != "auto":
        base, source = load_ds_json(run.deepspeed.config_file)
        if run.deepspeed.check_memory:
            memory_choice.check_memory(run, model_config(run, {}), base, source=source, is_main=is_main)
        return base, source
    record = run_dir / AUTO_CHOICE_FILE if run_dir is not None else None
    # Rank 0's view decides: another rank could see the file rank 0 is about to write and skip the collective.
    recorded = distributed.broadcast_object(
        json.loads(record.read_text()) if is_main and record is not None and record.is_file() else None)
    if recorded is not None and recorded.get("world_size", world_size) == world_size:
        if is_main:
            print(f"deepspeed=auto: keeping {recorded['config_file']}, chosen at this run's first launch ({record}).",
                  flush=True)
        return load_ds_json(recorded["config_file"])
    model = model_config(run, {})
    config_file = memory_choice.choose_config_file(run, model, is_main=is_main)
    if recorded is not None and config_file != recorded["config_file"]:
        before, now = recorded["config_file"], config_file
        before_base, before_source = load_ds_json(before)
        saved_stage = resuming.zero_stage if resuming is not None else None
        if saved_stage is not None and not stage_change_supported(saved_stage, zero_stage(load_ds_json(now)[0])):
            try:
                memory_choice.check_memory(run, model, before_base, source=before_source, is_main=False)
            except ConfigError:
                raise ConfigError(
                    f"deepspeed=auto: on {world_size} rank(s) this run's checkpoint config {before} "
                    f"(ZeRO-{saved_stage}, chosen for {recorded.get('world_size', '?')} ranks) no longer fits, "
                    f"and the planner's pick {now} uses another ZeRO stage, into which DeepSpeed cannot load the "
                    f"checkpoint. Resume on {recorded.get('world_size', 'the former number of')} ranks, or give "
                    "the memory with deepspeed.device_memory_gb / deepspeed.cpu_memory_gb if the estimate is "
                    "wrong; nothing in the run dir was changed."
                ) from None
            config_file = before
            if is_main:
                print(f"deepspeed=auto: keeping {before} for {world_size} rank(s), where it still fits: the "
                      f"planner's pick {now} uses another ZeRO stage, into which DeepSpeed cannot load this "
                      "run's checkpoint.", flush=True)
        elif is_main:
            print(f"deepspeed=auto: re-planned for {world_size} rank(s): {now} (was {before} for "
                  f"{recorded.get('world_size', '?')} ranks).", flush=True)
    if record is not None and is_main:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"config_file": config_file, "world_size": world_size}) + "\n")
    return load_ds_json(config_file)


def conversion_workers(info: DistInfo) -> int:
    """Processes for the universal conversion on rank 0: the node's CPUs shared with its other ranks."""
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE, srun SLURM_NTASKS_PER_NODE
    local = (os.environ.get(key) for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"))
    local_ranks = int(next((value for value in local if value and value.isdigit()), 1))
    return max(1, min(8, (os.cpu_count() or 1) // max(1, local_ranks)))


def run(cfg: Any, *, run_dir: Optional[Path] = None) -> Optional[LoopResult]:
    """Train as the composed config says; returns the loop's result (eval results on rank 0).

    `run_dir`: the run dir when not Hydra's (several runs in one process group: tests, benchmarks)."""
    run_cfg = parse_config(cfg)
    task = get_task(run_cfg.task)
    info = distributed.init_distributed(collective_timeout_s=run_cfg.trainer.collective_timeout_s)
    failed = False
    at_end = contextlib.ExitStack()  # after the last barrier: removes the run's NVMe swap directory, unlocks
    try:
        return _run(run_cfg, task, info, run_dir or hydra_run_dir(), at_end)
    except TrainingError as err:  # the loop's own stop (non-finite loss, disk full, a rank gone): no traceback
        failed = True
        if isinstance(err, RankFailureError):  # every rank says it: which one died is not known here
            print(f"error: {_with_peer_failures(err)}", file=sys.stderr, flush=True)
        elif info.is_main:  # the ranks agree: rank 0 says it once
            print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(TRAINING_ERROR_EXIT_CODE) from None
    except RuntimeError as err:
        failed = True
        if not collective_failure(err, info):
            distributed.announce_failure(f"{type(err).__name__}: {err}")
            raise
        # A collective outside the loop (setup, export) failed: a peer died or hangs.
        failure = RankFailureError(
            f"Rank {info.rank}: a collective operation failed ({str(err).splitlines()[0][:300]}). Another rank has "
            "most likely died (its output above says why) or stopped answering."
        )
        print(f"error: {_with_peer_failures(failure)}", file=sys.stderr, flush=True)
        raise SystemExit(TRAINING_ERROR_EXIT_CODE) from None
    except BaseException as err:
        # This rank stops here. It must not meet the others at a barrier: they may be waiting in another
        # collective, with which the barrier would pair. Exiting ends their collectives at once instead.
        failed = True
        if not isinstance(err, SystemExit):
            distributed.announce_failure(f"{type(err).__name__}: {err}")
        raise
    finally:
        # The group lives until exit (init_distributed registers its teardown): a Hydra multirun runs the next
        # point in this process, and destroying then re-creating the group on the same port hangs.
        if not failed:
            distributed.long_barrier()
        at_end.close()


def _with_peer_failures(err: RankFailureError) -> str:
    """The error, plus what the ranks that failed first announced before exiting (see distributed.announce_failure)."""
    peers = distributed.announced_failures()
    if not peers:
        return str(err)
    said = "; ".join(f"rank {rank}: {message}" for rank, message in sorted(peers.items()))
    return f"{err} The ranks that failed said: {said}"


def claim_run_dir(run_dir: Path, run: RunConfig, info: DistInfo, at_end: contextlib.ExitStack) -> None:
    """Rank 0 checks the run dir's permissions and takes its lock (released by `at_end`); every rank raises the
    same error when either fails (finetune.training.run_dir)."""
    from finetune.training.run_dir import RunDirLock, check_permissions

    problem: Optional[Exception] = None
    if info.is_main:
        lock = RunDirLock(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)  # Hydra makes its own; a run dir passed in may not exist yet
            check_permissions(run_dir, allow_shared=run.trainer.allow_shared_run_dir)
            lock.acquire()
            at_end.callback(lock.release)
        except ConfigError as err:
            problem = err
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise problem


def _run(run: RunConfig, task: Task, info: DistInfo, own_run_dir: Path, at_end: contextlib.ExitStack) -> LoopResult:
    from deepspeed.accelerator import get_accelerator

    from finetune.logging import RunLogger, mfu, peak_flops_for_device
    from finetune.training.preemption import PreemptionHandler

    run_dir = agree_on_run_dir(info, own_run_dir)
    if info.is_main:
        print(f"Run dir: {run_dir}", flush=True)
    claim_run_dir(run_dir, run, info, at_end)  # before anything in it is read, cleared or truncated
    distributed.seed_everything(run.trainer.seed)
    swap_subdir = nvme.swap_subdir(run_dir)
    nvme.clear_stale(run.deepspeed.nvme_path, swap_subdir, info=info)  # before the planner measures free space
    checkpointer = Checkpointer(run_dir / "checkpoints", info=info, keep_last=run.trainer.keep_last)
    # Read before anything is built: the layout and model of the checkpoint decide the batch split and whether
    # it needs converting, and a mismatch is refused here rather than deep inside DeepSpeed's loader.
    point = checkpointer.find_resume_point()
    if point is not None and point.layout is not None:
        trainer, notice = plan_batch_layout(point.layout, run.trainer, info.world_size, checkpoint=str(point.path))
        if notice and info.is_main:
            print(notice, flush=True)
        run = dataclasses.replace(run, trainer=trainer)
    if point is not None and run.model.fused_projections == "auto":
        # auto follows the checkpoint: one written unfused (or before the option existed) resumes unfused.
        fused = (point.model or {}).get("fused_projections", False) and not run.lora.enabled
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, fused_projections=fused))
    base, source = deepspeed_json(run, is_main=info.is_main, run_dir=run_dir, world_size=info.world_size,
                                  resuming=point.layout if point is not None else None)
    largest_param = largest_parameter_numel(model_config(run, {}), task=run.task)

    def ds_config_for(total_steps: int) -> dict[str, Any]:
        return build_ds_config(
            base, source=source, trainer=run.trainer, optim=run.optim, scheduler=run.scheduler,
            world_size=info.world_size, total_steps=total_steps, nvme_path=run.deepspeed.nvme_path,
            swap_subdir=swap_subdir, largest_param_numel=largest_param, accelerator=get_accelerator().device_name(),
        )

    first = ds_config_for(run.trainer.max_steps or 1)  # a contradicting JSON fails now, not after data processing
    if run.trainer.compile:  # a missing compiler fails now too, not at the first step
        check_toolchain(get_accelerator().device_name())
    swap_dirs = nvme.prepare_for_run(run, first, model_config(run, {}), info=info)  # [] without NVMe offload
    at_end.callback(nvme.remove_swap_dirs, swap_dirs, info=info)
    tokenizer = GPTJTokenizer.from_pretrained(_tokenizer_source(run))
    with distributed.main_process_first(info):
        data = task.load_data(run.data, tokenizer)
    config = model_config(run, task.model_overrides(data, tokenizer))
    tokenizer.check_fits(config.vocab_size)
    if run.data.max_seq_len > config.n_positions:
        raise ConfigError(
            f"data.max_seq_len={run.data.max_seq_len} exceeds the model's n_positions ({config.n_positions}); "
            f"lower data.max_seq_len to at most {config.n_positions}."
        )
    signature = model_signature(config, task=run.task, lora=run.lora,
                                fused_projections=run.model.uses_fused_projections(run.lora))
    if point is not None:
        check_same_model(point.model, signature, checkpoint=str(point.path))

    total_steps = total_optimizer_steps(run.trainer, num_rows=len(data.train), world_size=info.world_size)
    ds_config = ds_config_for(total_steps)
    layout = RunLayout(world_size=info.world_size, micro_batch_size=run.trainer.micro_batch_size,
                       grad_accum_steps=run.trainer.grad_accum_steps, zero_stage=zero_stage(ds_config),
                       offload=tuple(sorted(offload_devices(ds_config))), config_file=source)
    checkpointer.layout, checkpointer.model = layout, signature
    load_tag = None
    if point is not None and point.layout is not None and needs_conversion(point.layout, layout):
        check_convertible(point.layout, layout, checkpoint=str(point.path))
        if info.is_main:
            print(f"Resuming {point.path}, written as {point.layout.partitioning()}, as {layout.partitioning()}: "
                  "it is loaded from DeepSpeed's universal form.", flush=True)
        load_tag = checkpointer.universal_copy(point, workers=conversion_workers(info))
        ds_config["checkpoint"] = {**(ds_config.get("checkpoint") or {}), "load_universal": True}
    model = build_training_model(run, config, ds_config=ds_config, info=info)
    distributed.seed_everything(run.trainer.seed)  # training randomness (dropout) independent of how init drew
    num_params = count_parameters(model)
    if run.lora.enabled:
        from finetune.training.lora import apply_lora

        model = apply_lora(model, run.lora)
    trainable = count_parameters(model, trainable_only=True)
    compile_watch = CompileWatch() if run.trainer.compile else None
    engine = initialize(model, ds_config, weight_decay=run.optim.weight_decay, compile=run.trainer.compile)

    start = None
    if point is not None:  # the newest complete checkpoint
        start = checkpointer.resume(engine, point, seed=run.trainer.seed, load_tag=load_tag)
    resuming = start is not None
    if info.is_main:
        what = f"Resuming at step {engine.global_steps}:" if resuming else "Training"
        print(
            f"{what} {run.task} | {num_params / 1e6:.1f}M params"
            f"{f' ({trainable / 1e6:.2f}M trainable)' if trainable != num_params else ''} | "
            f"ZeRO-{zero_stage(ds_config)}{_offload_note(ds_config)} | {type(engine.basic_optimizer).__name__} | "
            f"world {info.world_size} | {total_steps} steps | "
            f"batch {ds_config['train_batch_size']} = {run.trainer.micro_batch_size} x {run.trainer.grad_accum_steps} "
            f"x {info.world_size} | {len(data.train)} train rows",
            flush=True,
        )
    peak = peak_flops_for_device(engine.device)

    def mfu_of(tokens_per_s: float) -> Optional[float]:  # tokens of all ranks against the peak of all ranks
        return mfu(tokens_per_s, num_params, config.n_layer, config.n_embd, run.data.max_seq_len,
                   peak and peak * info.world_size)

    preemption = PreemptionHandler().install()
    logger = RunLogger(run_dir, is_main=info.is_main, logger_cfg=run.logger, config_dict=run.raw, resume=resuming)
    with logger:
        if run.data.on_bad_row == "skip":  # rows each split lost to bad data: W&B data/skipped_rows_train, ...
            logger.log(engine.global_steps, "data", data.skipped_row_metrics())
        with logger.progress(total_steps, initial_step=engine.global_steps) as progress:
            result = train(
                engine, task=task, data=data, data_cfg=run.data, trainer=run.trainer,
                collate=task.collator(tokenizer, run.data), info=info, total_steps=total_steps,
                checkpointer=checkpointer,
                start=start, progress=progress, mfu_of=mfu_of,
                log=compile_watch.reporting(logger.log, is_main=info.is_main) if compile_watch else logger.log,
                stop_requested=preemption.requested_on_any_rank,
            )
        if result.completed:
            final = export_final(engine, run=run, config=config, tokenizer=tokenizer, info=info, run_dir=run_dir)
            if info.is_main:
                _report_done(task, run_dir, final, result, private=run.trainer.private_outputs)
        elif info.is_main:
            why = f"signal {preemption.received.name}" if result.preempted else "trainer.stop_after_steps"
            print(
                f"Stopped after step {result.global_step} of {total_steps} ({why}); checkpoint in "
                f"{checkpointer.directory}. Relaunch with hydra.run.dir={run_dir} to continue.",
                flush=True,
            )
    if result.preempted:
        preemption.exit_for_restart(is_main=info.is_main)  # SLURM requeues the job; it resumes from the checkpoint
    preemption.uninstall()
    distributed.long_barrier()  # rank 0 may still be writing final/ (GBs on a slow shared file system)
    return result


def _report_done(task: Task, run_dir: Path, final: Optional[Path], result: LoopResult, *, private: bool) -> None:
    results_file = run_dir / "eval_results.json"
    print(f"Done. Run dir: {run_dir}\n  final model: {final}\n  metrics: {run_dir / 'metrics.jsonl'}", flush=True)
    if result.eval_results is not None:
        write_eval_results(results_file, {"step": result.global_step, **result.eval_results}, private=private)
        print(f"  eval results: {results_file}: {_summary(task, result.eval_results)}", flush=True)


def _offload_note(ds_config: dict[str, Any]) -> str:
    devices = offload_devices(ds_config)
    return f" (offload: {', '.join(sorted(devices))})" if devices else ""


def _tokenizer_source(run: RunConfig) -> Optional[str]:
    if run.model.path is None:
        return None
    from finetune.model.hf_weights import resolve_model_dir

    return str(resolve_model_dir(run.model.path))


def _summary(task: Task, results: dict[str, float]) -> str:
    keys = [task.main_metric] + [k for k in ("f1", "macro_f1", "loss") if k in results and k != task.main_metric]
    return ", ".join(f"{k}={results[k]:.4g}" for k in keys if k in results)
