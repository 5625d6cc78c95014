"""Where does a GPU training step's time go, and which lever buys it back?

The training step of bench/step_mfu.py's WikiText-2 case, taken apart: a random Llama of TinyLlama-1.1B's shape in
bf16, LoRA r=16 (alpha 32, dropout 0.05) on every linear layer, a padding-free batch of 16 blocks of 1024 tokens,
attention and loss as the trainer runs them (modeling.attend_row_by_row, trainer.token_loss_sum), fused AdamW. No
DeepSpeed engine and no data loading. The LoRA weights stay as peft makes them over a bf16 base, fp32 (its
autocast_adapter_dtype default), so each adapter casts its input to fp32 and back; the trainer's DeepSpeed engine in
bf16 casts them to bf16 instead, so its step (bench/step_mfu.py) is not this one. One variant a process (a compile
cannot then slow the others), each printing one JSON line, appended to bench/results/gpu_step_anatomy.jsonl:

    python bench/gpu_step_anatomy.py --variant as-trained      # the step as described above
    python bench/gpu_step_anatomy.py --variant profile         # the same under torch.profiler: the top kernels
    python bench/gpu_step_anatomy.py --variant no-dropout      # LoRA dropout 0 (peft then skips the dropout)
    python bench/gpu_step_anatomy.py --variant no-lora         # the frozen base alone, gradients to the inputs
    python bench/gpu_step_anatomy.py --variant compiled        # torch.compile of the LoRA model

FLOPs per token as bench/step_mfu.py counts them (4 x linear weights + 6 x trainable). `--layers` and `--hidden`
shrink the shape for a trial on a CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4)
VOCAB = 32000
VARIANTS = ["as-trained", "profile", "no-dropout", "no-lora", "compiled"]
RESULTS = ROOT / "bench" / "results" / "gpu_step_anatomy.jsonl"


def build(args, device):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_tuner.modeling import attend_row_by_row, contiguous_head_inputs

    shape = dict(SHAPE, **({"num_hidden_layers": args.layers} if args.layers else {}))
    if args.hidden:
        shape.update(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, attn_implementation="sdpa", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    contiguous_head_inputs(model)
    if args.variant == "no-lora":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # the backward still runs through every layer, as under LoRA
    else:
        dropout = 0.0 if args.variant == "no-dropout" else 0.05
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    assert attend_row_by_row(model)
    model.train()
    return model


def main(argv=None) -> int:
    import torch

    from peft_tuner.data import collate_padding_free
    from peft_tuner.trainer import token_loss_sum

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True, choices=VARIANTS)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    began = time.time()
    model = build(args, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True) if trainable else None
    forward = torch.compile(model) if args.variant == "compiled" else model
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, VOCAB, (args.block,), generator=generator).tolist()} for _ in range(args.blocks)]
    for r in rows:
        r["labels"] = list(r["input_ids"])
    batch = collate_padding_free(rows)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        loss = token_loss_sum(forward, batch, True, torch.device(device))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    sync()
    warm = time.time() - began
    times = []
    profile_table = None
    if args.variant == "profile":
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                t = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - t)
        sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        profile_table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
    else:
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in name)  # the base's layers and LM head
    trainable_count = sum(p.numel() for p in trainable)
    tokens = args.blocks * args.block
    seconds = statistics.median(times)
    tflops = tokens * (4 * linear + 6 * trainable_count) / seconds / 1e12
    result = {"variant": args.variant, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "tokens_per_step": tokens, "median_step_seconds": round(seconds, 4),
              "tokens_per_second": round(tokens / seconds), "model_tflops": round(tflops, 2),
              "linear_weights": linear, "trainable": trainable_count, "setup_and_warmup_seconds": round(warm, 1),
              "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None}
    print(json.dumps(result), flush=True)
    result.update(date=f"{datetime.date.today()}", command=" ".join(["python bench/gpu_step_anatomy.py", *(argv or sys.argv[1:])]))
    with open(RESULTS, "a") as f:
        f.write(json.dumps(result) + "\n")
    if profile_table:
        print(profile_table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
