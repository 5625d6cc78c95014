"""The `peft-tuner` command: every verb, and how its config is resolved.

    train | merge | evaluate | pseudo-label | distill | generate | export | convert-loralib | config | prepare-model |
    convert-gguf | make-chat-data | make-pairs | make-tiny-model | demo

A verb takes a recipe YAML (or, after training, the config saved beside --adapter / --model) and `section.key=value`
overrides; a user mistake (any PeftTunerError) prints one message and exits 2. The verbs' modules are imported only
when the verb runs, so `--help` is quick.
"""
from __future__ import annotations

import argparse
import os
import sys

from peft_tuner import verbs


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
    from peft_tuner.errors import PeftTunerError

    use_cpu_accelerator_if_no_gpu()  # before anything imports deepspeed: no GPU means its CPU accelerator, said plainly
    try:
        return int(args.run(args) or 0)
    except PeftTunerError as e:  # user mistakes get one clean message; anything else keeps its traceback
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2


def run_and_exit(argv: list[str] | None = None) -> None:
    """The console script and the launch/*.py scripts: main(), then the process ends (see distributed.exit_process)."""
    from peft_tuner.distributed import exit_process

    try:
        code = main(argv)
    except SystemExit as stop:  # a run stopped by a signal (143), argparse's usage errors (2)
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BrokenPipeError:  # `peft-tuner config | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    exit_process(code)


# ----------------------------------------------------------------------------------------------------------------------
# The verbs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-tuner", description="Parameter-efficient fine-tuning of causal LMs "
                                     "under DeepSpeed ZeRO, from any launcher.")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("train", help="fine-tune under DeepSpeed (any launcher) and save the adapter")
    p.add_argument("recipe", help="recipe YAML, e.g. configs/twitter_complaints_lora.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=1")
    p.add_argument("--deepspeed", help="DeepSpeed JSON config (ds_configs/zero2.json, zero3.json, ...)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    p.set_defaults(run=verbs.train)

    p = sub.add_parser("merge", help="merge an adapter into its base model; verify; save a standalone folder")
    _add_items(p)
    p.add_argument("--adapter", required=True, help="adapter folder written by training (output_dir/adapter)")
    p.add_argument("--out", required=True, help="folder for the merged model (must be empty unless --overwrite)")
    p.add_argument("--base", help="base model (hub id, folder, .gguf); default: the one the adapter was trained on")
    p.add_argument("--dtype", default="fp32", help="dtype of the saved merged weights: fp32, bf16 or fp16")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=verbs.merge)

    p = sub.add_parser("evaluate", help="batch evaluation: rank classification or generation; metrics and predictions")
    _add_items(p)
    _add_model_flags(p, ensemble=True)
    p.add_argument("--split", default="eval", choices=["eval", "test"], help="data.eval_file or data.test_file")
    p.add_argument("--method", choices=["rank", "generate"], help="default: eval.method")
    p.add_argument("--out", help="where predictions and metrics go (default: output_dir/eval)")
    p.set_defaults(run=verbs.evaluate)

    p = sub.add_parser("pseudo-label", help="label data.test_file's rows with adapters (an ensemble, say) and write "
                       "them with the training rows to one CSV, for training a student adapter on")
    _add_items(p)
    _add_model_flags(p, ensemble=True)
    p.add_argument("--rows", type=int, help="label the first N rows of data.test_file (default: all)")
    p.add_argument("--out", required=True, help="the CSV to write (training rows, then the labelled rows)")
    p.add_argument("--overwrite", action="store_true", help="replace --out and its _scores.jsonl if they exist")
    p.set_defaults(run=verbs.pseudo_label)

    p = sub.add_parser("distill", help="the distillation recipe in one command: teachers (seeds 1..N), their "
                       "ensemble's labels for unlabelled rows, one student adapter; each evaluated")
    p.add_argument("items", nargs="*", help="RECIPE.yaml [section.key=value ...]")
    p.add_argument("--out", required=True, help="folder for the teachers, the labels and the student; a second call "
                   "with the same settings continues there")
    p.add_argument("--teachers", type=int, help="how many teachers, seeds 1..N (default: distill.teachers, 3)")
    p.add_argument("--rows", type=int, help="label the first N rows of data.test_file (default: distill.rows, 400)")
    p.add_argument("--student-epochs", type=int, help="the student's epochs (default: distill.student_epochs, 3)")
    p.add_argument("--parallel", type=int, help="teachers trained at once (default: distill.parallel, 1)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "auto"], help="the weights' dtype of the teachers and "
                   "the student; auto: bf16 where this machine computes it natively (default: distill.dtype, else "
                   "model.dtype)")
    p.add_argument("--processes", type=int, default=1, help="1: one plain process; N > 1: DeepSpeed ZeRO-2 on N "
                   "GPUs, or N CPU processes")
    p.add_argument("--overwrite", action="store_true", help="replace a distillation with other settings in --out "
                   "(finished teachers of the same recipe are kept)")
    p.set_defaults(run=verbs.distill)

    p = sub.add_parser("generate", help="generate text: greedy, beam, sampling, top-k/top-p")
    _add_items(p, example="generate.num_beams=4")
    _add_model_flags(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--chat", action="append", default=[], help="a question, sent as a user turn through the chat "
                   "template (data.chat_template, else the tokenizer's own); the answer stops at the end of the turn "
                   "(repeatable)")
    p.add_argument("--system", help="with --chat: a system message before each question")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=verbs.generate)

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
    p.set_defaults(run=verbs.convert_loralib)

    p = sub.add_parser("export", help="write GGUF files for llama.cpp and Ollama (with a Modelfile), the adapter alone "
                       "as a GGUF LoRA, and the vLLM command, from an adapter or a merged folder")
    _add_items(p, example="model.name_or_path=BASE")
    _add_model_flags(p)
    p.add_argument("--out", required=True, help="folder for the files (must be empty unless --overwrite)")
    p.add_argument("--dtype", action="append", help="f16 (default), bf16, q8_0 or f32; repeat for several files")
    p.add_argument("--lora", action="store_true", help="also the adapter alone as a GGUF LoRA (llama.cpp --lora)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=verbs.export)

    p = sub.add_parser("config", help="list every config key with its type, default and help (of one section)")
    p.add_argument("section", nargs="?", help="model, data, peft, train, eval, generate, distill (default: all)")
    p.add_argument("--markdown", action="store_true", help="all keys as the Markdown page docs/configuration.md")
    p.set_defaults(run=verbs.config)

    p = sub.add_parser("prepare-model", help="download and convert the embedded default model (SmolLM2-135M-Instruct)")
    p.add_argument("name", nargs="?", default="smollm2", help="smollm2")
    p.add_argument("--cache-dir", help="where converted models live (default: $PEFT_TUNER_CACHE/models or "
                   "~/.cache/peft_tuner/models)")
    p.set_defaults(run=verbs.prepare_model)

    p = sub.add_parser("convert-gguf", help="convert a GGUF file into a plain safetensors model folder")
    p.add_argument("gguf_file")
    p.add_argument("out_dir")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=verbs.convert_gguf)

    p = sub.add_parser("make-chat-data", help="build the small instruction set of the chat recipe from the data at "
                       "hand (twitter_complaints and ChnSentiCorp questions, WikiText-2 continuations)")
    p.add_argument("out_dir", help="folder for train.jsonl and eval.jsonl, e.g. outputs/chat_data")
    p.add_argument("--data", help="the folder holding raft/, chnsenticorp/ and wikitext-2/ (default: the data root, "
                   "$PEFT_TUNER_DATA or ../shared/data beside the checkout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace files there that differ")
    p.set_defaults(run=verbs.make_chat_data)

    p = sub.add_parser("make-pairs", help="preference pairs from a chat set and a model's answers to it: the "
                       "reference answer chosen, the model's own (evaluate's predictions) rejected where they differ")
    p.add_argument("chat_file", help="the chat set, e.g. outputs/chat_data/train.jsonl")
    p.add_argument("predictions", help="peft-tuner evaluate's predictions_eval.jsonl over that file")
    p.add_argument("out_file", help="the pairs, e.g. outputs/chat_data/pairs_train.jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace the file if it is there with other content")
    p.set_defaults(run=verbs.make_pairs)

    p = sub.add_parser("make-tiny-model", help="write a tiny random model with a local tokenizer (for trying things out)")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="llama", help="gpt2, bloom, opt or llama")
    p.set_defaults(run=verbs.make_tiny)

    p = sub.add_parser("demo", help="the main job end to end: prepare, evaluate, train (DeepSpeed), predict, merge, report")
    p.add_argument("items", nargs="*", help="section.key=value overrides of the recipe")
    p.add_argument("--recipe", help="default: configs/twitter_complaints_smollm2.yaml")
    p.add_argument("--out", default="outputs/demo", help="the demo's folder (replaced on each run)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2 (a quick check)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--test-rows", type=int, help="predict only the first N test rows")
    p.set_defaults(run=verbs.demo)
    return parser


def _add_items(p, example: str = "train.epochs=1") -> None:
    p.add_argument("items", nargs="*", help=f"[RECIPE.yaml] [section.key=value ...], e.g. {example}")


def _add_model_flags(p, ensemble: bool = False) -> None:
    if ensemble:
        p.add_argument("--adapter", action="append", help="adapter folder, on the base model of its saved config; "
                       "repeat it to score several adapters (other seeds, say) as one ensemble")
    else:
        p.add_argument("--adapter", help="adapter folder, on the base model of its saved config")
    p.add_argument("--model", help="merged (standalone) model folder")
    p.add_argument("--base", help="base model instead of the configured one")


if __name__ == "__main__":
    run_and_exit()
