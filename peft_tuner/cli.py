"""`peft-tuner train | merge | evaluate | pseudo-label | distill | generate | prepare-model | convert-gguf | make-tiny-model | demo`.

Every verb takes a recipe YAML and `section.key=value` overrides; a user mistake prints one message and exits 2.
"""
from __future__ import annotations

import argparse
import os
import sys

USER_ERRORS = ("ConfigError", "DataError", "ModelError", "ResumeError", "MergeError", "PrepareError", "TrainingStopped")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    stray = [u for u in unknown if u.startswith("--local_rank") or u.startswith("--local-rank")]
    extra = [u for u in unknown if u not in stray and not u.startswith("-")]
    flags = [u for u in unknown if u not in stray and u.startswith("-")]
    if flags:
        parser.error(f"unknown option(s) {' '.join(flags)}; config values are given as section.key=value")
    args.overrides = list(getattr(args, "overrides", []) or []) + extra
    from peft_tuner.distributed import use_cpu_accelerator_if_no_gpu

    use_cpu_accelerator_if_no_gpu()  # before anything imports deepspeed: no GPU means its CPU accelerator, said plainly
    try:
        return int(args.run(args) or 0)
    except Exception as e:  # user mistakes get one clean message; anything else keeps its traceback
        if type(e).__name__ not in USER_ERRORS:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-tuner", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("train", help="fine-tune under DeepSpeed (any launcher) and save the adapter")
    p.add_argument("recipe", help="recipe YAML, e.g. configs/twitter_complaints_lora.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=1")
    p.add_argument("--deepspeed", help="DeepSpeed JSON config (ds_configs/zero2.json, zero3.json, ...)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    p.set_defaults(run=_train)

    p = sub.add_parser("make-tiny-model", help="write a tiny random model with a local tokenizer (for trying things out)")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="llama", help="gpt2, bloom, opt or llama")
    p.set_defaults(run=_make_tiny)
    _add_later_verbs(sub)
    return parser


def _add_later_verbs(sub) -> None:
    """Verbs whose modules import heavier pieces; registered here so `--help` lists them all."""
    from peft_tuner import cli_more

    cli_more.register(sub)


def _load(args):
    from peft_tuner.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "deepspeed", None):
        overrides.append(f"deepspeed={args.deepspeed}")
    return load_config(args.recipe, overrides)


def _train(args) -> int:
    from peft_tuner.trainer import train

    train(_load(args), resume=args.resume, overwrite=args.overwrite)
    return 0


def _make_tiny(args) -> int:
    from peft_tuner.tiny import build_tiny_model

    print(build_tiny_model(args.out_dir, args.arch))
    return 0


def run_and_exit(argv: list[str] | None = None) -> None:
    """The console script and the launch/*.py scripts: main(), then the process ends (see distributed.exit_process)."""
    from peft_tuner.distributed import exit_process

    try:
        code = main(argv)
    except SystemExit as stop:  # a run stopped by a signal (143), argparse's usage errors (2)
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    exit_process(code)


if __name__ == "__main__":
    run_and_exit()
