"""The checks of a whole config: every impossible value or combination, each naming its key and the fix
(`validate`), and the keys a user wrote that the chosen method, task or evaluation never reads (`ignored_keys`)."""
from __future__ import annotations

import difflib

from peft_tuner.config import (PEFT_METHODS, PROMPT_LEARNING_METHODS, TASKS, TRACKERS, Config,
                               evaluates_during_training)
from peft_tuner.quantization import QUANTIZATIONS


def ignored_keys(cfg: Config, written: set[str]) -> list[str]:
    """The keys the user wrote that the chosen method, task or evaluation never reads, each with the reason."""
    method, prompt = cfg.peft.method, cfg.peft.method in PROMPT_LEARNING_METHODS
    unused = {}
    for key in ("r", "alpha", "dropout", "use_rslora", "use_dora", "target_modules"):
        if method == "full" or prompt or (method == "ia3" and key != "target_modules"):
            unused[f"peft.{key}"] = f"peft.method={method}"
    for key in ("num_virtual_tokens", "prompt_init_text"):
        if not prompt or (key == "prompt_init_text" and method != "prompt_tuning"):
            unused[f"peft.{key}"] = f"peft.method={method}"
    if cfg.eval.method == "rank" and cfg.data.task == "classification":
        unused.update({"eval.num_beams": "eval.method=rank", "eval.max_new_tokens": "eval.method=rank"})
    if cfg.data.task != "chat":
        for key in ("messages_column", "loss_on"):
            unused[f"data.{key}"] = f"data.task={cfg.data.task}"
    if cfg.data.task != "completion":
        unused["data.completion_column"] = f"data.task={cfg.data.task}"
    if cfg.data.task in ("classification", "completion") and not cfg.data.chat_format:
        for key in ("chat_template", "system_prompt"):
            unused[f"data.{key}"] = f"data.task={cfg.data.task} without data.chat_format"
    if cfg.data.task in ("completion", "chat"):
        for key in ("label_words", "class_names", "label_column", "empty_text", "text_column", "label_boundary"):
            unused[f"data.{key}"] = f"data.task={cfg.data.task}"
        for key in ("calibrate", "match_prior", "prior_rows", "method"):
            unused[f"eval.{key}"] = f"data.task={cfg.data.task} (evaluated by loss, perplexity and generation)"
    if cfg.data.task == "chat":
        unused["data.prompt_template"] = "data.task=chat (the chat template renders the messages)"
    if cfg.data.task == "text":
        for key in ("prompt_template", "label_words", "class_names", "label_column", "id_column", "empty_text", "chat_format",
                    "label_boundary"):
            unused[f"data.{key}"] = "data.task=text"
        for key in ("calibrate", "match_prior", "prior_rows", "method"):
            unused[f"eval.{key}"] = "data.task=text (evaluated by loss and perplexity)"
    objective = cfg.train.objective
    for key in ("beta", "label_smoothing", "precompute_reference"):
        if objective == "sft" or (key == "label_smoothing" and objective != "dpo") or \
                (key == "precompute_reference" and objective == "orpo"):
            unused[f"train.{key}"] = f"train.objective={objective}"
    return [f"{key}: ignored with {reason}" for key, reason in unused.items() if key in written]


def validate(cfg: Config) -> list[str]:
    problems = []

    def check(ok: bool, message: str):
        if not ok:
            problems.append(message)

    check(cfg.model.dtype in ("fp32", "bf16", "fp16"), f"model.dtype: '{cfg.model.dtype}' is not one of fp32, bf16, fp16")
    for key, value in (("model.quantization", cfg.model.quantization), ("eval.quantization", cfg.eval.quantization or "none")):
        check(value in QUANTIZATIONS, f"{key}: '{value}' is not one of {', '.join(QUANTIZATIONS)}")
    check(cfg.model.compute_dtype in ("auto", "bf16", "fp16", "fp32"),
          f"model.compute_dtype: '{cfg.model.compute_dtype}' is not one of auto, bf16, fp16, fp32")
    check(cfg.model.quant_storage in ("auto", "uint8", "bf16", "fp16", "fp32"),
          f"model.quant_storage: '{cfg.model.quant_storage}' is not one of auto, uint8, bf16, fp16, fp32")
    check(cfg.data.task in TASKS, f"data.task: '{cfg.data.task}' is not one of {', '.join(TASKS)}")
    check(cfg.data.loss_on in ("assistant", "last_assistant", "all"),
          f"data.loss_on: '{cfg.data.loss_on}' is not one of assistant, last_assistant, all")
    check(not (cfg.data.chat_format and cfg.data.task == "text"), "data.chat_format: plain text has no turns; set data.task=chat for conversations")
    check(cfg.data.empty_text in ("drop", "error"), f"data.empty_text: '{cfg.data.empty_text}' is not one of drop, error")
    from peft_tuner.data.conversations import FORMATS

    check(cfg.data.format in FORMATS, f"data.format: '{cfg.data.format}' is not one of {', '.join(FORMATS)}")
    check(cfg.data.label_boundary in ("example", "word"),
          f"data.label_boundary: '{cfg.data.label_boundary}' is not one of example, word")
    check(cfg.data.max_length >= 8, f"data.max_length: {cfg.data.max_length} is too short; use at least 8 tokens")
    check(cfg.data.max_rows is None or cfg.data.max_rows > 0, "data.max_rows: must be positive")
    check(0 <= cfg.data.eval_fraction < 1, "data.eval_fraction: must be in [0, 1)")
    check(not (cfg.data.eval_fraction and cfg.data.eval_file), "data.eval_fraction: data.eval_file is set too; keep one of them")
    if cfg.peft.method not in PEFT_METHODS:
        close = difflib.get_close_matches(cfg.peft.method, PEFT_METHODS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        problems.append(f"peft.method: '{cfg.peft.method}' is not one of {', '.join(PEFT_METHODS)}{hint}")
    check(cfg.peft.r > 0, "peft.r: must be positive")
    check(0 <= cfg.peft.dropout < 1, "peft.dropout: must be in [0, 1)")
    check(cfg.peft.num_virtual_tokens > 0, "peft.num_virtual_tokens: must be positive")
    check(not (cfg.peft.use_dora and cfg.peft.method != "lora"), "peft.use_dora: only applies to peft.method=lora")
    check(not (cfg.peft.use_rslora and cfg.peft.method != "lora"), "peft.use_rslora: only applies to peft.method=lora "
          "(AdaLoRA's own scaling has no rank-stabilised form here)")
    check(cfg.train.epochs > 0, "train.epochs: must be positive")
    check(cfg.train.learning_rate > 0, "train.learning_rate: must be positive")
    check(cfg.train.batch_size > 0, "train.batch_size: must be positive")
    check(cfg.train.gradient_accumulation > 0, "train.gradient_accumulation: must be positive")
    check(not (cfg.train.padding_free and cfg.peft.method in PROMPT_LEARNING_METHODS),
          f"train.padding_free: peft.method={cfg.peft.method} puts virtual tokens before each row, which one sequence "
          f"of several rows cannot have; set train.padding_free=false")
    check(cfg.train.packed_attention in ("rows", "mask"),
          f"train.packed_attention: '{cfg.train.packed_attention}' is not one of rows, mask")
    check(cfg.train.lr_scheduler in ("linear", "cosine", "constant"), f"train.lr_scheduler: '{cfg.train.lr_scheduler}' is not one of linear, cosine, constant")
    check(0 <= cfg.train.warmup_ratio < 1, "train.warmup_ratio: must be in [0, 1)")
    check(cfg.train.max_grad_norm >= 0, "train.max_grad_norm: must be >= 0")
    check(cfg.train.neftune_alpha >= 0, "train.neftune_alpha: must be >= 0 (0 turns NEFTune off)")
    try:
        from peft_tuner.runtime import parse_cpu_tuning

        parse_cpu_tuning(cfg.train.cpu_tuning)
    except ValueError as e:
        problems.append(f"train.cpu_tuning: {e}")
    check(cfg.train.checkpoint_steps >= 0, "train.checkpoint_steps: must be >= 0")
    check(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints: must be >= 1")
    check(cfg.train.log_steps >= 1, "train.log_steps: must be >= 1")
    check(cfg.train.eval_steps >= 0, "train.eval_steps: must be >= 0 (0: off)")
    check(cfg.train.early_stopping_patience >= 0, "train.early_stopping_patience: must be >= 0 (0: off)")
    check(cfg.train.eval_epochs >= 0, "train.eval_epochs: must be >= 0 (0: off)")
    check(not (cfg.train.early_stopping_patience and not evaluates_during_training(cfg)),
          "train.early_stopping_patience: needs evaluations to compare; set train.eval_steps=N, train.eval_epochs=N or "
          "train.eval_each_epoch=true")
    for tracker in cfg.train.report_to:
        check(tracker in TRACKERS, f"train.report_to: '{tracker}' is not one of {', '.join(TRACKERS)}")
    from peft_tuner.preference import OBJECTIVES, check_objective

    check(cfg.train.objective in OBJECTIVES, f"train.objective: '{cfg.train.objective}' is not one of {', '.join(OBJECTIVES)}")
    problems += check_objective(cfg)
    if cfg.eval.metric_for_best is not None:
        allowed = ("accuracy",) if cfg.data.task == "classification" else ("eval_loss", "perplexity")
        if cfg.train.objective != "sft":
            allowed = ("eval_loss", "reward_accuracy", "reward_margin")
        check(cfg.eval.metric_for_best in allowed, f"eval.metric_for_best: '{cfg.eval.metric_for_best}' is not measured "
              f"during training of data.task={cfg.data.task}, train.objective={cfg.train.objective}; use "
              f"{' or '.join(allowed)}")
    check(cfg.eval.max_new_tokens is None or cfg.eval.max_new_tokens > 0, "eval.max_new_tokens: must be positive")
    check(cfg.train.autocast in (None, "bf16", "fp16", "auto"),
          f"train.autocast: '{cfg.train.autocast}' is not one of bf16, fp16, auto")
    check(cfg.train.autocast is None or cfg.model.dtype == "fp32",
          f"train.autocast: the weights are already {cfg.model.dtype} (model.dtype); autocast is for fp32 weights: "
          f"set model.dtype=fp32 or leave train.autocast out")
    check(cfg.eval.dtype in (None, "fp32", "bf16", "fp16", "auto"),
          f"eval.dtype: '{cfg.eval.dtype}' is not one of fp32, bf16, fp16, auto")
    check(cfg.eval.method in ("rank", "generate"), f"eval.method: '{cfg.eval.method}' is not one of rank, generate")
    check(cfg.eval.batch_size > 0, "eval.batch_size: must be positive")
    check(cfg.eval.prior_rows > 0, "eval.prior_rows: must be positive")
    if cfg.eval.match_prior:
        check(cfg.eval.method == "rank", "eval.match_prior: works on rank classification's class scores; set eval.method=rank")
        check(bool(cfg.data.train_file), "eval.match_prior: needs data.train_file (the training labels' class shares)")
        check(bool(cfg.data.test_file), "eval.match_prior: needs data.test_file (unlabelled rows to measure the lean on)")
    check(cfg.generate.num_return_sequences <= max(cfg.generate.num_beams, 1) or cfg.generate.do_sample,
          "generate.num_return_sequences: greedy decoding returns one sequence; raise generate.num_beams or set generate.do_sample=true")
    check(cfg.generate.temperature > 0, "generate.temperature: must be positive")
    check(0 < cfg.generate.top_p <= 1, "generate.top_p: must be in (0, 1]")
    check(cfg.distill.teachers >= 1, "distill.teachers: must be at least 1")
    check(cfg.distill.rows is None or cfg.distill.rows >= 1, "distill.rows: must be at least 1 (null: every row)")
    check(cfg.distill.student_epochs >= 1, "distill.student_epochs: must be at least 1")
    check(cfg.distill.parallel >= 1, "distill.parallel: must be at least 1")
    check(cfg.distill.dtype in (None, "fp32", "bf16", "fp16", "auto"),
          f"distill.dtype: '{cfg.distill.dtype}' is not one of fp32, bf16, fp16, auto")
    if cfg.data.prompt_template is not None:
        check("{" in cfg.data.prompt_template, "data.prompt_template: name at least one column in braces, e.g. '{Tweet text}'")
    return problems
