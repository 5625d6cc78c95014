"""One typed config for a run: model, data, peft, train, eval, generate.

A recipe YAML fills it, `section.key=value` overrides on the command line change it, and `validate` checks it once,
reporting every problem together. The resolved config is written next to every adapter and read back by merge and
evaluate.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from peft_tuner.errors import PeftTunerError


class ConfigError(PeftTunerError):
    """A recipe or override the user wrote is wrong; the message says what to change."""


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


@dataclass
class DataConfig:
    task: str = _help("classification", "classification (prompt + label text), text (plain text, packed blocks), "
                                        "completion (a prompt and a free-text target) or chat (a list of messages).")
    train_file: str = _help("", "Training data: csv/json/jsonl/parquet file, RAFT folder, or hub spec NAME[:CONFIG][@SPLIT].")
    eval_file: Optional[str] = _help(None, "Labelled evaluation data, same forms as train_file (a RAFT folder gives dev.csv).")
    test_file: Optional[str] = _help(None, "Unlabelled test data (a RAFT folder gives test_unlabeled.csv).")
    text_column: Optional[str] = _help(None, "Column holding the input text; default: the RAFT task.json's first data column.")
    label_column: Optional[str] = _help(None, "Column holding the label; default: the RAFT task.json's label column.")
    id_column: str = _help("ID", "Column holding the example id, used in RAFT submission files.")
    prompt_template: Optional[str] = _help(None, "Prompt with {column} placeholders; default '<text column> : {<text column>} Label : ' (classification), '{prompt}' (completion).")
    completion_column: str = _help("completion", "task=completion: the column holding the target text (TRL's prompt / completion columns by default).")
    messages_column: str = _help("messages", "task=chat: the column holding the conversation, a list of {role, content} (JSON text in a CSV cell too).")
    chat_template: Optional[str] = _help(None, "Chat template for task=chat and data.chat_format: null (the tokenizer's own), a built-in (chatml, llama3, zephyr), a .jinja file, or the Jinja text.")
    chat_format: bool = _help(False, "classification and completion: render each row as a chat (the prompt as the user turn, the label or completion as the assistant's answer) with the chat template.")
    system_prompt: Optional[str] = _help(None, "With data.chat_format: a system message put before the user turn.")
    loss_on: str = _help("assistant", "task=chat: which tokens are trained on: assistant (every assistant turn and its end-of-turn token), last_assistant (the last one only) or all (every token).")
    class_names: Optional[list[str]] = _help(None, "Class names in order; default: task.json, dataset features, or the sorted labels.")
    label_words: Optional[dict[str, str]] = _help(None, "Text the model writes for each class, if not the class name.")
    max_length: int = _help(256, "Longest sequence in tokens; longer prompts lose their start, never the label.")
    empty_text: str = _help("drop", "What to do with empty or all-whitespace texts: drop (and count) or error.")
    max_rows: Optional[int] = _help(None, "Use only N rows of each split (quick runs): of a labelled split, N drawn at random (data.seed), so a file sorted by label still gives every class; of data.test_file and of plain text, the first N.")
    eval_fraction: float = _help(0.0, "With no data.eval_file: hold out this share of data.train_file's rows, stratified by class and drawn with data.seed, as the eval split (train and evaluate split alike); training uses the rest.")
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
    compile: bool = _help(False, "torch.compile the model before the first step (ZeRO-0 to ZeRO-2). Measured outside the "
                                 "trainer on one H200: a 1.1B Llama's step with LoRA on every linear layer ran 1.67x "
                                 "faster compiled, after 130 s of building, compiling and warming up (bench/gpu_step_anatomy.py); on a "
                                 "2-core CPU it did not pay (bench/step_options.py).")
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


@dataclass
class EvalConfig:
    method: str = _help("rank", "rank (log-likelihood of each class name) or generate (decode and match).")
    batch_size: int = _help(16, "Prompts per forward pass.")
    max_new_tokens: Optional[int] = _help(None, "Tokens to decode with method=generate (classification, default 5) and for completion / chat references (default 64).")
    num_beams: int = _help(1, "Beams with method=generate.")
    calibrate: bool = _help(False, "Divide class probabilities by their content-free prior (rank method).")
    match_prior: bool = _help(False, "Rank method: offset the class scores so that, over the first eval.prior_rows rows of data.test_file (no labels needed), the mean predicted class shares equal the shares of the training labels: takes out the model's lean towards a class.")
    prior_rows: int = _help(400, "Unlabelled rows of data.test_file that eval.match_prior measures the lean on.")
    metric_for_best: Optional[str] = _help(None, "What marks the best evaluation during training (best_adapter/, early stopping): accuracy, eval_loss or perplexity; default accuracy for classification, eval_loss otherwise.")
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
    name = cfg.eval.metric_for_best or ("accuracy" if cfg.data.task == "classification" else "eval_loss")
    return name, name == "accuracy"


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
        if "=" not in item:
            problems.append(f"override '{item}': write it as section.key=value, e.g. train.epochs=1")
            continue
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    cfg = _build(Config, raw, "", problems)
    problems += validate(cfg)
    if problems and collect is not None:
        collect += problems
    elif problems:
        where = f" in {path}" if path else ""
        raise ConfigError(f"{len(problems)} problem(s) with the config{where}:\n  - " + "\n  - ".join(problems))
    written = set(_flat_keys(yaml.safe_load(Path(path).read_text()) or {})) if path else set()
    written |= {item.split("=", 1)[0].strip() for item in overrides or [] if "=" in item}
    if os.environ.get("RANK", os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))) == "0":
        for warning in ignored_keys(cfg, written):
            print(f"warning: {warning}", file=sys.stderr)
    return cfg


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
        for key in ("label_words", "class_names", "label_column", "empty_text", "text_column"):
            unused[f"data.{key}"] = f"data.task={cfg.data.task}"
        for key in ("calibrate", "match_prior", "prior_rows", "method"):
            unused[f"eval.{key}"] = f"data.task={cfg.data.task} (evaluated by loss, perplexity and generation)"
    if cfg.data.task == "chat":
        unused["data.prompt_template"] = "data.task=chat (the chat template renders the messages)"
    if cfg.data.task == "text":
        for key in ("prompt_template", "label_words", "class_names", "label_column", "id_column", "empty_text", "chat_format"):
            unused[f"data.{key}"] = "data.task=text"
        for key in ("calibrate", "match_prior", "prior_rows", "method"):
            unused[f"eval.{key}"] = "data.task=text (evaluated by loss and perplexity)"
    return [f"{key}: ignored with {reason}" for key, reason in unused.items() if key in written]


def _flat_keys(raw: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in raw.items():
        if isinstance(value, dict) and prefix == "" and key in {f.name for f in dataclasses.fields(Config)}:
            keys += _flat_keys(value, f"{key}.")
        else:
            keys.append(prefix + str(key))
    return keys


def save_config(cfg: Config, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += all_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def describe(section: Optional[str] = None) -> str:
    """Every key (of one section), with its type, default and help, read from the dataclasses themselves."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section is not None and section not in sections:
        close = difflib.get_close_matches(section, list(sections), n=1)
        raise ConfigError(f"config {section}: no such section{f'; did you mean {close[0]}?' if close else ''} "
                          f"(sections: {', '.join(sections)})")
    lines = []
    for name, f in sections.items():
        if section is not None and name != section:
            continue
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        fields = [(f"{name}.{g.name}", g, nested) for g in dataclasses.fields(nested)] if dataclasses.is_dataclass(nested) \
            else [(name, f, Config)]
        for key, g, owner in fields:
            default = g.default_factory() if g.default_factory is not dataclasses.MISSING else g.default
            shown = yaml.safe_dump(default, default_flow_style=True, allow_unicode=True).strip().removesuffix("...").strip()
            lines.append(f"{key}: {_type_name(typing.get_type_hints(owner)[g.name])} = {shown}")
            lines.append(f"    {g.metadata.get('help', '')}")
    return "\n".join(lines)


# Names other tools use for our keys.
ALIASES = {"lr": "learning_rate", "num_epochs": "epochs", "num_train_epochs": "epochs", "bs": "batch_size",
           "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "gradient_accumulation",
           "grad_accum": "gradient_accumulation", "lora_r": "r", "rank": "r", "lora_alpha": "alpha",
           "lora_dropout": "dropout", "model_name_or_path": "name_or_path", "torch_dtype": "dtype",
           "max_seq_length": "max_length", "warmup": "warmup_ratio", "save_steps": "checkpoint_steps"}


def suggest_key(dotted: str) -> Optional[str]:
    """The known key a typo most likely meant: an alias, an abbreviation (lr -> learning_rate), or a close spelling."""
    keys = all_keys()
    section, _, name = dotted.rpartition(".")
    same_section = [k for k in keys if k.rpartition(".")[0] == section]
    if name in ALIASES and f"{section}.{ALIASES[name]}".lstrip(".") in keys:
        return f"{section}.{ALIASES[name]}".lstrip(".")

    def initials(key: str) -> str:
        return "".join(part[0] for part in key.rpartition(".")[2].split("_"))

    abbreviations = [k for k in same_section if len(name) >= 2 and initials(k) == name]
    if len(abbreviations) == 1:
        return abbreviations[0]
    close = difflib.get_close_matches(dotted, same_section or keys, n=1, cutoff=0.6) or \
        difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    return close[0] if close else None


def _build(cls, raw: Any, prefix: str, problems: list[str]):
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in fields:
            close = suggest_key(dotted)
            hint = f": did you mean {close}?" if close else f"; known keys here: {', '.join(fields)}"
            problems.append(f"{dotted}: unknown key{hint}")
            continue
        f = fields[key]
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            kwargs[key] = _build(f.default_factory, value or {}, dotted + ".", problems)
        else:
            ok, converted = _coerce(value, hints[key])
            if ok:
                kwargs[key] = converted
            else:
                problems.append(f"{dotted}: expected {_type_name(hints[key])}, got {value!r}")
    return cls(**kwargs)


def _coerce(value: Any, hint) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, None
    if hint is type(None):
        return value is None, None
    if origin is list:
        if isinstance(value, str):
            value = [value] if "," not in value else [v.strip() for v in value.split(",")]
        if not isinstance(value, list):
            return False, None
        (arg,) = typing.get_args(hint)
        out = [_coerce(v, arg) for v in value]
        return all(ok for ok, _ in out), [v for _, v in out]
    if origin is dict:
        return isinstance(value, dict), {str(k): str(v) for k, v in (value or {}).items()} if isinstance(value, dict) else None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return isinstance(value, (int, float)) and not isinstance(value, bool), float(value) if isinstance(value, (int, float)) else None
    if hint is str:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool), str(value)
    return True, value


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


# ----------------------------------------------------------------------------------------------------------------------
# Validation: every impossible value or combination, each naming its key


def validate(cfg: Config) -> list[str]:
    problems = []

    def check(ok: bool, message: str):
        if not ok:
            problems.append(message)

    check(cfg.model.dtype in ("fp32", "bf16", "fp16"), f"model.dtype: '{cfg.model.dtype}' is not one of fp32, bf16, fp16")
    check(cfg.data.task in TASKS, f"data.task: '{cfg.data.task}' is not one of {', '.join(TASKS)}")
    check(cfg.data.loss_on in ("assistant", "last_assistant", "all"),
          f"data.loss_on: '{cfg.data.loss_on}' is not one of assistant, last_assistant, all")
    check(not (cfg.data.chat_format and cfg.data.task == "text"), "data.chat_format: plain text has no turns; set data.task=chat for conversations")
    check(cfg.data.empty_text in ("drop", "error"), f"data.empty_text: '{cfg.data.empty_text}' is not one of drop, error")
    check(cfg.data.max_length >= 8, f"data.max_length: {cfg.data.max_length} is too short; use at least 8 tokens")
    check(cfg.data.max_rows is None or cfg.data.max_rows > 0, "data.max_rows: must be positive")
    check(0 <= cfg.data.eval_fraction < 1, "data.eval_fraction: must be in [0, 1)")
    check(not (cfg.data.eval_fraction and cfg.data.eval_file), "data.eval_fraction: data.eval_file is set too; keep one of them")
    check(not (cfg.data.eval_fraction and cfg.data.task == "text"), "data.eval_fraction: classification tasks only; give a text task its data.eval_file")
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
    if cfg.eval.metric_for_best is not None:
        allowed = ("accuracy",) if cfg.data.task == "classification" else ("eval_loss", "perplexity")
        check(cfg.eval.metric_for_best in allowed, f"eval.metric_for_best: '{cfg.eval.metric_for_best}' is not measured "
              f"during training of data.task={cfg.data.task}; use {' or '.join(allowed)}")
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
