"""The one training loop, whatever the launcher: train() = preflight -> process group -> model and engine -> fit() ->
adapter.

Reads top to bottom: cheap checks of everything the user wrote (preflight), then the process group, the model, the
DeepSpeed engine, the loop, and the adapter. Each optimizer step sees one global batch (micro batch x accumulation x
processes) of a seeded permutation (sampler); the loss is the mean over every label token of that global batch, so 1
process and N processes compute the same gradient. The run's state is one object, `Run`.
"""
from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from peft_tuner import checkpoint as ckpt
from peft_tuner import deepspeed_patches, runtime
from peft_tuner import distributed as dist
from peft_tuner.config import Config, evaluates_after_step, metric_for_best
from peft_tuner.data import IGNORE_INDEX, collate, collate_padding_free, real_tokens
from peft_tuner.engine import backward_through_leaf_modules, optimizer_name, setup_engine, verify_adapter
from peft_tuner.errors import PeftTunerError
from peft_tuner.kernels import FusedHeadLoss, apply_liger, liger_loss
from peft_tuner.losses import token_loss_sum
from peft_tuner.modeling import (DTYPES, add_neftune_noise, build_peft_model, count_parameters, is_prompt_learning,
                                 keep_adalora_mask, load_base_model, model_type)
from peft_tuner.packed_attention import attend_row_by_row, check_padding_free, packed_attention_name
from peft_tuner import preference
from peft_tuner.preflight import TrainData, preflight
from peft_tuner.quantization import compute_dtype, footprint_gb, partitioned_weights, quantized
from peft_tuner.sampler import epoch_order, global_batch_indices, rank_share
from peft_tuner.trackers import RunLog, open_trackers
from peft_tuner.validation import BestSoFar, evaluate_during_training


class TrainingStopped(PeftTunerError):
    """Training stopped early (non-finite loss); the message names the step and the last good checkpoint."""


@dataclass
class Run:
    """A training run's state: what the loop reads, and where it is."""
    cfg: Config
    engine: object
    data: TrainData
    tokenizer: object
    log: RunLog
    world: int
    stage: int
    global_batch: int
    steps_per_epoch: int
    best: BestSoFar
    start_step: int = 0

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs

    def loop_state(self, global_step: int, epoch: int) -> dict:
        """What a checkpoint keeps of the loop."""
        return {"global_step": global_step, "epoch": epoch, "world_size": self.world, "zero_stage": self.stage,
                "best": self.best.state()}


def train(cfg: Config, resume: bool = False, overwrite: bool = False, problems: Optional[list[str]] = None) -> dict:
    """Run a whole training job and return its summary (also written to output_dir/summary.json). `problems`: those
    already found in the config (load_config's), reported together with the preflight's."""
    # 1. Everything the user wrote is checked before the process group or the model come up, all of it at once.
    runtime.configure_cpu(cfg.train.cpu_tuning)  # before the first kernel is built
    checked = preflight(cfg, resume, overwrite, problems)
    world, stage, data, tokenizer = checked.world, checked.stage, checked.data, checked.tokenizer
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
    runtime.map_gathered_weights_apart(stage)
    patches = deepspeed_patches.apply(cfg.train.deepspeed_patches, stage)
    if cfg.train.liger_kernels:
        apply_liger(model_type(cfg.model))  # into transformers' classes, before the model is built
    with dist.partitioned_loading(checked.ds_config, enabled=stage == 3 and cfg.train.zero3_init):
        base = load_base_model(cfg.model, zero_stage=stage)
        base_memory_gb = footprint_gb(base)  # its weights as loaded (quantized, or partitioned, on this process)
        quantization = {"kind": cfg.model.quantization, "base_memory_gb": base_memory_gb} if quantized(cfg.model) else None
        model = build_peft_model(base, cfg.peft, cfg.model, total_steps)
    add_neftune_noise(model, cfg.train.neftune_alpha, padding_free=cfg.train.padding_free)
    trainable, total = count_parameters(model)
    engine = setup_engine(model, checked.ds_config, cfg, total_steps)
    leaf_modules = backward_through_leaf_modules(engine.module) if stage == 3 else 0
    if cfg.train.liger_kernels:
        engine.module.fused_head_loss = FusedHeadLoss(engine.module, liger_loss())
    if quantization:
        quantization["partitioned_weights"], quantization["quantized_weights"] = partitioned_weights(engine.module)
    packed_attention = setup_padding_free(engine, cfg, data, tokenizer) if cfg.train.padding_free else None
    runtime.use_fast_dropout(engine.module)
    if cfg.train.compile:
        # In place (nn.Module.compile): module tree and parameter names stay, so the adapter saves as before. It compiles
        # at the first call, again when the shapes first change (dynamic from then on) and in evaluation mode.
        engine.module.compile()
    if cfg.train.precompute_reference and cfg.train.objective in preference.NEEDS_REFERENCE:
        # before a checkpoint is loaded: under full fine-tuning the weights as loaded are the reference
        preference.add_reference(engine, data.examples, cfg.eval.batch_size, tokenizer.pad_token_id)
        deepspeed_patches.start_trace_afresh(engine)
    torch.manual_seed(cfg.train.seed + dist.rank())  # dropout differs across ranks, reproducibly

    start_step, best = 0, BestSoFar(*metric_for_best(cfg))
    if checked.checkpoint is not None:
        state = ckpt.load_checkpoint(engine, checked.checkpoint)
        start_step, best = int(state["global_step"]), BestSoFar.from_state(state.get("best"), *metric_for_best(cfg))
    if dist.is_main():
        ckpt.prepare_output_dir(cfg, overwrite=overwrite and not resume)
    dist.barrier()

    trackers = open_trackers(cfg.train.report_to, Path(cfg.output_dir), cfg.to_dict(), resume) if dist.is_main() else []
    log = RunLog(Path(cfg.output_dir) / "train_log.jsonl", append=resume, trackers=trackers)
    run = Run(cfg, engine, data, tokenizer, log, world, stage, global_batch, steps_per_epoch, best, start_step)
    autocast = runtime.train_autocast_dtype(cfg)
    log.line(f"peft-tuner train | model {cfg.model.name_or_path} | method {cfg.peft.method} | trainable "
             f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%) | launcher {launcher}, {world} process(es), "
             f"ZeRO-{stage} ({checked.ds_source}){_cpu_words()} | {data.rows} rows ({data.dropped_empty} dropped, "
             f"{data.truncated} cut to max_length={cfg.data.max_length}; "
             f"{'tokenized: from cache' if data.from_cache else 'tokenized'}) | global batch {global_batch} = "
             f"{cfg.train.batch_size} x {cfg.train.gradient_accumulation} accumulation x {world} | {steps_per_epoch} "
             f"steps/epoch x {cfg.train.epochs} epochs = {total_steps} steps" + (f" | {autocast} autocast" if autocast else "")
             + (f" | format {data.task['data_format']['format']}" if (data.task or {}).get("data_format") else "")
             + (f" | objective {cfg.train.objective}, beta {cfg.train.beta}" + (", reference precomputed" if cfg.train.precompute_reference else "")
                if data.preference else "")
             + (f" | resuming after step {start_step}" if start_step else ""))
    for note in data.notes:
        log.line(f"note: {note}")
    log.record({"event": "start", "model": cfg.model.name_or_path, "method": cfg.peft.method, "trainable_params": trainable,
                "total_params": total, "world_size": world, "zero_stage": stage, "launcher": launcher,
                "compiled": cfg.train.compile, "liger_kernels": cfg.train.liger_kernels, "autocast": autocast,
                "optimizer": optimizer_name(engine), "adapter_dtype": adapter_dtype(engine.module),
                "cpu_threads": torch.get_num_threads(), "cpu_tuning": runtime.cpu_tuning().record(), "deepspeed_patches": patches,
                "zero3_leaf_modules": leaf_modules, "packed_attention": packed_attention,
                "label_boundary": (data.task or {}).get("label_boundary"), "notes": data.notes,
                "objective": cfg.train.objective, "precompute_reference": cfg.train.precompute_reference,
                "quantization": quantization, "base_memory_gb": base_memory_gb, "rows": data.rows,
                "dropped_empty": data.dropped_empty, "truncated": data.truncated, "tokenized_from_cache": data.from_cache,
                "total_steps": total_steps, "start_step": start_step})

    # 4. The loop.
    started = time.time()
    result = fit(run)

    # 5. The adapter, gathered under ZeRO-3, written atomically, then reloaded and checked.
    adapter_dir = ckpt.save_adapter(engine.module, tokenizer, cfg, data.task, Path(cfg.output_dir) / ckpt.ADAPTER_DIR, stage)
    adapter_diff = verify_adapter(engine, cfg, data.sequences, tokenizer, adapter_dir) if cfg.train.verify_adapter else None
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
    del engine, model, base, run
    dist.shutdown()
    return summary


def setup_padding_free(engine, cfg: Config, data: TrainData, tokenizer) -> str:
    """Check that the model keeps the rows of a padding-free batch apart, put row-by-row attention in place where it
    fits (train.packed_attention=rows) and check again; returns the attention the rows get, for the start record."""
    device, pad = dist.device(), tokenizer.pad_token_id
    computes_in = runtime.train_autocast_dtype(cfg) or (compute_dtype(cfg.model) if quantized(cfg.model) else cfg.model.dtype)
    check_padding_free(engine.module, data.sequences, pad, computes_in, device)
    rows_apart = cfg.train.packed_attention == "rows" and attend_row_by_row(engine.module)
    if rows_apart:
        check_padding_free(engine.module, data.sequences, pad, computes_in, device)
    deepspeed_patches.start_trace_afresh(engine)  # the checks' forwards are no training step's trace
    return packed_attention_name(rows_apart, device, DTYPES[computes_in])


def adapter_dtype(model) -> Optional[str]:
    """The dtype the trainable weights run in inside the engine (bf16 under DeepSpeed's bf16 mode), for the record."""
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}
    return ",".join(sorted(dtypes)) or None


def _cpu_words() -> str:
    tuning = runtime.cpu_tuning()
    if dist.device().type != "cpu":
        return ""
    return f", {torch.get_num_threads()} CPU thread(s) each, CPU tuning {tuning.mode}"


# ----------------------------------------------------------------------------------------------------------------------
# The loop


def fit(run: Run) -> dict:
    """Train from run.start_step to the last step (or early stopping); returns what the summary reports of it."""
    cfg, engine = run.cfg, run.engine
    stop = StopRequest()
    progress = _progress_bar(run.total_steps, run.start_step)
    step_times, last_loss, step, stopped_early = [], float("nan"), run.start_step, False
    engine.train()
    for epoch in range(run.start_step // run.steps_per_epoch, cfg.train.epochs):
        order = epoch_order(len(run.data.examples), cfg.train.seed, epoch)
        for step_in_epoch in range(run.steps_per_epoch):
            step = epoch * run.steps_per_epoch + step_in_epoch
            if step < run.start_step:
                continue
            began = time.time()
            batches = step_batches(run, global_batch_indices(order, step_in_epoch, run.global_batch))
            global_counts = dist.all_reduce(loss_denominators(run, batches))
            global_seen, stop_flag = dist.all_reduce([sum(real_tokens(b) for b in batches), float(stop.requested)])
            global_tokens = global_counts[-1]
            if stop_flag > 0:
                path = ckpt.save_checkpoint(engine, cfg, run.loop_state(step, epoch))
                run.log.line(f"stopped by signal before step {step + 1}; checkpoint {path}. Continue with the same command plus --resume")
                raise SystemExit(143)
            last_loss, learning_rate, stats = optimizer_step(run, batches, global_counts, step, epoch)
            elapsed = time.time() - began
            step_times.append(elapsed)
            done = step + 1
            if done % cfg.train.log_steps == 0 or done == run.total_steps:
                record = {"event": "step", "step": done, "epoch": epoch + 1, "loss": last_loss,
                          "learning_rate": learning_rate, "tokens": int(global_seen), "label_tokens": int(global_tokens),
                          "tokens_per_second": global_seen / elapsed, "step_seconds": elapsed,
                          "peak_memory_gb": dist.peak_memory_gb(), **stats}
                run.log.record(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{last_loss:.4f}", **({"reward_acc": f"{stats['reward_accuracy']:.2f}",
                                     "margin": f"{stats['reward_margin']:.3f}"} if stats else {}), lr=f"{learning_rate:.2e}",
                                         tok_s=f"{record['tokens_per_second']:.0f}", mem=f"{record['peak_memory_gb']:.2f}GB")
            if progress is not None:
                progress.update(1)
            if evaluates_after_step(cfg, done, run.steps_per_epoch):
                stopped_early = evaluate_and_keep_best(run, done, epoch, progress)
            if cfg.train.checkpoint_steps and done % cfg.train.checkpoint_steps == 0 and done < run.total_steps \
                    and not stopped_early:
                ckpt.save_checkpoint(engine, cfg, run.loop_state(done, epoch))
            ckpt.kill_point("after_step", done)
            if stopped_early:
                break
        run.log.record({"event": "epoch", "epoch": epoch + 1, "loss": last_loss})
        if stopped_early:
            break
    if progress is not None:
        progress.close()
    stop.restore()
    measured = step_times[1:] or step_times  # the first step pays for warm-up
    best = run.best
    return {"steps_done": step + 1 if step_times else run.start_step, "final_loss": last_loss,
            "mean_step_seconds": sum(measured) / max(len(measured), 1), "stopped_early": stopped_early,
            **({"best_step": best.step, f"best_{best.metric}": best.value} if best.step is not None else {})}


def step_batches(run: Run, indices: list[int]) -> list[dict]:
    """This rank's micro-batches of the step's global batch. Padding-free, a rank's step costs about its tokens: the
    rows are shared out by length (sampler.rank_share)."""
    cfg = run.cfg
    micro, padding_free = cfg.train.batch_size, cfg.train.padding_free
    lengths = [example_length(e) for e in run.data.examples] if padding_free and run.world > 1 else None
    mine = rank_share(indices, run.world, dist.rank(), lengths)
    rows = [[run.data.examples[i] for i in mine[k * micro:(k + 1) * micro]] for k in range(cfg.train.gradient_accumulation)]
    pad = run.tokenizer.pad_token_id
    if run.data.preference:
        return [preference.collate_pairs(r, pad, padding_free) for r in rows]
    return [collate_padding_free(r) if padding_free else collate(r, pad) for r in rows]


def example_length(example: dict) -> int:
    return sum(len(example[s]["input_ids"]) for s in ("chosen", "rejected")) if "chosen" in example else len(example["input_ids"])


def loss_denominators(run: Run, batches: list[dict]) -> list[float]:
    """This rank's counts that the step's loss is divided by, summed over the ranks by the caller: the label tokens;
    for pairs, (pairs, the chosen answers' label tokens)."""
    if run.data.preference:
        counts = [preference.pair_counts(b) for b in batches]
        return [float(sum(c[0] for c in counts)), float(sum(c[1] for c in counts))]
    return [float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches))]


def optimizer_step(run: Run, batches: list[dict], global_counts: list[float], step: int,
                   epoch: int) -> tuple[float, float, dict]:
    """Forward and backward of each micro-batch, the loss agreed over the ranks, then the optimizer step (never with a
    non-finite loss). Returns (the step's loss, the learning rate it used, the preference stats or {})."""
    cfg, engine, world = run.cfg, run.engine, run.world
    accumulation = cfg.train.gradient_accumulation
    pass_positions = not is_prompt_learning(engine.module)
    forward_dtype = runtime.train_autocast_dtype(cfg)
    loss_sum, stat_sums = 0.0, [0.0] * len(preference.STATS)
    for k, batch in enumerate(batches):
        with runtime.autocast_to(forward_dtype):
            if run.data.preference:  # this micro-batch's share of the mean over the global batch's pairs
                part, stats = preference.pair_step_loss(engine, batch, cfg.train, pass_positions, dist.device(), *global_counts)
                stat_sums = [a + stats[name] for a, name in zip(stat_sums, preference.STATS)]
            else:  # ... of the mean over the global batch's label tokens
                part = token_loss_sum(engine, batch, pass_positions, dist.device()) / max(global_counts[-1], 1)
        engine.backward(part * (world * accumulation))
        loss_sum = loss_sum + part.detach()  # stays on the device until the step's end
        if k == accumulation - 1:
            # Agree on the step's loss before the optimizer moves: a non-finite one must not touch the weights.
            loss, *stat_sums = dist.all_reduce([float(loss_sum)] + (stat_sums if run.data.preference else []))
            if not math.isfinite(loss):
                latest = ckpt.find_latest_checkpoint(cfg)
                raise TrainingStopped(f"loss is {loss} at step {step + 1} (epoch {epoch + 1}); weights not "
                                      f"updated. Last good checkpoint: {latest or 'none'}. Lower train.learning_rate "
                                      f"or check the data, then --resume")
            if cfg.peft.method == "adalora":
                engine.module.base_model.update_and_allocate(step)  # reads the gradients: before the step
        learning_rate = engine.get_lr()[0]  # the rate this step uses
        engine.step()
    if cfg.peft.method == "adalora":
        keep_adalora_mask(engine.module)
    return loss, learning_rate, preference.shown_stats(stat_sums, global_counts[0]) if run.data.preference else {}


def evaluate_and_keep_best(run: Run, done: int, epoch: int, progress) -> bool:
    """Evaluate after step `done`, keep the best adapter so far; whether training stops early."""
    cfg = run.cfg
    metrics, said = evaluate_during_training(run.engine, cfg, run.data, run.tokenizer)
    run.log.record({"event": "eval", "epoch": epoch + 1, "step": done, **metrics})
    if progress is not None:
        progress.write(f"step {done} (epoch {epoch + 1}): {said}")
    best = run.best
    if best.update(metrics, done):
        ckpt.save_adapter(run.engine.module, run.tokenizer, cfg, run.data.task,
                          Path(cfg.output_dir) / ckpt.BEST_ADAPTER_DIR, run.stage)
        run.log.record({"event": "best", "step": done, best.metric: best.value})
        return False
    if cfg.train.early_stopping_patience and best.evals_without_improvement >= cfg.train.early_stopping_patience:
        run.log.line(f"early stopping after step {done}: {best.metric} not better than {best.value:.4f} (step "
                     f"{best.step}) in {best.evals_without_improvement} evaluations; best adapter: "
                     f"{Path(cfg.output_dir) / ckpt.BEST_ADAPTER_DIR}")
        return True
    return False


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
