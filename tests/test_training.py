"""The training loop's arithmetic, in one process through the DeepSpeed engine: gradient accumulation changes nothing
but the memory, AdaLoRA trains under the ZeRO stages it fits, and one short run per model family gives the loss it
gave when it was pinned, so that a silent change in the loss (masking, EOS, shifting, normalisation) is caught."""
from __future__ import annotations

import json
import sys

import pytest

import torch
import torch.nn.functional as F

from conftest import ds_config, records, run, step_losses, write_recipe

RUNS = """
import json, sys
from peft_tuner import distributed
from peft_tuner.config import load_config
from peft_tuner.trainer import train

distributed.shutdown = lambda: None  # the runs share one process group of one (DeepSpeed keeps the first it sees)
for name, recipe, overrides in json.loads(sys.argv[1]):
    summary = train(load_config(recipe, overrides))
    print("RESULT", json.dumps({"name": name, "zero_stage": summary["zero_stage"],
                                "adapter_max_logit_diff": summary["adapter_max_logit_diff"]}), flush=True)
"""

# First and last step loss of `train.epochs=2` on the 16 toy rows (batch 4, lr 5e-2, LoRA r=4, seed 7, fp32), with no
# CPU-only setting (train.cpu_tuning=off: GPT-2's base dropout draws torch's own masks), pinned from a run of this
# suite. A change in how the loss is computed moves them far beyond the tolerance.
PINNED = {
    "gpt2": (5.799272, 5.467144),
    "bloom": (5.695249, 5.290693),
    "opt": (5.794354, 5.448008),
    "llama": (5.780675, 5.594429),
}


@pytest.fixture(scope="module")
def runs(tiny_models, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    plan = []
    for micro, accumulation in ((8, 1), (4, 2), (2, 4)):
        plan.append((f"accumulate{micro}x{accumulation}", tiny_models["llama"],
                     [f"train.batch_size={micro}", f"train.gradient_accumulation={accumulation}", "train.epochs=3"]))
    plan.append(("padding-free8x1", tiny_models["llama"], ["train.batch_size=8", "train.epochs=3", "train.padding_free=true"]))
    plan.append(("autocast-bf16", tiny_models["llama"], ["train.batch_size=8", "train.epochs=3", "train.autocast=bf16"]))
    plan.append(("weights-bf16", tiny_models["llama"], ["train.batch_size=8", "train.epochs=3", "model.dtype=bf16"]))
    plan.append(("adalora", tiny_models["llama"],
                 ["peft.method=adalora", "peft.r=4", "train.epochs=4", f"deepspeed={ds_config('zero0.json')}"]))
    for arch in PINNED:
        plan.append((f"pinned-{arch}", tiny_models[arch], ["train.epochs=2", "train.cpu_tuning=off"]))
    plan.append(("compiled8x1", tiny_models["llama"], ["train.batch_size=8", "train.epochs=3", "train.compile=true"]))
    args = []
    for name, model, overrides in plan:
        recipe = write_recipe(root / f"{name}.yaml", model, data_dir / "raft", root / name)
        args.append((name, str(recipe), overrides))
    proc = run([sys.executable, "-c", RUNS, json.dumps(args)], timeout=500)
    results = {r["name"]: r for r in (json.loads(l.split(" ", 1)[1]) for l in proc.stdout.splitlines()
                                      if l.startswith("RESULT"))}
    assert list(results) == [name for name, _, _ in plan], proc.stdout[-3000:]
    return root, results


@pytest.mark.slow
def test_gradient_accumulation_gives_the_losses_of_one_large_batch(runs):
    """Batch 8 in one micro-batch, 2 x 4 or 4 x 2: the loss is normalised by the tokens of the whole optimizer step,
    so every step's loss (and the weights it leads to) is the same."""
    root, _ = runs
    one, two, four = (step_losses(root / name) for name in ("accumulate8x1", "accumulate4x2", "accumulate2x4"))
    assert len(one) == 6 and len(two) == len(four) == len(one)
    assert one[-1] < one[0]
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    assert max(abs(a - b) for a, b in zip(one, four)) < 1e-5, (one, four)


@pytest.mark.slow
def test_a_compiled_model_trains_as_the_eager_one_and_its_adapter_reloads(runs):
    """train.compile=true: the same steps' losses as the eager run, and the saved adapter (names unchanged by the
    in-place compile) reproduces the engine's logits."""
    root, results = runs
    eager, compiled = step_losses(root / "accumulate8x1"), step_losses(root / "compiled8x1")
    assert len(compiled) == len(eager) == 6
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-5, (eager, compiled)
    assert next(r for r in records(root / "compiled8x1") if r["event"] == "start")["compiled"] is True
    assert results["compiled8x1"]["adapter_max_logit_diff"] < 1e-4, results["compiled8x1"]


@pytest.mark.slow
def test_adalora_trains_through_the_engine_and_reloads(runs):
    """AdaLoRA reads param.grad to prune its ranks: it runs under ZeRO-0 (ZeRO-1 and up keep the gradients in their
    own buffers: refused, see test_errors)."""
    root, results = runs
    losses = step_losses(root / "adalora")
    assert results["adalora"]["zero_stage"] == 0 and losses[-1] < losses[0]
    assert results["adalora"]["adapter_max_logit_diff"] < 1e-4
    config = json.loads((root / "adalora" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["target_r"] == 4


@pytest.mark.slow
def test_bf16_weights_train_and_the_saved_adapter_reproduces_the_engine(runs):
    """model.dtype=bf16: the engine computes its adapter in bf16 and peft reloads adapters in fp32; the reload check
    gives the reloaded adapter the engine's dtypes, so it measures what was saved, not the rounding (which alone moves
    this model's logits by a few thousandths)."""
    root, results = runs
    losses = step_losses(root / "weights-bf16")
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert results["weights-bf16"]["adapter_max_logit_diff"] < 1e-3, results["weights-bf16"]


@pytest.mark.slow
def test_padding_free_training_gives_the_losses_of_padded_batches(runs):
    """The same rows per step as one sequence each, through the engine: every step's loss equals the padded run's."""
    root, _ = runs
    padded, flat = step_losses(root / "accumulate8x1"), step_losses(root / "padding-free8x1")
    assert len(flat) == len(padded) == 6
    assert max(abs(a - b) for a, b in zip(padded, flat)) < 1e-5, (padded, flat)
    counts = [[(r["tokens"], r["label_tokens"]) for r in records(root / run) if r.get("event") == "step"]
              for run in ("padding-free8x1", "accumulate8x1")]
    assert counts[0] == counts[1]  # real tokens and label tokens counted alike, padding left out
    assert all(0 < labels < tokens for tokens, labels in counts[0])
    starts = {run: next(r for r in records(root / run) if r["event"] == "start") for run in ("padding-free8x1", "accumulate8x1")}
    assert starts["padding-free8x1"]["packed_attention"] == "row by row" and starts["accumulate8x1"]["packed_attention"] is None


@pytest.mark.slow
def test_bf16_autocast_trains_close_to_fp32_with_fp32_weights(runs):
    """train.autocast=bf16: the same rows and seed as the fp32 run, the forward in bf16: every step's loss near the fp32
    one but not equal (bf16 is in use), and the adapter saved in fp32."""
    from safetensors.torch import load_file

    root, _ = runs
    fp32, bf16 = step_losses(root / "accumulate8x1"), step_losses(root / "autocast-bf16")
    assert len(bf16) == len(fp32) == 6 and bf16[-1] < bf16[0]
    differences = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert 1e-6 < max(differences) < 0.05, (fp32, bf16)
    start = next(r for r in records(root / "autocast-bf16") if r["event"] == "start")
    assert start["autocast"] == "bf16"
    weights = load_file(str(root / "autocast-bf16" / "adapter" / "adapter_model.safetensors"))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())


@pytest.mark.parametrize("arch,keeps_rows_apart", [("gpt2", True), ("llama", True), ("bloom", False), ("opt", False)])
def test_padding_free_batch_has_the_padded_batch_loss_and_gradients(tiny_models, data_dir, arch, keeps_rows_apart):
    """fp32, one forward and backward: the rows as one sequence (positions restarting, no attention mask) against the
    same rows left-padded. Equal mean token loss within 1e-5 and equal LoRA gradients where the model confines attention
    by positions; the others (BLOOM's ALiBi takes no positions, OPT makes its own mask) are refused before training.
    The training loss computes logits at label-predicting positions only: equal to the loss over every position's.
    Attention row by row (per-row SDPA over the packed sequence) gives the padded loss and gradients too."""
    from peft_tuner.config import ConfigError
    from peft_tuner.packed_attention import check_padding_free

    from peft_tuner.config import DataConfig, ModelConfig, PeftSettings
    from peft_tuner.data import (Encoder, build_task, collate, collate_padding_free, encode_training_rows, prepare_split,
                                 read_table)
    from peft_tuner.modeling import build_peft_model, load_base_model, load_tokenizer
    from peft_tuner.packed_attention import ROW_BY_ROW, attend_row_by_row
    from peft_tuner.losses import takes_chosen_logits
    from peft_tuner.losses import token_loss_sum

    model_cfg = ModelConfig(name_or_path=str(tiny_models[arch]))
    tokenizer = load_tokenizer(model_cfg)
    data = DataConfig(train_file=str(data_dir / "raft"))
    table = read_table(data.train_file, "train")
    task = build_task(data, table)
    examples = encode_training_rows(Encoder(tokenizer, task, 48), prepare_split(task, table, data, require_labels=True).rows)[0][:5]
    labelled = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    assert len({len(e["input_ids"]) for e in examples}) > 1  # rows of different lengths: the padded batch has padding
    torch.manual_seed(0)
    model = build_peft_model(load_base_model(model_cfg), PeftSettings(r=4, dropout=0.0), model_cfg, total_steps=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # LoRA B starts at zero: give the adapter a say
    model.eval()  # no dropout (GPT-2's attention has its own): the comparison is of arithmetic, not of random masks
    padded_batch = collate(examples, tokenizer.pad_token_id)

    def every_logit(batch):  # the reference: the LM head over every position, then the loss over the label tokens
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")

    results = []
    for batch, loss_of in ((padded_batch, every_logit), (padded_batch, lambda b: token_loss_sum(model, b, pass_positions=True)),
                           (collate_padding_free(examples), lambda b: token_loss_sum(model, b, pass_positions=True))):
        model.zero_grad()
        loss = loss_of(batch)
        loss.backward()
        results.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (reference, reference_grads), (padded, padded_grads), (flat, flat_grads) = results
    assert takes_chosen_logits(model)  # the training loss runs the LM head only where a label is predicted ...
    assert abs(padded - reference) / labelled < 1e-6, (padded, reference)  # ... and loses nothing by it
    for name, grad in reference_grads.items():
        torch.testing.assert_close(padded_grads[name], grad, atol=1e-6, rtol=1e-5)
    if not keeps_rows_apart:
        assert abs(flat - padded) / labelled > 1e-6  # the rows saw each other
        with pytest.raises(ConfigError, match=f"train.padding_free: this {arch} model lets the rows"):
            check_padding_free(model, examples, tokenizer.pad_token_id, "fp32", torch.device("cpu"))
        return
    check_padding_free(model, examples, tokenizer.pad_token_id, "fp32", torch.device("cpu"))
    assert abs(flat - padded) / labelled < 1e-5, (flat / labelled, padded / labelled)  # the mean token loss
    for name, grad in padded_grads.items():
        torch.testing.assert_close(flat_grads[name], grad, atol=1e-5, rtol=1e-4)
    # Attention row by row (what training uses for padding-free batches on SDPA models): the same loss and gradients.
    assert attend_row_by_row(model) and model.config._attn_implementation == ROW_BY_ROW
    model.zero_grad()
    rows = token_loss_sum(model, collate_padding_free(examples), pass_positions=True)
    rows.backward()
    assert abs(float(rows) - padded) / labelled < 1e-5, (float(rows) / labelled, padded / labelled)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4)
    assert float(token_loss_sum(model, padded_batch, pass_positions=True)) == pytest.approx(padded, rel=1e-6)  # padded: SDPA as before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attention varlen runs on a GPU")
def test_flash_varlen_attention_keeps_each_row_to_itself():
    """On a GPU in bf16, a padding-free batch's attention is one varlen call: each row's output and gradients equal
    causal SDPA over that row alone (grouped key / value heads, as Llama's)."""
    from peft_tuner.packed_attention import _varlen_attention, packed_attention_name, varlen_fits

    torch.manual_seed(0)
    lengths, heads, kv_heads, dim = [7, 30, 1, 64], 8, 2, 64
    q, k, v = (torch.randn(1, h, sum(lengths), dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    assert varlen_fits(q) and packed_attention_name(True, q.device, q.dtype) == "flash varlen"
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = _varlen_attention(q, k, v, bounds, max(lengths), dim ** -0.5)
    assert out.shape == (1, sum(lengths), heads, dim)
    expected = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[:, :, a:b], k[:, :, a:b].repeat_interleave(heads // kv_heads, 1), v[:, :, a:b].repeat_interleave(heads // kv_heads, 1),
        is_causal=True).transpose(1, 2) for a, b in zip(bounds.tolist(), bounds.tolist()[1:])], dim=1)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.float().square().sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(PINNED))
def test_a_short_run_gives_the_pinned_losses(runs, arch):
    losses = step_losses(runs[0] / f"pinned-{arch}")
    assert len(losses) == 8
    rates = [r["learning_rate"] for r in records(runs[0] / f"pinned-{arch}") if r.get("event") == "step"]
    assert rates == pytest.approx([5e-2 * (8 - k) / 8 for k in range(8)], abs=1e-12)  # linear decay, no warmup
    first, last = PINNED[arch]
    assert losses[0] == pytest.approx(first, rel=1e-4) and losses[-1] == pytest.approx(last, rel=1e-4), losses


def test_row_by_row_attention_runs_short_half_precision_rows_in_fp32(monkeypatch):
    """With the CPU tuning's short_rows_fp32, in bf16 (weights or autocast), a padding-free row of up to
    FP32_ATTENTION_UP_TO tokens reaches the attention kernel in fp32 and comes back in bf16; a longer row stays in bf16;
    with the tuning off, both stay in bf16. Each row attends to itself only: the result is each row's own causal
    attention, within bf16 rounding."""
    import types

    from torch.utils._python_dispatch import TorchDispatchMode

    from peft_tuner.packed_attention import row_by_row_attention
    from peft_tuner.runtime import FP32_ATTENTION_UP_TO, configure_cpu

    class KernelInputs(TorchDispatchMode):  # sees each op as it reaches the kernels, after autocast's casts
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.__name__:
                self.seen.append((args[0].shape[2], args[0].dtype))
            return func(*args, **(kwargs or {}))

    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=1, training=False)
    lengths = [7, FP32_ATTENTION_UP_TO + 1]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, sum(lengths), 8, dtype=torch.bfloat16) for _ in range(3))
    bounds = torch.tensor([0, lengths[0], sum(lengths)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for tuning, autocast in (("auto", False), ("auto", True), ("off", False)):
        configure_cpu(tuning)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), KernelInputs() as kernels:
            out, _ = row_by_row_attention(module, q, k, v, None, cu_seq_lens_q=bounds, dropout=0.0, scaling=None)
        short_dtype = torch.float32 if tuning == "auto" else torch.bfloat16
        assert kernels.seen == [(lengths[0], short_dtype), (lengths[1], torch.bfloat16)], (autocast, kernels.seen)
        assert out.dtype == torch.bfloat16 and out.shape == (1, sum(lengths), 2, 8)
        for a, b in zip(bounds.tolist(), bounds.tolist()[1:]):
            own = F.scaled_dot_product_attention(q[:, :, a:b].float(), k[:, :, a:b].float(), v[:, :, a:b].float(),
                                                 is_causal=True).transpose(1, 2)
            torch.testing.assert_close(out[:, a:b].float(), own, atol=2e-2, rtol=2e-2)


def test_padding_free_ranks_share_the_global_batch_by_tokens():
    """Every rank takes as many rows, together the global batch's; by length, the most tokens a rank gets is no more
    than the plain split's, and on this batch less (the plain split gives rank 0 the long rows)."""
    from peft_tuner.sampler import rank_share

    lengths = [60, 55, 50, 48, 20, 18, 17, 15, 33, 33]
    indices = [0, 1, 2, 3, 4, 5, 6, 7, 8, 8]  # the last global batch of an epoch repeats rows from its start
    for lens in (None, lengths):
        shares = [rank_share(indices, 2, r, lens) for r in range(2)]
        assert [len(s) for s in shares] == [5, 5]
        assert sorted(shares[0] + shares[1]) == sorted(indices)
    plain = max(sum(lengths[i] for i in rank_share(indices, 2, r)) for r in range(2))
    balanced = max(sum(lengths[i] for i in rank_share(indices, 2, r, lengths)) for r in range(2))
    assert plain == 60 + 55 + 50 + 48 + 20
    assert balanced == -(-sum(lengths[i] for i in indices) // 2)  # an even split, to the token
    assert rank_share(indices, 1, 0, lengths) == sorted(indices, key=lambda i: -lengths[i])


def test_the_fused_head_loss_path_gives_the_label_tokens_loss_and_gradients(tiny_models, data_dir):
    """train.liger_kernels computes the loss without logits: the final norm's output at the label positions and the
    head's weight go to a fused cross-entropy. With a plain torch stand-in for Liger's kernel (a CPU has no Triton),
    the path gives each label token's loss and the LoRA gradients of the usual path."""
    from peft_tuner.config import DataConfig, ModelConfig, PeftSettings
    from peft_tuner.data import Encoder, build_task, collate, encode_training_rows, read_table
    from peft_tuner.kernels import FusedHeadLoss
    from peft_tuner.losses import token_loss_sum
    from peft_tuner.modeling import build_peft_model, load_base_model, load_tokenizer

    config = ModelConfig(name_or_path=str(tiny_models["llama"]))
    tokenizer = load_tokenizer(config)
    examples, _, _ = encode_training_rows(Encoder(tokenizer, build_task(DataConfig(), read_table(str(data_dir / "raft"))), 48),
                                          read_table(str(data_dir / "raft")).rows[:6])
    batch = collate(examples, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = build_peft_model(load_base_model(config), PeftSettings(r=4, dropout=0.0, target_modules="all-linear"), config, 1)
    results = []
    for fused in (False, True):
        if fused:
            model.fused_head_loss = FusedHeadLoss(model, lambda w, h, t: F.cross_entropy(h @ w.T, t, reduction="none"))
        model.zero_grad()
        loss = token_loss_sum(model, batch, pass_positions=True)
        loss.backward()
        results.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (fused, fused_grads) = results
    assert fused == pytest.approx(plain, rel=1e-6)
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-6, rtol=1e-5)


def test_liger_kernels_are_refused_where_they_cannot_run(monkeypatch):
    import importlib.util

    from peft_tuner.kernels import check_liger

    assert check_liger(False, "gpt2", 3) is None
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "liger_kernel" else real_find_spec(name))
    assert "needs liger-kernel" in check_liger(True, "llama", 2)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "this machine has none" in check_liger(True, "llama", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "for llama, mistral, qwen2 models; this one is gpt2" in check_liger(True, "gpt2", 2)
    assert "ZeRO-0 to ZeRO-2" in check_liger(True, "llama", 3)
    assert check_liger(True, "llama", 2) is None
