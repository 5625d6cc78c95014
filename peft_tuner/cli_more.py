"""Verbs after training: merge, evaluate, pseudo-label, distill, generate (and model preparation and the demo, registered by their modules).

Each reads the config saved beside the adapter or merged model unless a recipe is given; overrides apply on top.
"""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its base model; verify; save a standalone folder")
    p.add_argument("items", nargs="*", help="[RECIPE.yaml] [section.key=value ...]")
    p.add_argument("--adapter", required=True, help="adapter folder written by training (output_dir/adapter)")
    p.add_argument("--out", required=True, help="folder for the merged model (must be empty unless --overwrite)")
    p.add_argument("--base", help="base model (hub id, folder, .gguf); default: the one the adapter was trained on")
    p.add_argument("--dtype", default="fp32", help="dtype of the saved merged weights: fp32, bf16 or fp16")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_merge)

    p = sub.add_parser("evaluate", help="batch evaluation: rank classification or generation; metrics and predictions")
    p.add_argument("items", nargs="*", help="[RECIPE.yaml] [section.key=value ...]")
    _add_model_flags(p, ensemble=True)
    p.add_argument("--split", default="eval", choices=["eval", "test"], help="data.eval_file or data.test_file")
    p.add_argument("--method", choices=["rank", "generate"], help="default: eval.method")
    p.add_argument("--out", help="where predictions and metrics go (default: output_dir/eval)")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("pseudo-label", help="label data.test_file's rows with adapters (an ensemble, say) and write "
                       "them with the training rows to one CSV, for training a student adapter on")
    p.add_argument("items", nargs="*", help="[RECIPE.yaml] [section.key=value ...]")
    _add_model_flags(p, ensemble=True)
    p.add_argument("--rows", type=int, help="label the first N rows of data.test_file (default: all)")
    p.add_argument("--out", required=True, help="the CSV to write (training rows, then the labelled rows)")
    p.add_argument("--overwrite", action="store_true", help="replace --out and its _scores folder if they exist")
    p.set_defaults(run=_pseudo_label)

    p = sub.add_parser("distill", help="the distillation recipe in one command: teachers (seeds 1..N), their "
                       "ensemble's labels for unlabelled rows, one student adapter; each evaluated")
    p.add_argument("items", nargs="*", help="RECIPE.yaml [section.key=value ...]")
    p.add_argument("--out", required=True, help="folder for the teachers, the labels and the student; a second call "
                   "with the same settings continues there")
    p.add_argument("--teachers", type=int, help="how many teachers, seeds 1..N (default: distill.teachers, 3)")
    p.add_argument("--rows", type=int, help="label the first N rows of data.test_file (default: distill.rows, 400)")
    p.add_argument("--student-epochs", type=int, help="the student's epochs (default: distill.student_epochs, 3)")
    p.add_argument("--processes", type=int, default=1, help="1: one plain process; N > 1: DeepSpeed ZeRO-2 on N "
                   "GPUs, or N CPU processes")
    p.add_argument("--overwrite", action="store_true", help="replace a distillation with other settings in --out (finished teachers of the same recipe are kept)")
    p.set_defaults(run=_distill)

    p = sub.add_parser("generate", help="generate text: greedy, beam, sampling, top-k/top-p")
    p.add_argument("items", nargs="*", help="[RECIPE.yaml] [section.key=value ...], e.g. generate.num_beams=4")
    _add_model_flags(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_generate)

    p = sub.add_parser("convert-loralib", help="turn LoRA weights trained with loralib (Microsoft's LoRA code) into a "
                       "peft adapter folder, which merge, evaluate and generate then take with --adapter")
    p.add_argument("checkpoint", help="torch.save of loralib.lora_state_dict(model) (or of a whole state dict)")
    p.add_argument("--base", required=True, help="the base model loralib adapted (hub id, folder, .gguf)")
    p.add_argument("--r", type=int, required=True, help="loralib's rank r")
    p.add_argument("--alpha", type=int, required=True, help="loralib's lora_alpha")
    p.add_argument("--enable-lora", help="for MergedLinear layers: which output chunks have LoRA, e.g. true,false,true "
                   "(default: GPT-2's q,k,v example, q and v)")
    p.add_argument("--out", required=True, help="adapter folder to write (must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_convert_loralib)

    from peft_tuner import prepare

    prepare.register(sub)


def _add_model_flags(p, ensemble: bool = False) -> None:
    if ensemble:
        p.add_argument("--adapter", action="append", help="adapter folder, on the base model of its saved config; "
                       "repeat it to score several adapters (other seeds, say) as one ensemble")
    else:
        p.add_argument("--adapter", help="adapter folder, on the base model of its saved config")
    p.add_argument("--model", help="merged (standalone) model folder")
    p.add_argument("--base", help="base model instead of the configured one")


def recipes_and_overrides(args) -> tuple[list[str], list[str]]:
    """The positional items split into recipe YAMLs and section.key=value overrides."""
    items = list(args.items) + list(getattr(args, "overrides", []) or [])
    recipes = [i for i in items if i.endswith((".yaml", ".yml")) and "=" not in i]
    return recipes, [i for i in items if i not in recipes]


def config_for(args):
    """Recipe if given, else the config saved beside the adapter / merged model; overrides on top."""
    import yaml

    from peft_tuner.checkpoint import ADAPTER_CONFIG_FILE
    from peft_tuner.config import ConfigError, load_config

    recipes, overrides = recipes_and_overrides(args)
    if getattr(args, "base", None):
        overrides.append(f"model.name_or_path={args.base}")
    if len(recipes) > 1:
        raise ConfigError(f"give one recipe, not {recipes}")
    if recipes:
        return load_config(recipes[0], overrides)
    adapter = getattr(args, "adapter", None)
    saved_dir = (adapter[0] if isinstance(adapter, list) else adapter) or getattr(args, "model", None)
    saved = Path(saved_dir) / ADAPTER_CONFIG_FILE if saved_dir else None
    if saved is None or not saved.is_file():
        raise ConfigError("no recipe given and no saved config beside the model; pass RECIPE.yaml")
    return load_config(None, overrides, base=yaml.safe_load(saved.read_text()))


def _merge(args) -> int:
    from peft_tuner.merge import merge

    result = merge(config_for(args), args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite,
                   max_shard_size=args.max_shard_size)
    print(f"merged {args.adapter} into {result['out_dir']} ({result['parameters']:,} parameters, {result['dtype']}); "
          f"largest |logit| difference to base+adapter: {result['max_logit_diff']:.2e}")
    return 0


def _evaluate(args) -> int:
    from peft_tuner.evaluate import evaluate

    cfg = config_for(args)
    out = args.out or str(Path(cfg.output_dir) / "eval")
    evaluate(cfg, out, split=args.split, model_dir=args.model, adapter_dir=args.adapter, method=args.method)
    return 0


def _pseudo_label(args) -> int:
    from peft_tuner.distill import pseudo_label

    pseudo_label(config_for(args), args.out, adapter_dir=args.adapter, model_dir=args.model, rows=args.rows,
                 overwrite=args.overwrite)
    return 0


def _distill(args) -> int:
    from peft_tuner.config import ConfigError
    from peft_tuner.distill import distill

    recipes, overrides = recipes_and_overrides(args)
    if len(recipes) != 1:
        raise ConfigError(f"distill: give one recipe YAML (got {recipes or 'none'})")
    flags = {"teachers": args.teachers, "rows": args.rows, "student_epochs": args.student_epochs}
    overrides += [f"distill.{k}={v}" for k, v in flags.items() if v is not None]
    distill(recipes[0], args.out, overrides, processes=args.processes, overwrite=args.overwrite)
    return 0


def _convert_loralib(args) -> int:
    from peft_tuner.config import ConfigError
    from peft_tuner.convert import convert_loralib

    enable = None
    if args.enable_lora:
        words = [w.strip().lower() for w in args.enable_lora.split(",")]
        if not set(words) <= {"true", "false"}:
            raise ConfigError(f"--enable-lora {args.enable_lora}: write it as true/false per chunk, e.g. true,false,true")
        enable = [w == "true" for w in words]
    result = convert_loralib(args.checkpoint, args.base, args.out, r=args.r, alpha=args.alpha, enable_lora=enable,
                             overwrite=args.overwrite)
    print(f"converted {result['layers']} loralib layer(s) of {args.checkpoint} into the peft adapter {result['out_dir']} "
          f"(r={result['peft_r']}, lora_alpha={result['peft_lora_alpha']}); use it with --adapter {result['out_dir']}")
    return 0


def _generate(args) -> int:
    from peft_tuner.evaluate import load_for_inference
    from peft_tuner.generate import generate, read_prompts

    cfg = config_for(args)
    prompts = read_prompts(args.prompt, args.prompt_file)
    model, tokenizer, _ = load_for_inference(cfg, args.model, args.adapter)
    for prompt, outputs in zip(prompts, generate(model, tokenizer, prompts, cfg, seed=args.seed)):
        print(json.dumps({"prompt": prompt, "outputs": outputs}, ensure_ascii=False))
    return 0
