"""What each `peft-tuner` verb runs, and how its config is resolved: the recipe named, or the config saved beside
--adapter / --model, with `section.key=value` overrides on top. Each verb's work is a plain function in a module of
its own, imported when the verb runs."""
from __future__ import annotations

import json
from pathlib import Path


def recipe_and_overrides(args) -> tuple[list[str], list[str]]:
    """The recipe YAMLs named (train's first argument, or items ending in .yaml) and the section.key=value overrides,
    --deepspeed, --base and --method included."""
    items = list(getattr(args, "items", []) or []) + list(getattr(args, "overrides", []) or [])
    recipes = [i for i in items if i.endswith((".yaml", ".yml")) and "=" not in i]
    overrides = [i for i in items if i not in recipes]
    if getattr(args, "recipe", None):
        recipes.insert(0, args.recipe)
    if getattr(args, "deepspeed", None):
        overrides.append(f"deepspeed={args.deepspeed}")
    if getattr(args, "base", None):
        overrides.append(f"model.name_or_path={args.base}")
    if getattr(args, "method", None):
        overrides.append(f"eval.method={args.method}")
    return recipes, overrides


def resolve_config(args, problems: list[str] | None = None):
    """The recipe if one is given, else the config saved beside --adapter / --model; the overrides on top. With a
    `problems` list, the config's problems are added to it instead of raised (train reports them with the rest)."""
    import yaml

    from peft_tuner.checkpoint import ADAPTER_CONFIG_FILE
    from peft_tuner.config import ConfigError, load_config

    recipes, overrides = recipe_and_overrides(args)
    if len(recipes) > 1:
        raise ConfigError(f"give one recipe, not {recipes}")
    if recipes:
        return load_config(recipes[0], overrides, problems=problems)
    adapter = getattr(args, "adapter", None)
    saved_dir = (adapter[0] if isinstance(adapter, list) else adapter) or getattr(args, "model", None)
    if not saved_dir:
        raise ConfigError("no recipe given; pass RECIPE.yaml (or --adapter / --model of a trained run)")
    saved = Path(saved_dir)
    if (saved / ADAPTER_CONFIG_FILE).is_file():  # written by peft-tuner train
        return load_config(None, overrides, base=yaml.safe_load((saved / ADAPTER_CONFIG_FILE).read_text()), problems=problems)
    base_model = None
    if (saved / "adapter_config.json").is_file():  # a peft adapter trained elsewhere names its base model
        base_model = json.loads((saved / "adapter_config.json").read_text()).get("base_model_name_or_path")
    elif (saved / "config.json").is_file():  # a merged or standalone model is its own base
        base_model = str(saved)
    if not base_model:
        raise ConfigError(f"no recipe given, and {saved} holds neither {ADAPTER_CONFIG_FILE} (peft-tuner train writes it) "
                          f"nor a peft adapter_config.json naming its base model; pass RECIPE.yaml")
    return load_config(None, overrides, base={"model": {"name_or_path": base_model}}, problems=problems)


# ----------------------------------------------------------------------------------------------------------------------
# What each verb runs


def train(args) -> int:
    from peft_tuner.trainer import train

    problems: list[str] = []  # the config's, reported with every other problem the preflight finds
    cfg = resolve_config(args, problems)
    train(cfg, resume=args.resume, overwrite=args.overwrite, problems=problems)
    return 0


def merge(args) -> int:
    from peft_tuner.merge import merge

    cfg = resolve_config(args)
    result = merge(cfg, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite,
                   max_shard_size=args.max_shard_size)
    print(f"merged {args.adapter} into {result['out_dir']} ({result['parameters']:,} parameters, {result['dtype']}); "
          f"largest |logit| difference to base+adapter: {result['max_logit_diff']:.2e}")
    if "quantized_max_logit_diff" in result:
        print(f"the adapter was trained on a {cfg.model.quantization} base; merged into the full-precision base instead "
              f"(not into dequantized weights): largest |logit| difference to the quantized model it was trained on "
              f"{result['quantized_max_logit_diff']:.2e}")
    return 0


def evaluate(args) -> int:
    from peft_tuner.evaluate import evaluate

    cfg = resolve_config(args)
    out = args.out or str(Path(cfg.output_dir) / "eval")
    evaluate(cfg, out, split=args.split, model_dir=args.model, adapter_dir=args.adapter, method=args.method)
    return 0


def pseudo_label(args) -> int:
    from peft_tuner.distill import pseudo_label

    pseudo_label(resolve_config(args), args.out, adapter_dir=args.adapter, model_dir=args.model, rows=args.rows,
                 overwrite=args.overwrite)
    return 0


def distill(args) -> int:
    from peft_tuner.config import ConfigError
    from peft_tuner.distill import distill

    recipes, overrides = recipe_and_overrides(args)
    if len(recipes) != 1:
        raise ConfigError(f"distill: give one recipe YAML (got {recipes or 'none'})")
    flags = {"teachers": args.teachers, "rows": args.rows, "student_epochs": args.student_epochs, "parallel": args.parallel,
             "dtype": args.dtype}
    overrides += [f"distill.{k}={v}" for k, v in flags.items() if v is not None]
    distill(recipes[0], args.out, overrides, processes=args.processes, overwrite=args.overwrite)
    return 0


def generate(args) -> int:
    from peft_tuner.modeling import load_for_inference
    from peft_tuner.generate import chat_prompts, generate, read_prompts

    from peft_tuner.config import ConfigError

    cfg = resolve_config(args)
    if args.system and not args.chat:
        raise ConfigError("--system: goes with --chat QUESTION (a system message before each question)")
    if args.chat and (args.prompt or args.prompt_file):
        raise ConfigError("--chat: give questions with --chat, or plain prompts with --prompt / --prompt-file, not both")
    prompts = args.chat or read_prompts(args.prompt, args.prompt_file)
    model, tokenizer, _ = load_for_inference(cfg, args.model, args.adapter)
    encoded, stops = chat_prompts(tokenizer, prompts, cfg, args.system) if args.chat else (None, None)
    for prompt, outputs in zip(prompts, generate(model, tokenizer, prompts, cfg, args.seed, encoded, stops)):
        print(json.dumps({"chat" if args.chat else "prompt": prompt, "outputs": outputs}, ensure_ascii=False))
    return 0


def convert_loralib(args) -> int:
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


def export(args) -> int:
    from peft_tuner.export import export

    report = export(resolve_config(args), args.out, adapter_dir=args.adapter, model_dir=args.model,
                    dtypes=tuple(args.dtype or ["f16"]), lora=args.lora, overwrite=args.overwrite)
    print(f"export | {len(report['files'])} GGUF file(s) in {args.out} | {report['seconds']} s | report: "
          f"{Path(args.out) / 'export_report.json'}")
    return 0


def config(args) -> int:
    from peft_tuner.config import describe, describe_markdown

    print(describe_markdown() if args.markdown else describe(args.section), end="\n" if not args.markdown else "")
    return 0


def prepare_model(args) -> int:
    from peft_tuner.prepare import prepare_model

    print(prepare_model(args.name, args.cache_dir))
    return 0


def convert_gguf(args) -> int:
    from peft_tuner.prepare import convert_gguf

    print(convert_gguf(args.gguf_file, args.out_dir, overwrite=args.overwrite))
    return 0


def make_chat_data(args) -> int:
    from peft_tuner.chat_data import build_chat_set

    from peft_tuner.data.sources import data_root

    counts = build_chat_set(args.data or data_root(), args.out_dir, seed=args.seed, overwrite=args.overwrite)
    for split, by_source in counts.items():
        print(f"{Path(args.out_dir) / (split + '.jsonl')}: {sum(by_source.values())} conversations "
              f"({', '.join(f'{n} {source}' for source, n in by_source.items())})")
    return 0


def make_pairs(args) -> int:
    from peft_tuner.chat_data import build_pairs

    counts = build_pairs(args.chat_file, args.predictions, args.out_file, overwrite=args.overwrite)
    print(f"{args.out_file}: {counts['pairs']} pairs of {counts['rows']} rows ({counts['same_answer']} where the "
          f"model already gives the reference answer)")
    return 0


def make_tiny(args) -> int:
    from peft_tuner.tiny import build_tiny_model

    print(build_tiny_model(args.out_dir, args.arch))
    return 0


def demo(args) -> int:
    from peft_tuner.demo import DEFAULT_RECIPE, run_demo

    run_demo(args.recipe or DEFAULT_RECIPE, args.out, args.tiny, args.processes, list(args.items) + list(args.overrides),
             args.test_rows)
    return 0
