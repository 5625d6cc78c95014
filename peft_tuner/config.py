"""One typed config for a run: model, data, peft, train, eval, generate.

A recipe YAML fills it, `section.key=value` overrides on the command line change it, and `validate` checks it once,
reporting every problem together. The resolved config is written next to every adapter and read back by merge and
evaluate.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from peft_tuner import config_parse
from peft_tuner.config_parse import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "save_config", "describe"]


def _help(default, text: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class ModelConfig:
    name_or_path: str = _help("", "Hub id or local folder of the base causal LM (a folder holding a .gguf file works).")
    gguf_file: Optional[str] = _help(None, "Name of a GGUF file inside `name_or_path` to load and dequantize.")
    eos_token: Optional[str] = _help(None, "The token that ends a label or a text; default: the tokenizer's EOS, else its [SEP] (BERT vocabularies, as Chinese GPT-2 models ship).")
    dtype: str = _help("fp32", "Weights dtype for training: fp32, bf16 or fp16.")
    gradient_checkpointing: bool = _help(False, "Recompute activations in backward to save memory.")
    trust_remote_code: bool = _help(False, "Allow model code from the model folder (hub models with custom code).")
    quantization: str = _help("none", "Load the base model quantized (QLoRA) through bitsandbytes: none, nf4, fp4 (4-bit) or int8; the adapter trains in full precision on top (docs/qlora.md).")
    double_quant: bool = _help(True, "4-bit: quantize the quantization constants too (QLoRA's double quantization).")
    compute_dtype: Optional[str] = _help("auto", "4-bit: the dtype the quantized layers compute in: bf16, fp16, fp32, or auto (bf16 where the machine computes it natively, else fp32).")
    quant_storage: Optional[str] = _help("auto", "4-bit: the dtype the packed weights are stored as: uint8, bf16, fp16, fp32, or auto (the compute dtype under ZeRO-3, so DeepSpeed partitions them; else uint8).")


@dataclass
class DataConfig:
    task: str = _help("classification", "classification (prompt + label text), text (plain text, packed blocks), "
                                        "completion (a prompt and a free-text target) or chat (a list of messages).")
    train_file: str = _help("", "Training data: a csv/tsv/json/jsonl/parquet/txt file, a RAFT folder, or a hub dataset NAME[:CONFIG][@SPLIT]. A path starting with ${PEFT_TUNER_DATA} is read from the data root (PEFT_TUNER_DATA, else ../shared/data beside the checkout); any other path as written.")
    eval_file: Optional[str] = _help(None, "Labelled evaluation data, same forms as train_file (a RAFT folder gives dev.csv).")
    test_file: Optional[str] = _help(None, "Unlabelled test data (a RAFT folder gives test_unlabeled.csv).")
    text_column: Optional[str] = _help(None, "Column holding the input text; default: the RAFT task.json's first data column.")
    label_column: Optional[str] = _help(None, "Column holding the label; default: the RAFT task.json's label column.")
    id_column: str = _help("ID", "Column holding the example id, used in RAFT submission files.")
    prompt_template: Optional[str] = _help(None, "Prompt with {column} placeholders; default '<text column> : {<text column>} Label : ' (classification), '{prompt}' (completion).")
    completion_column: str = _help("completion", "task=completion: the column holding the target text (TRL's prompt / completion columns by default).")
    messages_column: str = _help("messages", "task=chat: the column holding the conversation, a list of {role, content} (JSON text in a CSV cell too).")
    format: str = _help("auto", "The rows' format for task=chat and preference training: auto (detected from the columns), alpaca (instruction, input, output, system, history), sharegpt (conversations of {from, value}), messages ({role, content}), preference (prompt, chosen, rejected); docs/data.md.")
    columns: Optional[dict[str, str]] = _help(None, "Your column for each field data.format reads, where the names differ: {prompt: question, chosen: good, rejected: bad}, {instruction: q, output: a}, {conversations: dialog}, {messages: turns}.")
    message_keys: Optional[dict[str, str]] = _help(None, "The keys of a message where they are not role / content: {role: from, content: value}.")
    roles: Optional[dict[str, str]] = _help(None, "Role names beyond the usual aliases (human, gpt, bot, model ...), mapped to system / user / assistant / tool: {customer: user, agent: assistant}.")
    chat_template: Optional[str] = _help(None, "Chat template for task=chat and data.chat_format: null (the tokenizer's own), a built-in (chatml, llama3, zephyr), a .jinja file, or the Jinja text.")
    chat_format: bool = _help(False, "classification and completion: render each row as a chat (the prompt as the user turn, the label or completion as the assistant's answer) with the chat template.")
    system_prompt: Optional[str] = _help(None, "With data.chat_format: a system message put before the user turn.")
    loss_on: str = _help("assistant", "task=chat: which tokens are trained on: assistant (every assistant turn and its end-of-turn token), last_assistant (the last one only) or all (every token).")
    class_names: Optional[list[str]] = _help(None, "Class names in order; default: task.json, dataset features, or the sorted labels.")
    label_words: Optional[dict[str, str]] = _help(None, "Text the model writes for each class, if not the class name.")
    label_boundary: str = _help("example", "Where the prompt ends and the label begins: example (the prompt with its trailing space, then the label encoded on its own, as the PEFT example does) or word (the prompt's trailing whitespace moved into the label, so the label starts with the tokenizer's own word token, as lm-evaluation-harness scores it).")
    max_length: int = _help(256, "Longest sequence in tokens; longer prompts lose their start, never the label.")
    empty_text: str = _help("drop", "What to do with empty or all-whitespace texts: drop (and count) or error.")
    max_rows: Optional[int] = _help(None, "Use only N rows of each split (quick runs): of a labelled split, N drawn at random (data.seed), so a file sorted by label still gives every class; of data.test_file and of plain text, the first N.")
    eval_fraction: float = _help(0.0, "With no data.eval_file: hold out this share of data.train_file's rows (classification: stratified by class; text: lines; completion, chat: rows), drawn with data.seed, as the eval split (train and evaluate split alike); training uses the rest.")
    seed: int = _help(0, "Seed of the data.max_rows draw and of the data.eval_fraction split.")
    cache: bool = _help(True, "Keep tokenized examples in ~/.cache/peft_tuner/tokenized (PEFT_TUNER_CACHE), keyed by tokenizer, rows and these settings: a second run reads them instead of tokenizing.")


TASKS = ("classification", "text", "completion", "chat")
TRACKERS = ("tensorboard", "mlflow", "wandb")
PEFT_METHODS = ("lora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "adalora", "full")
PROMPT_LEARNING_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")


@dataclass
class PeftSettings:
    method: str = _help("lora", f"One of {', '.join(PEFT_METHODS)}.")
    target_modules: Optional[Union[str, list[str]]] = _help(None, "Module names to adapt, or 'all-linear'; default from the architecture.")
    r: int = _help(8, "LoRA / AdaLoRA rank.")
    alpha: int = _help(16, "LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with use_rslora).")
    dropout: float = _help(0.05, "Dropout on the LoRA input.")
    use_rslora: bool = _help(False, "Rank-stabilized LoRA scaling alpha / sqrt(r).")
    use_dora: bool = _help(False, "Weight-decomposed LoRA (DoRA).")
    num_virtual_tokens: int = _help(20, "Virtual tokens for prompt tuning, prefix tuning and P-tuning.")
    prompt_init_text: Optional[str] = _help(None, "Initialise prompt tuning from this text instead of random vectors.")


@dataclass
class TrainConfig:
    epochs: int = _help(3, "Passes over the training data.")
    learning_rate: float = _help(3e-4, "Peak learning rate of AdamW.")
    weight_decay: float = _help(0.0, "AdamW weight decay.")
    batch_size: int = _help(8, "Micro-batch per process (DeepSpeed's train_micro_batch_size_per_gpu).")
    gradient_accumulation: int = _help(1, "Micro-batches per optimizer step.")
    autocast: Optional[str] = _help(None, "Run the training forward in bf16 or fp16 under autocast while the weights, "
                                          "gradients and AdamW stay fp32 (model.dtype): bf16, fp16, or auto (bf16 where this "
                                          "machine computes it natively: a GPU that supports it, a CPU with AVX-512 BF16 or "
                                          "AMX; else off); default off.")
    padding_free: bool = _help(False, "Each micro-batch's rows as one sequence without padding: positions restart at "
                                      "each row and attention stays within it; the loss is the padded batch's. Not "
                                      "for prompt learning (virtual tokens lead every row).")
    packed_attention: str = _help("rows", "How a padding-free batch keeps its rows apart in attention: rows (each row "
                                          "attends to itself alone: one row at a time on a CPU, flash-attention's varlen "
                                          "kernel on a GPU in bf16 / fp16) or mask (SDPA over the whole sequence under a "
                                          "block-diagonal mask).")
    compile: bool = _help(False, "torch.compile the model before the first step (ZeRO-0 to ZeRO-2; refused under ZeRO-3). "
                                 "It costs minutes of compiling at the start; see docs/benchmarks.md for where it paid.")
    liger_kernels: bool = _help(False, "On a CUDA GPU: Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) and its fused linear cross-entropy for the loss, which never materializes the logits (pip install liger-kernel; Llama family; ZeRO-0 to ZeRO-2).")
    objective: str = _help("sft", "sft (next-token loss on the targets), or preference training on pairs of a chosen and a rejected answer (data.format=preference rows; data.task=chat renders them with the chat template, completion as prompt + answer + EOS): dpo, ipo, or orpo (no reference); docs/preference.md.")
    beta: float = _help(0.1, "dpo, ipo, orpo: DPO's and IPO's beta (how far from the reference the policy may move), ORPO's weight of the odds-ratio term (TRL's default 0.1 for each).")
    label_smoothing: float = _help(0.0, "dpo: the share of pairs taken to be mislabelled (conservative DPO), in [0, 0.5).")
    precompute_reference: bool = _help(False, "dpo, ipo: the reference's log-probabilities of every pair computed once before the first step, so no step runs the reference forward (and full fine-tuning has a reference).")
    lr_scheduler: str = _help("linear", "linear, cosine or constant, after warmup.")
    warmup_ratio: float = _help(0.0, "Share of the optimizer steps spent warming up linearly from 0.")
    max_grad_norm: float = _help(1.0, "Gradient clipping norm (0 turns clipping off).")
    neftune_alpha: float = _help(0.0, "NEFTune: uniform noise of size alpha/sqrt(length*hidden) on the input embeddings while training (0: off; 5 is the paper's usual value).")
    seed: int = _help(42, "Seed for weights init, data order and dropout: two runs with one seed are identical.")
    checkpoint_steps: int = _help(0, "Write a resumable checkpoint every N optimizer steps (0: only on SIGTERM).")
    keep_checkpoints: int = _help(2, "How many of the newest checkpoints to keep.")
    log_steps: int = _help(1, "Log every N optimizer steps.")
    zero3_init: bool = _help(True, "Under ZeRO-3, load the base model already partitioned (deepspeed.zero.Init): no rank holds it whole. "
                                   "Under accelerate launch, its YAML's zero3_init_flag decides.")
    eval_each_epoch: bool = _help(False, "Evaluate data.eval_file after every epoch: accuracy (classification), loss and perplexity (text, completion, chat).")
    eval_steps: int = _help(0, "Evaluate as eval_each_epoch does every N optimizer steps too (0: off).")
    eval_epochs: int = _help(0, "Evaluate as eval_each_epoch does after every N-th epoch and after the last (0: off; 1 is eval_each_epoch).")
    early_stopping_patience: int = _help(0, "Stop after N evaluations in a row without a better eval.metric_for_best; the best adapter is kept in output_dir/best_adapter (0: off).")
    report_to: list[str] = _help([], "Experiment trackers besides train_log.jsonl: tensorboard (event files in output_dir/tensorboard), mlflow (output_dir/mlruns, or MLFLOW_TRACKING_URI), wandb (offline, output_dir/wandb).")
    verify_adapter: bool = _help(True, "After saving, reload the adapter on rank 0 and check it reproduces the trained logits.")
    cpu_tuning: Union[str, bool, list[str]] = _help("auto", "On a machine without a GPU: auto (every CPU-only setting that fits the "
                                                      "run), off (none: torch's and glibc's defaults), or a list of onednn_cache, "
                                                      "malloc, threads, dropout, short_rows_fp32, eager_scoring, where auto "
                                                      "stands for all and -NAME takes one out ([auto, -malloc]); docs/cpu.md. "
                                                      "The start record lists what was set.")
    deepspeed_patches: bool = _help(True, "Use the faster replacements of DeepSpeed internals (ZeRO-3's release decisions) "
                                          "where DeepSpeed's version is one they were tested on; false: DeepSpeed's own code.")


@dataclass
class EvalConfig:
    method: str = _help("rank", "rank (log-likelihood of each class name) or generate (decode and match).")
    batch_size: int = _help(16, "Prompts per forward pass.")
    max_new_tokens: Optional[int] = _help(None, "Tokens to decode with method=generate (classification, default 5) and for completion / chat references (default 64).")
    num_beams: int = _help(1, "Beams with method=generate.")
    calibrate: bool = _help(False, "Divide class probabilities by their content-free prior (rank method).")
    match_prior: bool = _help(False, "Rank method: offset the class scores so that, over the first eval.prior_rows rows of data.test_file (no labels needed), the mean predicted class shares equal the shares of the training labels: takes out the model's lean towards a class.")
    prior_rows: int = _help(400, "Unlabelled rows of data.test_file that eval.match_prior measures the lean on.")
    quantization: Optional[str] = _help(None, "The base model's quantization for evaluate and generate: none, nf4, fp4, int8; null follows model.quantization (an adapter then stays unmerged on the quantized base).")
    metric_for_best: Optional[str] = _help(None, "What marks the best evaluation during training (best_adapter/, early stopping): accuracy, eval_loss or perplexity; with a preference objective eval_loss, reward_accuracy or reward_margin; default accuracy for classification, eval_loss otherwise.")
    dtype: Optional[str] = _help(None, "Weights dtype for evaluation and generation: fp32, bf16, fp16, or auto (bf16 where "
                                       "this machine computes it natively: a GPU that supports it, a CPU with AVX-512 BF16 "
                                       "or AMX; else model.dtype); default model.dtype.")


@dataclass
class GenerateConfig:
    max_new_tokens: int = _help(32, "Tokens to generate per prompt.")
    num_beams: int = _help(1, "Beam search width (1: no beam search).")
    do_sample: bool = _help(False, "Sample instead of greedy / beam decoding.")
    temperature: float = _help(1.0, "Sampling temperature.")
    top_k: int = _help(50, "Sample among the k most likely tokens (0: no limit).")
    top_p: float = _help(1.0, "Sample among the smallest set of tokens whose probability reaches p.")
    num_return_sequences: int = _help(1, "Outputs per prompt.")
    batch_size: int = _help(8, "Prompts per generate call.")


@dataclass
class DistillConfig:
    teachers: int = _help(3, "`peft-tuner distill`: how many teachers, the recipe trained with seeds 1..N.")
    rows: Optional[int] = _help(400, "`peft-tuner distill`: the first N rows of data.test_file that the teachers' ensemble labels (null: all).")
    student_epochs: int = _help(3, "`peft-tuner distill`: the student's epochs over the labelled and pseudo-labelled rows.")
    parallel: int = _help(1, "`peft-tuner distill`: how many teachers train at once, the cores shared out between them.")
    dtype: Optional[str] = _help(None, "`peft-tuner distill`: the weights' dtype of the teachers and the student: fp32, "
                                       "bf16, fp16, or auto (bf16 where this machine computes it natively: a GPU with bf16, "
                                       "a CPU with AVX-512 BF16 or AMX; else model.dtype); default model.dtype.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftSettings = field(default_factory=PeftSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    deepspeed: Optional[str] = _help(None, "DeepSpeed JSON config (ds_configs/zero2.json ...); its 'auto' values come from this recipe.")
    output_dir: str = _help("outputs/run", "Where the adapter, logs and checkpoints go.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def metric_for_best(cfg: Config) -> tuple[str, bool]:
    """The metric that marks the best evaluation during training, and whether higher is better."""
    name = cfg.eval.metric_for_best or ("accuracy" if cfg.data.task == "classification" and cfg.train.objective == "sft"
                                        else "eval_loss")
    return name, name in ("accuracy", "reward_accuracy", "reward_margin")


def evaluates_during_training(cfg: Config) -> bool:
    return cfg.train.eval_each_epoch or cfg.train.eval_steps > 0 or cfg.train.eval_epochs > 0


def evaluates_after_step(cfg: Config, done: int, steps_per_epoch: int) -> bool:
    """Whether training evaluates after its `done`-th optimizer step: every train.eval_steps steps, at the end of every
    epoch (train.eval_each_epoch) or of every train.eval_epochs-th epoch and the last."""
    if cfg.train.eval_steps and done % cfg.train.eval_steps == 0:
        return True
    if done % steps_per_epoch:
        return False
    epoch = done // steps_per_epoch
    return cfg.train.eval_each_epoch or (cfg.train.eval_epochs > 0 and (epoch % cfg.train.eval_epochs == 0 or
                                                                          epoch == cfg.train.epochs))


def eval_new_tokens(cfg: Config) -> int:
    """Tokens an evaluation decodes: a class name is short, a reference answer is not."""
    return cfg.eval.max_new_tokens or (5 if cfg.data.task == "classification" else 64)


# ----------------------------------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides fill the same object


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, base: Optional[dict] = None,
                problems: Optional[list[str]] = None) -> Config:
    """Read a recipe (or start from `base`, a saved config), apply `section.key=value` overrides, check types and
    values; raise one ConfigError for all problems, or, given a `problems` list, add them to it and return the config
    built from the rest (so that a preflight can report them with the problems it finds further on)."""
    from peft_tuner.config_checks import ignored_keys, validate

    collect = problems
    raw: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe {path}: no such file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {path}: expected a mapping of sections at the top level")
    problems = []
    for item in overrides or []:
        try:
            config_parse.set_dotted(raw, *config_parse.parse_override(item))
        except ConfigError as e:
            problems.append(str(e))
    cfg = config_parse.build(Config, raw, "", problems)
    problems += validate(cfg)
    if problems and collect is not None:
        collect += problems
    elif problems:
        where = f" in {path}" if path else ""
        raise ConfigError(f"{len(problems)} problem(s) with the config{where}:\n  - " + "\n  - ".join(problems))
    written = set(config_parse.flat_keys(Config, yaml.safe_load(Path(path).read_text()) or {})) if path else set()
    written |= {item.split("=", 1)[0].strip() for item in overrides or [] if "=" in item}
    if os.environ.get("RANK", os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))) == "0":
        for warning in ignored_keys(cfg, written):
            print(f"warning: {warning}", file=sys.stderr)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


def describe(section: Optional[str] = None) -> str:
    """Every config key (of one section), with its type, default and help."""
    return config_parse.describe(Config, section)


REFERENCE_INTRO = """# Configuration reference

Every key of a recipe, with its type, default and what it does. A recipe YAML sets them by section (`train:` then
`epochs: 3`); on the command line `section.key=value` overrides them (`train.epochs=1`), the value read as YAML (quote
text with colons or braces: `"data.prompt_template='Tweet : {text} Label :'"`). `peft-tuner config [SECTION]` prints
the same in the terminal. This page is written by `peft-tuner config --markdown > docs/configuration.md`; a test fails
when it is stale."""


def describe_markdown() -> str:
    """docs/configuration.md: every key, one table per section."""
    return config_parse.describe_markdown(Config, REFERENCE_INTRO)
