"""What share of the machine's peak do our training steps reach (model FLOPs utilization, MFU)?

Each case runs launch/train.py as a user would (one process; `--zero3`: torchrun and ds_configs/zero3.json) and reads
its steps' times and tokens from train_log.jsonl (the first two steps left out: warm-up). FLOPs per real token, as
MFU is usually counted: 2N forward and 2N backward through the frozen weights, N being the weights of the model's
linear layers and LM head (the embedding lookup does no multiply-adds), and 6 per trainable parameter; attention's
own products are left out. Our classification step computes the LM head only where a label is predicted, so the
table also gives the share counting that head at label tokens alone ("computed").

Peaks: a GPU's dense bf16 peak from its datasheet (a table by name, or --peak-tflops), and, on every machine, the rate
of large matrix products in the step's dtype measured in this process (the better of before and after the runs); on a
CPU only the measured one is given, so there MFU says how near the step comes to what this machine's BLAS reaches.

Models: smollm2 (the embedded SmolLM2-135M-Instruct), and Llama shapes with random weights built here, no download:
llama-1b (TinyLlama-1.1B's shape) and llama-8b (Llama-3-8B's shape), both with a 32,000-token BPE vocabulary
trained here on WikiText-2; `--layers N` keeps the width and cuts the depth (a quick trial of a shape on a CPU).
Workloads: twitter (the RAFT twitter_complaints training rows, padding-free micro-batches, as the default recipe
trains) and wikitext (WikiText-2 train.txt packed into blocks). LoRA r=16 (alpha 32) on every linear layer.

    OMP_NUM_THREADS=2 .venv/bin/python bench/step_mfu.py                   # CPU: SmolLM2, both workloads (minutes)
    python bench/step_mfu.py --models llama-1b --dtype bf16 --data DATA    # a GPU: DATA holds raft/ and wikitext-2/
    python bench/step_mfu.py --models llama-8b --dtype bf16 --zero3 --data DATA

Raw results: bench/results/step_mfu.jsonl; the table: docs/benchmarks.md between the step_mfu markers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from report_blocks import cpu_name, write_between_markers  # noqa: E402  (bench/ is the script's folder)
from peft_tuner.data.sources import data_root  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "step_mfu.jsonl"
MARKERS = ("<!-- step_mfu: begin (written by bench/step_mfu.py) -->", "<!-- step_mfu: end -->")
TITLE = "Model FLOPs utilization of the training step"
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
VOCAB = 32000
VOCAB_OF = {"tiny": 1000}  # a dry run's shape: a small vocabulary, trained in a second
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' datasheets (SXM parts).
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}


# ----------------------------------------------------------------------------------------------------------------------
# Models


def model_folder(name: str, layers: int | None, data: Path, dtype: str) -> Path:
    """The model's from_pretrained folder: the prepared SmolLM2, or a random Llama shape built once into /tmp."""
    if name == "smollm2":
        from peft_tuner.prepare import prepare_model

        return prepare_model("smollm2")
    shape = dict(SHAPES[name], **({"num_hidden_layers": layers} if layers else {}))
    folder = Path("/tmp") / f"peft_tuner_bench_{name}_{shape['num_hidden_layers']}layers_{dtype}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from peft_tuner.modeling import DTYPES
    from peft_tuner.tiny import build_tokenizer

    # A byte-level BPE of VOCAB tokens trained on WikiText-2 and the twitter rows, as the tiny models' is on a few lines.
    tokenizer = build_tokenizer(VOCAB_OF.get(name, VOCAB),
                                [data / "wikitext-2" / "train.txt", data / "raft" / "twitter_complaints" / "train.csv"])
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def linear_weights(folder: Path) -> tuple[int, int]:
    """(weights of every linear layer, the LM head included; the LM head's), counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return linear, model.get_output_embeddings().weight.numel()


# ----------------------------------------------------------------------------------------------------------------------
# Peaks


def measured_matmul_tflops(dtype: str) -> float:
    """Best of 5 timed products of two square matrices (4096 on a GPU, 2048 on a CPU) in `dtype`, after a warm-up."""
    import torch

    from peft_tuner.modeling import DTYPES

    gpu = torch.cuda.is_available()
    n, kind, reps = (4096, "cuda", 10) if gpu else (2048, "cpu", 1)
    a = torch.randn(n, n, device=kind, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=kind, dtype=a.dtype)
    seconds = []
    for _ in range(6):
        if gpu:
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(reps):
            a @ b
        if gpu:
            torch.cuda.synchronize()
        seconds.append((time.perf_counter() - began) / reps)
    return 2 * n**3 / min(seconds[1:]) / 1e12  # the first is the warm-up


def datasheet_tflops() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return cpu_name(), None
    name = torch.cuda.get_device_name()
    return name, next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------------------------------------------------
# One run of ours


def overrides_for(workload: str, folder: Path, data: Path, args, batch: int, out: Path) -> tuple[str, list[str]]:
    """(recipe, overrides): LoRA r=16 on every linear layer, padding-free, no evaluation or adapter check."""
    steps = args.steps + 2
    common = [f"model.name_or_path={folder}", f"model.dtype={args.dtype}", "peft.method=lora", "peft.target_modules=all-linear",
              "peft.r=16", "peft.alpha=32", "peft.dropout=0.05", "train.padding_free=true", f"train.batch_size={batch}",
              f"train.packed_attention={args.packed_attention}", f"train.compile={str(args.compile).lower()}",
              f"train.liger_kernels={str(args.liger).lower()}", f"model.quantization={args.quantization}",
              f"train.verify_adapter={str(args.verify).lower()}", "data.cache=false", f"output_dir={out}", "--overwrite"]
    if workload == "twitter":
        rows = 50
        epochs = math.ceil(steps / math.ceil(rows / batch))
        raft = data / "raft" / "twitter_complaints"
        return "configs/twitter_complaints_smollm2.yaml", common + [
            f"data.train_file={raft}", f"data.eval_file={raft / 'dev.csv'}", f"data.test_file={raft}", f"train.epochs={epochs}"]
    lines = text_lines_for(folder, data / "wikitext-2" / "train.txt", args.block, steps * batch)
    return "configs/wikitext2_lora.yaml", common + [
        f"data.train_file={data / 'wikitext-2' / 'train.txt'}", f"data.eval_file={data / 'wikitext-2' / 'valid.txt'}",
        f"data.max_length={args.block}", f"data.max_rows={lines}",
        "train.epochs=1", "train.warmup_ratio=0"]


def text_lines_for(folder: Path, path: Path, block: int, blocks: int) -> int:
    """The fewest first lines of `path` that pack into `blocks` blocks of `block` tokens (as the trainer packs them)."""
    from transformers import AutoTokenizer

    from peft_tuner.data.formats import pack_text

    tokenizer = AutoTokenizer.from_pretrained(folder)
    lines = path.read_text(encoding="utf-8").splitlines()
    n = 64
    while len(pack_text(tokenizer, lines[:n], block)) < blocks:
        if n >= len(lines):
            raise SystemExit(f"{path}: fewer than {blocks} blocks of {block} tokens")
        n = min(2 * n, len(lines))
    return n


def run_ours(model: str, workload: str, args, batch: int, work: Path) -> dict:
    data = Path(args.data).resolve()
    folder = model_folder(model, args.layers, data, args.dtype)
    out = work / f"{model}-{workload}"
    recipe, overrides = overrides_for(workload, folder, data, args, batch, out)
    script = [str(ROOT / "launch" / "train.py"), str(ROOT / recipe), *overrides]
    if args.zero3:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, "--standalone", "--nproc-per-node", "1", *script, "--deepspeed", str(ROOT / "ds_configs" / "zero3.json")]
    else:
        cmd = [sys.executable, *script]
    began = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:  # the run's own last words: a refusal, or the error that stopped it
        raise SystemExit((proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    start = next(r for r in log if r["event"] == "start")
    all_steps = [r for r in log if r["event"] == "step"]
    steps = all_steps[2:]
    summary = json.loads((out / "summary.json").read_text())
    if not steps:
        raise SystemExit(f"{out}: fewer than 3 steps logged")
    linear, head = linear_weights(folder)
    trainable = start["trainable_params"]
    seconds = sum(r["step_seconds"] for r in steps)
    tokens = sum(r["tokens"] for r in steps)
    label_tokens = sum(r["label_tokens"] for r in steps)
    model_flops = tokens * (4 * linear + 6 * trainable)  # the usual count: every token through every linear layer
    computed_flops = tokens * (4 * (linear - head) + 6 * trainable) + label_tokens * 4 * head
    return {"model": model, "layers": args.layers, "workload": workload, "dtype": args.dtype, "zero3": args.zero3,
            "packed_attention": start.get("packed_attention"), "compiled": bool(start.get("compiled")), "batch": batch,
            "block": args.block if workload == "wikitext" else None,
            "linear_weights": linear, "head_weights": head, "trainable": trainable, "steps": len(steps),
            "tokens_per_step": tokens / len(steps), "label_tokens_per_step": label_tokens / len(steps),
            "median_step_seconds": statistics.median(r["step_seconds"] for r in steps), "tokens_per_second": tokens / seconds,
            "model_tflops": model_flops / seconds / 1e12, "computed_tflops": computed_flops / seconds / 1e12,
            "peak_memory_gb": max(r["peak_memory_gb"] for r in steps), "wall_seconds": round(time.time() - began, 1),
            "liger": args.liger, "quantization": args.quantization, "losses": [r["loss"] for r in all_steps],
            "adapter_dtype": start.get("adapter_dtype"), "adapter_max_logit_diff": summary.get("adapter_max_logit_diff")}


# ----------------------------------------------------------------------------------------------------------------------
# The report


def main(argv=None) -> int:
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2"], choices=["smollm2", *SHAPES])
    parser.add_argument("--workloads", nargs="+", default=["twitter", "wikitext"], choices=["twitter", "wikitext"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--layers", type=int, help="keep the width, use N decoder layers (random shapes only)")
    parser.add_argument("--batch", type=int, help="rows (twitter) or blocks (wikitext) per step; default 4 on a CPU, 32 / 8 on a GPU")
    parser.add_argument("--block", type=int, help="wikitext block length; default 128 on a CPU, 1024 on a GPU")
    parser.add_argument("--steps", type=int, default=10, help="steps measured (2 more run first)")
    parser.add_argument("--zero3", action="store_true", help="torchrun, 1 process, ds_configs/zero3.json")
    parser.add_argument("--compile", action="store_true", help="train.compile=true (the steps measured come after the compiling ones)")
    parser.add_argument("--packed-attention", default="rows", choices=["rows", "mask"],
                        help="train.packed_attention: each row on its own (row by row on a CPU, flash varlen on a GPU) or "
                             "SDPA under a block-diagonal mask")
    parser.add_argument("--peak-tflops", type=float, help="the accelerator's dense peak in the step's dtype, if not in the table")
    parser.add_argument("--liger", action="store_true", help="train.liger_kernels=true (a CUDA GPU with liger-kernel)")
    parser.add_argument("--quantization", default="none", choices=["none", "nf4", "int8"], help="model.quantization")
    parser.add_argument("--verify", action="store_true", help="train.verify_adapter=true: the adapter saved, reloaded, compared")
    parser.add_argument("--results", default=str(RESULTS), help="the JSONL the results are appended to")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--data", default=str(data_root()), help="folder holding raft/ and wikitext-2/")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if args.layers and "smollm2" in args.models:
        parser.error("--layers: for the random Llama shapes only")
    block_default, batch_default = (1024, {"twitter": 32, "wikitext": 8}) if gpu else (128, {"twitter": 4, "wikitext": 4})
    args.block = args.block or block_default

    machine, datasheet = datasheet_tflops()
    if args.peak_tflops:
        datasheet = args.peak_tflops
    before = measured_matmul_tflops(args.dtype)
    print(f"{machine}: matrix products in {args.dtype} at {before:.3f} TFLOP/s; datasheet peak {datasheet or '-'}", flush=True)
    run_id = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}"
    results = []
    with tempfile.TemporaryDirectory(prefix="step_mfu-") as work:
        for model in args.models:
            for workload in args.workloads:
                r = run_ours(model, workload, args, args.batch or batch_default[workload], Path(work))
                r.update(run=run_id, machine=machine, threads=torch.get_num_threads(), torch=torch.__version__,
                         datasheet_tflops=datasheet, command=" ".join(["python bench/step_mfu.py", *(argv or sys.argv[1:])]))
                results.append(r)
                print(json.dumps(r), flush=True)
    # The machine's rate moves between minutes (a shared host): the better of the products measured before and after.
    matmul = max(before, measured_matmul_tflops(args.dtype))
    for r in results:
        r["matmul_tflops"] = matmul
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    if not args.no_write:
        write_report()
    return 0


def write_report() -> None:
    """The table: the newest stored run of each machine and case, with the command that measured it."""
    records = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    latest: dict[tuple, dict] = {}
    for r in records:
        latest[(r["machine"], r["model"], r["layers"], r["workload"], r["dtype"], r["zero3"], r["batch"], r.get("block"),
                r.get("packed_attention"), r.get("compiled", False), r.get("liger", False), r.get("quantization", "none"))] = r
    lines = ["Each row: the command that measured it, on the machine it names (threads: the CPU threads torch used). "
             "MFU = real tokens/s x FLOPs per token / peak; \"computed\" counts the LM head at label tokens only.", "",
             "| run | command | machine | model | workload | dtype | attention | tokens / step | s / step | real tokens/s | "
             "TFLOP/s (usual count) | matrix products TFLOP/s | MFU vs matrix products | computed | datasheet MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(latest.values(), key=lambda r: (r["run"], r["model"], r["workload"])):
        model = (r["model"] + (f" ({r['layers']} layers)" if r["layers"] else "") + (", ZeRO-3" if r["zero3"] else "")
                 + (", compiled" if r.get("compiled") else "") + (", Liger" if r.get("liger") else "")
                 + (f", {r['quantization']}" if r.get("quantization", "none") != "none" else ""))
        workload = r["workload"] + (f" ({r['batch']} blocks of {r['block']})" if r["block"] else f" ({r['batch']} rows)")
        sheet = f"{r['model_tflops'] / r['datasheet_tflops']:.1%}" if r["datasheet_tflops"] else "-"
        lines.append(f"| {r['run']} | `{r['command']}` | {r['machine']}, {r['threads']} threads, torch {r['torch']} | {model} | "
                     f"{workload} | {r['dtype']} | {r.get('packed_attention') or '-'} | {r['tokens_per_step']:.0f} | {r['median_step_seconds']:.3f} | "
                     f"{r['tokens_per_second']:.0f} | {r['model_tflops']:.4f} | {r['matmul_tflops']:.3f} | "
                     f"{r['model_tflops'] / r['matmul_tflops']:.1%} | {r['computed_tflops'] / r['matmul_tflops']:.1%} | {sheet} |")
    write_between_markers("\n".join(lines), MARKERS, title=TITLE)


if __name__ == "__main__":
    sys.exit(main())
