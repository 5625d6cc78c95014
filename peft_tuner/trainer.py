"""The one training loop, whatever the launcher: setup() -> fit() -> save.

Reads top to bottom: cheap checks of everything the user wrote, then the process group, the model, the DeepSpeed
engine, the loop, and the adapter. Each optimizer step sees one global batch (micro batch x accumulation x processes)
of a seeded permutation, so a run's data order depends on the seed and the global batch alone; the loss is the mean
over every label token of that global batch, so 1 process and N processes compute the same gradient.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from peft_tuner import checkpoint as ckpt
from peft_tuner import distributed as dist
from peft_tuner import ds_config as ds_config_for
from peft_tuner.config import Config, ConfigError, evaluates_after_step, evaluates_during_training, metric_for_best
from peft_tuner.data import (IGNORE_INDEX, DataError, Encoder, SftEncoder, build_sft_task, build_task, collate,
                             collate_padding_free, encode_sft_rows, encode_training_rows, prepare_split, read_table,
                             real_tokens, sft_rows, text_blocks)
from peft_tuner.errors import PeftTunerError
from peft_tuner.modeling import (DTYPES, add_neftune_noise, attend_row_by_row, build_peft_model, check_peft_applies,
                                 count_parameters, cpu_dropout, eval_dtype, is_prompt_learning, keep_adalora_mask,
                                 load_base_model, load_tokenizer, load_trained_model, model_hidden_size,
                                 native_bf16, packed_attention_name)
from peft_tuner.scoring import label_token_losses, text_loss_over_ranks
from peft_tuner.trackers import PREFIXES, check_trackers, numeric, open_trackers
from peft_tuner.zero3_release import index_release_decisions, start_trace_afresh


class TrainingStopped(PeftTunerError):
    """Training stopped early (non-finite loss); the message names the step and the last good checkpoint."""


@dataclass
class TrainData:
    examples: list[dict]
    task: Optional[dict]  # classification, completion, chat: columns, templates, classes (saved with the adapter)
    rows: int
    dropped_empty: int = 0  # empty texts, or conversations with nothing to train on left within max_length
    truncated: int = 0
    encoder: Optional[Encoder] = None
    eval_rows: list = field(default_factory=list)  # classification: labelled rows, rank-classified after each epoch
    eval_blocks: list = field(default_factory=list)  # text, completion, chat: examples whose loss and perplexity are measured
    from_cache: bool = False  # the examples were read from the tokenization cache


def train(cfg: Config, resume: bool = False, overwrite: bool = False, problems: Optional[list[str]] = None) -> dict:
    """Run a whole training job and return its summary (also written to output_dir/summary.json). `problems`: those
    already found in the config (load_config's), reported together with the preflight's."""
    # 1. Everything the user wrote is checked before the process group or the model come up, all of it at once.
    world, ds_config, ds_source, stage, tokenizer, data, checkpoint = preflight(cfg, resume, overwrite, problems)
    global_batch = cfg.train.batch_size * cfg.train.gradient_accumulation * world
    steps_per_epoch = math.ceil(len(data.examples) / global_batch)
    total_steps = steps_per_epoch * cfg.train.epochs

    # 2. Processes.
    launcher = dist.init_distributed()
    if dist.world_size() != world:
        raise RuntimeError(f"expected {world} processes from the environment, the process group has {dist.world_size()}")
    dist.check_shared_folder(Path(cfg.output_dir))

    # 3. Model and engine.
    torch.manual_seed(cfg.train.seed)
    weights_mapped_apart = dist.map_gathered_weights_apart(stage)
    release_indexed = stage == 3 and index_release_decisions()  # the first step on ZeRO-3's trace: no n^2 walk
    with dist.partitioned_loading(ds_config, enabled=stage == 3 and cfg.train.zero3_init):
        model = build_peft_model(load_base_model(cfg.model), cfg.peft, cfg.model, total_steps)
    add_neftune_noise(model, cfg.train.neftune_alpha)
    trainable, total = count_parameters(model)
    engine = setup_engine(model, ds_config, cfg, total_steps)
    leaf_modules = backward_through_leaf_modules(engine.module) if stage == 3 else 0
    if cfg.train.padding_free:
        check_padding_free(engine.module, data.examples, tokenizer.pad_token_id, cfg.model.dtype)  # the model keeps rows apart
        rows_apart = cfg.train.packed_attention == "rows" and attend_row_by_row(engine.module)
        if rows_apart:
            check_padding_free(engine.module, data.examples, tokenizer.pad_token_id, cfg.model.dtype)  # and so does this
        packed_attention = packed_attention_name(rows_apart, dist.device(), DTYPES[train_autocast_dtype(cfg) or cfg.model.dtype])
        start_trace_afresh(engine)  # the checks' forwards are no training step's trace
    fast_dropouts = cpu_dropout(engine.module) if dist.device().type == "cpu" else 0  # a GPU keeps torch's dropout
    if cfg.train.compile:
        # In place (nn.Module.compile): module tree and parameter names stay, so the adapter saves as before. It compiles
        # at the first call, again when the shapes first change (dynamic from then on) and in evaluation mode.
        engine.module.compile()
    torch.manual_seed(cfg.train.seed + dist.rank())  # dropout differs across ranks, reproducibly

    start_step, best = 0, BestSoFar(*metric_for_best(cfg))
    if checkpoint is not None:
        state = ckpt.load_checkpoint(engine, checkpoint)
        start_step, best = int(state["global_step"]), BestSoFar.from_state(state.get("best"), *metric_for_best(cfg))
    if dist.is_main():
        ckpt.prepare_output_dir(cfg, overwrite=overwrite and not resume)
    dist.barrier()

    trackers = open_trackers(cfg.train.report_to, Path(cfg.output_dir), cfg.to_dict(), resume) if dist.is_main() else []
    log = RunLog(Path(cfg.output_dir) / "train_log.jsonl", append=resume, trackers=trackers)
    tokenized = "tokenized: from cache" if data.from_cache else "tokenized"
    threads = f", {torch.get_num_threads()} CPU thread(s) each" if dist.device().type == "cpu" else ""
    autocast = train_autocast_dtype(cfg)
    log.line(f"peft-tuner train | model {cfg.model.name_or_path} | method {cfg.peft.method} | trainable "
             f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%) | launcher {launcher}, {world} process(es), "
             f"ZeRO-{stage} ({ds_source}){threads} | {data.rows} rows ({data.dropped_empty} dropped, {data.truncated} cut "
             f"to max_length={cfg.data.max_length}; {tokenized}) | global batch {global_batch} = {cfg.train.batch_size} x "
             f"{cfg.train.gradient_accumulation} accumulation x {world} | {steps_per_epoch} steps/epoch x "
             f"{cfg.train.epochs} epochs = {total_steps} steps" + (f" | {autocast} autocast" if autocast else "") +
             (f" | resuming after step {start_step}" if start_step else ""))
    log.record({"event": "start", "model": cfg.model.name_or_path, "method": cfg.peft.method, "trainable_params": trainable,
                "total_params": total, "world_size": world, "zero_stage": stage, "launcher": launcher,
                "cpu_threads": torch.get_num_threads(), "cpu_dropouts": fast_dropouts, "compiled": cfg.train.compile,
                "autocast": autocast,
                "malloc_mmap_threshold": dist.MMAP_THRESHOLD_BYTES if weights_mapped_apart else None,
                "zero3_release": "indexed" if release_indexed else None, "zero3_leaf_modules": leaf_modules,
                "onednn_primitive_cache": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
                "optimizer": optimizer_name(engine),
                "packed_attention": packed_attention if cfg.train.padding_free else None, "rows": data.rows,
                "dropped_empty": data.dropped_empty, "truncated": data.truncated, "tokenized_from_cache": data.from_cache,
                "total_steps": total_steps,
                "start_step": start_step})

    # 4. The loop.
    started = time.time()
    result = fit(engine, cfg, data, tokenizer, log, global_batch, steps_per_epoch, start_step, stage, best)

    # 5. The adapter, gathered under ZeRO-3, written atomically.
    adapter_dir = ckpt.save_adapter(engine.module, tokenizer, cfg, data.task, Path(cfg.output_dir) / ckpt.ADAPTER_DIR, stage)
    adapter_diff = verify_adapter(engine, cfg, data, tokenizer, adapter_dir) if cfg.train.verify_adapter else None
    summary = {"event": "end", **result, "adapter_max_logit_diff": adapter_diff, "train_seconds": round(time.time() - started, 2),
               "peak_memory_gb": round(max(dist.all_reduce([dist.peak_memory_gb()], op="max")), 3),
               "adapter_dir": str(adapter_dir), "world_size": world, "zero_stage": stage, "trainable_params": trainable}
    log.record(summary)
    log.close()
    log.line(f"done | {result['steps_done']} steps, final loss {result['final_loss']:.4f} | {summary['train_seconds']} s, "
             + (f"adapter reload check: max |logit diff| {adapter_diff:.2e} | " if adapter_diff is not None else "") +
             f"{result['mean_step_seconds']:.3f} s/step | peak memory {summary['peak_memory_gb']:.2f} GB | adapter: {adapter_dir}")
    if dist.is_main():
        (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    engine.destroy()  # its hooks keep it, and through it every process group, alive (see dist.shutdown)
    del engine, model
    dist.shutdown()
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Setup helpers


def preflight(cfg: Config, resume: bool, overwrite: bool, problems: Optional[list[str]] = None):
    """Check the output folder, the DeepSpeed config against the recipe and the method, the model path and its
    tokenizer, the target modules, the data and the checkpoint to resume, and raise one ConfigError naming every
    problem found (with `problems` found before). Returns what the run needs of them: (world size, DeepSpeed config,
    its source, ZeRO stage, tokenizer, training data, checkpoint)."""
    problems = list(problems or [])

    def check(step, *args):
        try:
            return step(*args)
        except PeftTunerError as e:
            problems.append(str(e))
            return None

    check(ckpt.check_output_dir, cfg, resume, overwrite)
    check(check_trackers, cfg.train.report_to)
    world = dist.expected_world_size()
    ds = check(_deepspeed_config, cfg, world)
    ds_config, ds_source, stage = ds or (None, None, None)
    tokenizer = check(load_tokenizer, cfg.model)
    if tokenizer is not None:
        check(check_peft_applies, cfg.model, cfg.peft)
    data = check(setup_data, cfg, tokenizer)
    checkpoint = check(ckpt.find_resumable_checkpoint, cfg, world, stage) if resume and ds else None
    if problems:
        raise ConfigError(f"{len(problems)} problem(s); nothing was loaded or written:\n  - " + "\n  - ".join(problems))
    return world, ds_config, ds_source, stage, tokenizer, data, checkpoint


def _deepspeed_config(cfg: Config, world: int) -> tuple[dict, str, int]:
    raw, source, zero3_init = ds_config_for.deepspeed_source(cfg)
    if zero3_init is not None:  # accelerate's zero3_init_flag; the config saved with the run says what was done
        cfg.train.zero3_init = zero3_init
    ds_config = ds_config_for.resolve_deepspeed_config(raw, cfg, world, source, model_hidden_size(cfg.model))
    stage = ds_config_for.zero_stage(ds_config)
    problem = ds_config_for.check_method_fits_zero(cfg.peft.method, stage)
    if problem:
        raise ConfigError(problem)
    if cfg.train.compile and stage == 3:
        raise ConfigError(f"train.compile: for ZeRO-0 to ZeRO-2 ({source} is ZeRO-3, whose hooks gather each "
                          f"module's weights as it runs; compiling across them is not tested here); use ZeRO-2 or set "
                          f"train.compile=false")
    return ds_config, source, stage


def setup_data(cfg: Config, tokenizer) -> Optional[TrainData]:
    """Read, check and tokenize the training split; nothing heavy has been loaded yet. Without a tokenizer (the model
    could not be read) the rows are still read and checked, and nothing is returned."""
    if not cfg.data.train_file:
        raise DataError("data.train_file: not set; give a file, a RAFT folder or a hub dataset")
    table = read_table(cfg.data.train_file, "train")
    sft = cfg.data.task in ("completion", "chat")
    if tokenizer is None:
        if sft:
            sft_rows(build_sft_task(cfg.data, table), table, cfg.data, "train", require_target=True)
        elif cfg.data.task != "text":
            prepare_split(build_task(cfg.data, table), table, cfg.data, require_labels=True)
        return None
    evaluates = evaluates_during_training(cfg)
    key = next((f"train.{k}" for k in ("eval_each_epoch", "eval_epochs", "eval_steps") if getattr(cfg.train, k)), None)
    if cfg.data.task == "text":
        eval_blocks = []
        if evaluates:
            if not cfg.data.eval_file:
                raise ConfigError(f"{key}: needs data.eval_file (text to measure the loss and perplexity on)")
            eval_blocks, _ = text_blocks(tokenizer, read_table(cfg.data.eval_file, "eval"), cfg.data)
        examples, from_cache = text_blocks(tokenizer, table, cfg.data)
        return TrainData(examples=examples, task=None, rows=len(examples), eval_blocks=eval_blocks, from_cache=from_cache)
    if evaluates and not (cfg.data.eval_file or cfg.data.eval_fraction):
        raise ConfigError(f"{key}: needs data.eval_file or data.eval_fraction (rows with answers to evaluate on)")
    eval_table = (read_table(cfg.data.eval_file, "eval") if cfg.data.eval_file else table) if evaluates else None
    if sft:
        return setup_sft_data(cfg, tokenizer, table, eval_table)
    task = build_task(cfg.data, table, tokenizer)
    if task.chat_template:
        tokenizer.chat_template = task.chat_template  # saved with the adapter, for generate --chat
    split = prepare_split(task, table, cfg.data, require_labels=True)
    encoder = Encoder(tokenizer, task, cfg.data.max_length)
    examples, truncated, from_cache = encode_training_rows(encoder, split.rows, cache=cfg.data.cache)
    eval_rows = []
    if eval_table is not None:
        eval_rows = prepare_split(task, eval_table, cfg.data, require_labels=True, role="eval").rows
    return TrainData(examples=examples, task=task.to_dict(), rows=len(examples), dropped_empty=split.dropped_empty,
                     truncated=truncated, encoder=encoder, eval_rows=eval_rows, from_cache=from_cache)


def setup_sft_data(cfg: Config, tokenizer, table, eval_table) -> TrainData:
    """Completion and chat rows: the training examples, and the eval rows' examples whose loss is measured."""
    task = build_sft_task(cfg.data, table, tokenizer, cfg.model.name_or_path)
    if task.as_chat:
        tokenizer.chat_template = task.chat_template  # saved with the adapter, for generate --chat
    rows = sft_rows(task, table, cfg.data, "train", require_target=True)
    encoder = SftEncoder(tokenizer, task, cfg.data.max_length)
    examples, truncated, dropped, from_cache = encode_sft_rows(encoder, rows, cache=cfg.data.cache)
    eval_blocks = []
    if eval_table is not None:
        eval_rows = sft_rows(task, eval_table, cfg.data, "eval", require_target=True)
        eval_blocks = encode_sft_rows(encoder, eval_rows, cache=cfg.data.cache)[0]
    return TrainData(examples=examples, task=task.to_dict(), rows=len(rows), dropped_empty=dropped,
                     truncated=truncated, eval_blocks=eval_blocks, from_cache=from_cache)


def setup_engine(model, ds_config: dict, cfg: Config, total_steps: int):
    """AdamW (the client's, unless the DeepSpeed config names one) and a warmup schedule, under deepspeed.initialize."""
    import deepspeed
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    warmup = int(cfg.train.warmup_ratio * total_steps)

    def make_scheduler(optimizer):
        return get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))

    if "optimizer" in ds_config:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, lr_scheduler=make_scheduler, config=ds_config)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
                                      fused=fused_adamw_fits(trainable))
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=make_scheduler(optimizer), config=ds_config)
    return engine


def backward_through_leaf_modules(model) -> int:
    """ZeRO-3 leaf modules (DeepSpeed's stage3_module_granularity_threshold, its leaf_module setting, or the MoE blocks
    it makes leaves by default) gather their weights again for backward only from hooks on tensors that require grad.
    With a frozen base, the first layers' inputs (the embeddings) require none: their weights stay partitioned and the
    first backward fails on a weight's shape (a partitioned one, of size 0 or 1). So the embeddings' output requires
    grad wherever there are leaf modules, as under gradient checkpointing. Returns how many leaf modules."""
    try:
        from deepspeed.utils.z3_leaf_module import z3_leaf_module
    except ImportError:
        return 0
    leaves = sum(1 for m in model.modules() if z3_leaf_module(m))
    if leaves and any(p.requires_grad for p in model.parameters()):
        model.enable_input_require_grads()
    return leaves


def fused_adamw_fits(params: list[torch.Tensor]) -> bool:
    """AdamW's fused kernel where torch has one for every trainable tensor (floating point, on the CPU or a GPU): one
    pass over each tensor instead of a dozen ops. The default recipe's 420 LoRA tensors on the CPU: 12.6 against 41.9 ms
    an optimizer step (bench/step_options.py). Under ZeRO 1-3 the optimizer steps DeepSpeed's flat partitions, on the
    same devices."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def optimizer_name(engine) -> str:
    """The optimizer that steps the weights, as the start record names it: "AdamW (fused)", "DeepSpeedCPUAdam", ..."""
    optimizer = engine.basic_optimizer
    return type(optimizer).__name__ + (" (fused)" if getattr(optimizer, "defaults", {}).get("fused") else "")


def verify_adapter(engine, cfg: Config, data: TrainData, tokenizer, adapter_dir: Path) -> Optional[float]:
    """Largest |logit| difference between the trained engine and the saved adapter reloaded on a fresh base model,
    its parameters in the engine's dtypes: under bf16 weights the engine runs its adapter in bf16 where peft reloads
    it in fp32, and that rounding alone gave 1.8 to 3.5 on SmolLM2's recipe (0.00 in the engine's dtypes), hiding
    the errors this check is for."""
    batch = collate(data.examples[:4], tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if not is_prompt_learning(engine.module):
        inputs["position_ids"] = batch["position_ids"]
    length = batch["input_ids"].shape[1]
    engine.eval()
    with torch.no_grad():  # every rank takes part: under ZeRO-3 the forward gathers weights collectively
        trained = engine(**{k: v.to(dist.device()) for k, v in inputs.items()}).logits[:, -length:].float().cpu()
    engine.train()
    difference = None
    if dist.is_main():
        reloaded = load_trained_model(cfg.model, adapter_dir).eval()
        engine_dtypes = {name: p.dtype for name, p in engine.module.named_parameters()}
        for name, p in reloaded.named_parameters():  # buffers (rotary frequencies) keep their dtype, as the engine's do
            p.data = p.data.to(engine_dtypes.get(name, p.dtype))
        with torch.no_grad():
            again = reloaded(**inputs).logits[:, -length:].float()
        mask = batch["attention_mask"].bool()
        difference = float((trained - again).abs()[mask].max())
        del reloaded
    (difference,) = dist.all_reduce([difference or 0.0], op="max")
    return difference


# ----------------------------------------------------------------------------------------------------------------------
# The loop


def fit(engine, cfg: Config, data: TrainData, tokenizer, log: "RunLog", global_batch: int, steps_per_epoch: int,
        start_step: int, stage: int, best: "BestSoFar") -> dict:
    world, rank = dist.world_size(), dist.rank()
    accumulation, micro = cfg.train.gradient_accumulation, cfg.train.batch_size
    pass_positions = not is_prompt_learning(engine.module)
    forward_dtype = train_autocast_dtype(cfg)  # resolved once, not per micro-step
    total_steps = steps_per_epoch * cfg.train.epochs
    # Padding-free, a rank's step costs about its tokens: the global batch's rows are shared out by length
    lengths = [len(e["input_ids"]) for e in data.examples] if cfg.train.padding_free and world > 1 else None
    stop = StopRequest()
    progress = _progress_bar(total_steps, start_step)
    step_times, last_loss, step, stopped_early = [], float("nan"), start_step, False
    engine.train()
    for epoch in range(start_step // steps_per_epoch, cfg.train.epochs):
        order = epoch_order(len(data.examples), cfg.train.seed, epoch)
        for step_in_epoch in range(steps_per_epoch):
            step = epoch * steps_per_epoch + step_in_epoch
            if step < start_step:
                continue
            began = time.time()
            indices = global_batch_indices(order, step_in_epoch, global_batch)
            mine = rank_share(indices, world, rank, lengths)
            rows = [[data.examples[i] for i in mine[k * micro:(k + 1) * micro]] for k in range(accumulation)]
            batches = [collate_padding_free(r) if cfg.train.padding_free else collate(r, tokenizer.pad_token_id) for r in rows]
            local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
            local_seen = sum(real_tokens(b) for b in batches)
            global_tokens, global_seen, stop_flag = dist.all_reduce([local_tokens, local_seen, float(stop.requested)])
            if stop_flag > 0:
                path = ckpt.save_checkpoint(engine, cfg, _loop_state(step, epoch, world, stage, best))
                log.line(f"stopped by signal before step {step + 1}; checkpoint {path}. Continue with the same command plus --resume")
                raise SystemExit(143)
            loss_sum = 0.0
            for k, batch in enumerate(batches):
                with autocast_to(forward_dtype):
                    summed = token_loss_sum(engine, batch, pass_positions, dist.device())
                engine.backward(summed * (world * accumulation) / max(global_tokens, 1))
                loss_sum = loss_sum + summed.detach()  # stays on the device until the step's end
                if k == accumulation - 1:
                    # Agree on the step's loss before the optimizer moves: a non-finite one must not touch the weights.
                    (loss_total,) = dist.all_reduce([float(loss_sum)])
                    last_loss = loss_total / max(global_tokens, 1)
                    if not math.isfinite(last_loss):
                        latest = ckpt.find_latest_checkpoint(cfg)
                        raise TrainingStopped(f"loss is {last_loss} at step {step + 1} (epoch {epoch + 1}); weights not "
                                              f"updated. Last good checkpoint: {latest or 'none'}. Lower train.learning_rate "
                                              f"or check the data, then --resume")
                    if cfg.peft.method == "adalora":
                        engine.module.base_model.update_and_allocate(step)  # reads the gradients: before the step
                learning_rate = engine.get_lr()[0]  # the rate this step uses
                engine.step()
            if cfg.peft.method == "adalora":
                keep_adalora_mask(engine.module)
            elapsed = time.time() - began
            step_times.append(elapsed)
            done = step + 1
            if done % cfg.train.log_steps == 0 or done == total_steps:
                record = {"event": "step", "step": done, "epoch": epoch + 1, "loss": last_loss,
                          "learning_rate": learning_rate, "tokens": int(global_seen), "label_tokens": int(global_tokens),
                          "tokens_per_second": global_seen / elapsed,
                          "step_seconds": elapsed, "peak_memory_gb": dist.peak_memory_gb()}
                log.record(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['learning_rate']:.2e}",
                                         tok_s=f"{record['tokens_per_second']:.0f}", mem=f"{record['peak_memory_gb']:.2f}GB")
            if progress is not None:
                progress.update(1)
            if evaluates_after_step(cfg, done, steps_per_epoch):
                metrics, said = evaluate_during_training(engine, cfg, data, tokenizer)
                log.record({"event": "eval", "epoch": epoch + 1, "step": done, **metrics})
                if progress is not None:
                    progress.write(f"step {done} (epoch {epoch + 1}): {said}")
                if best.update(metrics, done):
                    ckpt.save_adapter(engine.module, tokenizer, cfg, data.task, Path(cfg.output_dir) / ckpt.BEST_ADAPTER_DIR, stage)
                    log.record({"event": "best", "step": done, best.metric: best.value})
                elif cfg.train.early_stopping_patience and best.evals_without_improvement >= cfg.train.early_stopping_patience:
                    stopped_early = True
                    log.line(f"early stopping after step {done}: {best.metric} not better than {best.value:.4f} (step "
                             f"{best.step}) in {best.evals_without_improvement} evaluations; best adapter: "
                             f"{Path(cfg.output_dir) / ckpt.BEST_ADAPTER_DIR}")
            if cfg.train.checkpoint_steps and done % cfg.train.checkpoint_steps == 0 and done < total_steps and not stopped_early:
                ckpt.save_checkpoint(engine, cfg, _loop_state(done, epoch, world, stage, best))
            ckpt.kill_point("after_step", done)
            if stopped_early:
                break
        log.record({"event": "epoch", "epoch": epoch + 1, "loss": last_loss})
        if stopped_early:
            break
    if progress is not None:
        progress.close()
    stop.restore()
    measured = step_times[1:] or step_times  # the first step pays for warm-up
    return {"steps_done": step + 1 if step_times else start_step, "final_loss": last_loss,
            "mean_step_seconds": sum(measured) / max(len(measured), 1), "stopped_early": stopped_early,
            **({"best_step": best.step, f"best_{best.metric}": best.value} if best.step is not None else {})}


def evaluate_during_training(engine, cfg: Config, data: TrainData, tokenizer) -> tuple[dict, str]:
    """Accuracy by rank classification (classification), else the loss and perplexity of the eval examples' targets;
    every rank takes part. Returns (metrics, a line that says them)."""
    engine.eval()
    if data.eval_rows:
        metrics = {"accuracy": accuracy_during_training(engine, cfg, data)}
        said = f"eval accuracy {metrics['accuracy']:.4f} on {len(data.eval_rows)} rows"
    else:
        loss = text_loss_over_ranks(engine.module, data.eval_blocks, cfg.eval.batch_size, tokenizer.pad_token_id)
        metrics = {"eval_loss": loss, "perplexity": math.exp(loss)}
        said = f"eval loss {loss:.4f}, perplexity {math.exp(loss):.2f} on {len(data.eval_blocks)} examples"
    # Under ZeRO-3 the last forwards left weights prefetched for forwards that will not come; gathering the adapter
    # to save it as the best so far would find them in flight (DeepSpeed's "Cannot partition a param in flight",
    # with prefetch buckets the size of the hidden layer). Release them all; a no-op below ZeRO-3.
    engine.empty_partition_cache()
    start_trace_afresh(engine)
    engine.train()
    return metrics, said


class BestSoFar:
    """The best evaluation so far by eval.metric_for_best, and how many evaluations since; kept in checkpoints."""

    def __init__(self, metric: str, higher_is_better: bool, value: Optional[float] = None, step: Optional[int] = None,
                 evals_without_improvement: int = 0):
        self.metric, self.higher_is_better = metric, higher_is_better
        self.value, self.step, self.evals_without_improvement = value, step, evals_without_improvement

    @classmethod
    def from_state(cls, state: Optional[dict], metric: str, higher_is_better: bool) -> "BestSoFar":
        return cls(metric, higher_is_better, **{k: v for k, v in (state or {}).items() if k != "metric"})

    def state(self) -> dict:
        return {"metric": self.metric, "value": self.value, "step": self.step,
                "evals_without_improvement": self.evals_without_improvement}

    def update(self, metrics: dict, step: int) -> bool:
        """Whether `metrics` is the best so far (the first evaluation always is)."""
        value = metrics[self.metric]
        better = self.value is None or (value > self.value if self.higher_is_better else value < self.value)
        if better:
            self.value, self.step, self.evals_without_improvement = value, step, 0
        else:
            self.evals_without_improvement += 1
        return better


def accuracy_during_training(engine, cfg: Config, data: TrainData) -> float:
    """Rank classification of the eval rows, split evenly over the ranks (padded so that every rank runs as many
    forwards: under ZeRO-3 each forward is a collective)."""
    from peft_tuner.scoring import rank_scores

    rows, world, rank = data.eval_rows, dist.world_size(), dist.rank()
    per_rank = math.ceil(len(rows) / world)
    indices = range(rank * per_rank, (rank + 1) * per_rank)
    mine = [rows[min(i, len(rows) - 1)] for i in indices]
    with eval_autocast(cfg):
        scores = rank_scores(engine.module, data.encoder, mine, cfg.eval.batch_size)
    names, label = data.encoder.task.class_names, data.encoder.task.label_column
    correct = sum(names[int(s.argmax())] == row[label] for i, s, row in zip(indices, scores, mine) if i < len(rows))
    (total_correct,) = dist.all_reduce([float(correct)])
    return total_correct / len(rows)


def eval_autocast(cfg: Config):
    """Evaluation in eval.dtype (bf16 / fp16) while the weights train in fp32: autocast, as evaluate does with a copy."""
    dtype = eval_dtype(cfg)
    return autocast_to(dtype if dtype in ("bf16", "fp16") and cfg.model.dtype == "fp32" else None)


def train_autocast_dtype(cfg: Config) -> Optional[str]:
    """train.autocast with `auto` resolved for this machine: bf16 where it is computed natively, else none."""
    if cfg.train.autocast == "auto":
        return "bf16" if native_bf16() else None
    return cfg.train.autocast


def train_autocast(cfg: Config):
    """The training forward under train.autocast (bf16 / fp16 compute, fp32 weights); the backward follows the dtypes
    the forward recorded."""
    return autocast_to(train_autocast_dtype(cfg))


def autocast_to(dtype: Optional[str]):
    """Autocast to `dtype` (bf16 / fp16) on this process's device; None: no autocast."""
    import contextlib

    return torch.autocast(dist.device().type, dtype=DTYPES[dtype]) if dtype else contextlib.nullcontext()


def token_loss_sum(engine, batch: dict, pass_positions: bool, device: Optional[torch.device] = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over label tokens (prompt and padding are -100). A padding-free batch has no
    attention mask: its position ids tell the rows apart. No cache: a training forward never reads one again.
    With `device`, the batch comes from the host and moves there after its longest row is read: no wait on the device."""
    moved = {k: v.to(device) for k, v in batch.items()} if device is not None else batch
    inputs = {k: moved[k] for k in ("input_ids", "attention_mask") if k in moved}
    if pass_positions:
        inputs["position_ids"] = moved["position_ids"]
        if "cu_seq_lens" in batch:  # the rows' boundaries, for attention that runs row by row
            longest = int((batch["cu_seq_lens"][1:] - batch["cu_seq_lens"][:-1]).max())
            inputs.update(cu_seq_lens_q=moved["cu_seq_lens"], cu_seq_lens_k=moved["cu_seq_lens"],
                          max_length_q=longest, max_length_k=longest)
    losses, _ = label_token_losses(engine, {**inputs, "use_cache": False}, moved["labels"])
    return losses.sum()


def check_padding_free(model, examples: list[dict], pad: int, dtype: str) -> None:
    """Padding-free batches rely on the model telling the rows of one sequence apart by their positions (Llama-style
    and GPT-2 models do; BLOOM's ALiBi takes no positions, and OPT builds a mask of its own). Checked once, before the
    first step, on the first rows: their loss as one sequence must be their loss as a padded batch (relative 1e-5 in
    fp32, as the tests measure; a looser 5e-3 in bf16 / fp16, chosen, not measured)."""
    rows = examples[:4]
    if len(rows) < 2:
        return
    was_training = model.training
    model.eval()
    with torch.no_grad():
        padded, flat = (float(token_loss_sum(model, batch, True, dist.device()))
                        for batch in (collate(rows, pad), collate_padding_free(rows)))
    model.train(was_training)
    if not math.isclose(padded, flat, rel_tol=1e-5 if dtype == "fp32" else 5e-3):
        raise ConfigError(f"train.padding_free: this {model.config.model_type} model lets the rows of one sequence see "
                          f"each other (their loss {flat:.6f} against {padded:.6f} padded): it does not restart attention "
                          f"where the positions restart; set train.padding_free=false")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def global_batch_indices(order: list[int], step_in_epoch: int, global_batch: int) -> list[int]:
    """The step's global batch; the last one of an epoch is filled up from the start of the order."""
    start = step_in_epoch * global_batch
    return [order[(start + i) % len(order)] for i in range(global_batch)]


def rank_share(indices: list[int], world: int, rank: int, lengths: Optional[list[int]] = None) -> list[int]:
    """This rank's rows of the step's global batch: an equal number each. In order (rank 0 the first run of them), or,
    given the rows' lengths, longest first, each to the rank with the fewest tokens so far, so that no rank waits on
    another at the step's all-reduce: the step's gradient is the same whatever the split (the loss is the mean over
    the global batch's label tokens), and every rank computes the same split."""
    per_rank = len(indices) // world
    if lengths is None:
        return indices[rank * per_rank:(rank + 1) * per_rank]
    shares, loads = [[] for _ in range(world)], [0] * world
    for i in sorted(indices, key=lambda i: -lengths[i]):
        r = min((r for r in range(world) if len(shares[r]) < per_rank), key=lambda r: loads[r])
        shares[r].append(i)
        loads[r] += lengths[i]
    return shares[rank]


def _loop_state(global_step: int, epoch: int, world: int, stage: int, best: BestSoFar) -> dict:
    return {"global_step": global_step, "epoch": epoch, "world_size": world, "zero_stage": stage, "best": best.state()}


def _progress_bar(total: int, initial: int):
    if not dist.is_main():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)


class StopRequest:
    """SIGTERM / Ctrl-C set a flag; the loop checkpoints at the next step boundary and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class RunLog:
    """JSON lines in output_dir (rank 0), the trackers of train.report_to, and one-line summaries on stdout."""

    def __init__(self, path: Path, append: bool, trackers: Optional[list] = None):
        self.path, self.trackers = path, trackers or []
        if dist.is_main() and not append:
            path.write_text("")

    def record(self, values: dict) -> None:
        if dist.is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **values}) + "\n")
            prefix = PREFIXES.get(values.get("event"))
            if prefix and values.get("step", values.get("steps_done")) is not None:
                scalars = {f"{prefix}/{k}": v for k, v in numeric(values).items()}
                for tracker in self.trackers:
                    tracker.log(scalars, int(values.get("step", values.get("steps_done"))))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()

    def line(self, text: str) -> None:
        if dist.is_main():
            print(text, flush=True)
