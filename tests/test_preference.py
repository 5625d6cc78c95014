"""Preference training (train.objective dpo, ipo, orpo): the losses and their LoRA gradients against TRL's on one
batch, the first DPO loss of a fresh LoRA, training that raises the reward accuracy, ZeRO-3 over 2 processes with the
reference as the adapter switched off or precomputed, and the bad inputs."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import COMPLAINTS, ds_config, launch_command, records, run, summary, write_recipe
from peft_tuner.preference import collate_pairs, encode_pairs, pair_losses, sequence_logps


def pair_rows() -> list[dict]:
    other = {"complaint": "no complaint", "no complaint": "complaint"}
    return [{"prompt": f"Tweet text : {t} Label :", "chosen": f" {label}", "rejected": f" {other[label]}"}
            for t, label in COMPLAINTS]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in pair_rows()) + "\n")
    return path


def trl_trainer(tiny_models, beta: float, loss_type: str):
    """TRL's DPOTrainer making its own LoRA on the tiny Llama (so that its reference is the base, the adapter switched
    off, as ours), then the LoRA's B drawn away from zero (else policy and reference agree: the trivial case)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    args = DPOConfig(output_dir="/tmp/unused-trl", per_device_train_batch_size=2, beta=beta, loss_type=[loss_type],
                     report_to=[], use_cpu=True, max_length=64)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), args=args,
                         train_dataset=Dataset.from_list(pair_rows()[:2]),
                         processing_class=AutoTokenizer.from_pretrained(tiny_models["llama"]),
                         peft_config=LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return trainer


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("objective,loss_type", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_dpo_and_ipo_losses_and_lora_gradients_equal_trl(tiny_models, objective, loss_type):
    beta = 0.1
    trainer = trl_trainer(tiny_models, beta, loss_type)
    lora_model = trainer.model
    theirs_batch = next(iter(trainer.get_train_dataloader()))
    lora_model.zero_grad()
    theirs = trainer.compute_loss(lora_model, theirs_batch)
    theirs.backward()
    expected = grads(lora_model)

    # The same tokens in our batch layout: labels on the completion, positions from the mask.
    mask = theirs_batch["attention_mask"]
    batch = {"input_ids": theirs_batch["input_ids"], "attention_mask": mask,
             "labels": theirs_batch["input_ids"].masked_fill(theirs_batch["completion_mask"] == 0, -100),
             "position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "pairs": torch.tensor(2)}
    lora_model.zero_grad()
    with torch.no_grad(), lora_model.disable_adapter():
        reference = sequence_logps(lora_model, batch, True)[0]
    logps, counts = sequence_logps(lora_model, batch, True)
    losses, _ = pair_losses(objective, logps, counts, reference, beta)
    ours = losses.mean()
    ours.backward()
    assert abs(float(theirs) - (math.log(2) if objective == 'dpo' else 25.0)) > 1e-3  # the adapter moved the policy: not the trivial case
    assert float(ours) == pytest.approx(float(theirs), abs=1e-5)
    for name, grad in grads(lora_model).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_orpo_odds_ratio_term_and_its_gradients_equal_trl(tiny_models):
    """ORPO: our odds-ratio term (from each answer's mean token log-probability) equals TRL's odds_ratio_loss on the
    same logits, loss and gradients. Our NLL term is the chosen answer's mean token NLL (TRL's spans the prompt too)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]),
                           LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    pairs = [([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"]) for r in pair_rows()[:3]]
    examples, _ = encode_pairs(tokenizer, None, pairs, 64)
    batch = collate_pairs(examples, tokenizer.pad_token_id)
    beta = 0.1

    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    mean_logps = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    stand_in = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    theirs = -ORPOTrainer.odds_ratio_loss(stand_in, mean_logps[:3], mean_logps[3:])[0].mean()
    theirs.backward()
    expected = grads(model)

    model.zero_grad()
    logps, counts = sequence_logps(model, batch, True)
    (nll, odds), stats = pair_losses("orpo", logps, counts, None, beta)
    odds.mean().backward()
    assert float(odds.mean()) == pytest.approx(float(theirs), abs=1e-5)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)
    answer_nll = -(logps[:3] / counts[:3])  # the chosen answers' mean token NLL, as TRL's get_batch_logps averages
    torch.testing.assert_close(nll / counts[:3], answer_nll.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mean_logps[:3].detach(), (logps[:3] / counts[:3]).detach(), atol=1e-5, rtol=1e-5)


def test_label_smoothing_is_conservative_dpo():
    """label_smoothing e: -(1 - e) log sigmoid(b D) - e log sigmoid(-b D), checked on hand-picked log-probabilities."""
    logps, reference = torch.tensor([-2.0, -5.0]), torch.tensor([-3.0, -4.0])
    losses, stats = pair_losses("dpo", logps, torch.ones(2), reference, beta=0.5, label_smoothing=0.2)
    delta = 0.5 * ((-2.0 + 3.0) - (-5.0 + 4.0))
    expected = -0.8 * math.log(1 / (1 + math.exp(-delta))) - 0.2 * math.log(1 / (1 + math.exp(delta)))
    assert float(losses[0]) == pytest.approx(expected, rel=1e-6)
    assert stats["reward_accuracy"] == 1 and stats["reward_margin"] == pytest.approx(delta)


def dpo_recipe(path, model, pairs, out, **train):
    return write_recipe(path, model, pairs, out,
                        data={"task": "completion", "train_file": str(pairs), "eval_file": str(pairs), "max_length": 48},
                        train={"objective": "dpo", "beta": 0.5, "learning_rate": 0.1, "epochs": 6, "batch_size": 4,
                               "eval_each_epoch": True, **train})


def test_dpo_starts_at_ln2_and_raises_the_reward_accuracy(tiny_models, pairs_file, tmp_path):
    """One process: the first loss of a fresh LoRA (policy = reference) is ln 2; the log, the eval and the best
    adapter (by reward accuracy) carry the rewards."""
    recipe = dpo_recipe(tmp_path / "r.yaml", tiny_models["llama"], pairs_file, tmp_path / "run")
    run(launch_command("python") + [str(recipe), "eval.metric_for_best=reward_accuracy"], timeout=300)
    log = records(tmp_path / "run")
    steps = [r for r in log if r.get("event") == "step"]
    evals = [r for r in log if r.get("event") == "eval"]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert steps[0]["chosen_reward"] == pytest.approx(0, abs=1e-6) and steps[0]["reward_accuracy"] == 0
    assert {"chosen_reward", "rejected_reward", "reward_margin", "chosen_logp", "rejected_logp"} <= steps[-1].keys()
    assert evals[-1]["reward_accuracy"] >= 0.75 > evals[0]["reward_accuracy"] - 0.2
    assert evals[-1]["eval_loss"] < math.log(2) and evals[-1]["reward_margin"] > 0
    start = next(r for r in log if r.get("event") == "start")
    assert start["objective"] == "dpo"
    best = next(r for r in reversed(log) if r.get("event") == "best")
    assert best["reward_accuracy"] == max(e["reward_accuracy"] for e in evals)
    assert (tmp_path / "run" / "best_adapter").is_dir()
    assert summary(tmp_path / "run")["adapter_max_logit_diff"] < 1e-4


@pytest.mark.slow
def test_dpo_under_zero3_on_two_processes_with_and_without_precomputed_reference_and_resume(tiny_models, pairs_file, tmp_path):
    """ZeRO-3, every weight partitioned: the reference as the adapter switched off, or precomputed before the first
    step, gives the same run; each reloads its adapter; a run killed after step 3 resumes to the same adapter."""
    from safetensors.torch import load_file

    def train(name, *extra, env=None, check=True):
        recipe = dpo_recipe(tmp_path / f"{name}.yaml", tiny_models["llama"], pairs_file, tmp_path / name, epochs=2,
                            checkpoint_steps=2)
        cmd = launch_command("deepspeed", stage=3) + [str(recipe), "--deepspeed", ds_config("zero3.json"), *extra]
        return run(cmd, timeout=400, env={"OMP_NUM_THREADS": None, **(env or {})}, check=check)

    def adapter(name):
        return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

    train("live")
    train("precomputed", "train.precompute_reference=true")
    killed = train("resumed", env={"PEFT_TUNER_KILL_AT": "after_step:3:0"}, check=False)
    assert killed.returncode != 0
    train("resumed", "--resume")
    live, precomputed = records(tmp_path / "live"), records(tmp_path / "precomputed")
    losses = {name: [r["loss"] for r in records(tmp_path / name) if r.get("event") == "step"]
              for name in ("live", "precomputed", "resumed")}
    assert losses["live"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert losses["precomputed"] == pytest.approx(losses["live"], abs=1e-4)
    assert losses["resumed"][-1] == pytest.approx(losses["live"][-1], abs=1e-6)
    for log in (live, precomputed):
        assert next(r for r in log if r.get("event") == "start")["zero_stage"] == 3
        assert [r for r in log if r.get("event") == "eval"][-1]["reward_accuracy"] >= 0.5
    for name in ("live", "precomputed"):
        assert summary(tmp_path / name)["adapter_max_logit_diff"] < 1e-4
    expected = adapter("live")
    for name, tolerance in (("precomputed", 1e-3), ("resumed", 1e-6)):
        got = adapter(name)
        assert max(float((expected[k] - got[k]).abs().max()) for k in expected) <= tolerance, name


def test_packed_pairs_give_the_padded_log_probabilities(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    pairs = [([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"]) for r in pair_rows()[:4]]
    examples, _ = encode_pairs(tokenizer, None, pairs, 64)
    padded = sequence_logps(model, collate_pairs(examples, tokenizer.pad_token_id), True)
    packed = sequence_logps(model, collate_pairs(examples, tokenizer.pad_token_id, padding_free=True), True)
    for a, b in zip(padded, packed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert int(padded[1].sum()) == sum(sum(t != -100 for t in e[s]["labels"]) for e in examples for s in ("chosen", "rejected"))


def test_a_prompt_too_long_loses_its_start_and_is_counted(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    long_prompt = [{"role": "user", "content": "word " * 80}]
    examples, cut = encode_pairs(tokenizer, None, [(long_prompt, " complaint", " no complaint")], max_length=16)
    assert cut == 1
    for side, answer in (("chosen", " complaint"), ("rejected", " no complaint")):
        e = examples[0][side]
        assert len(e["input_ids"]) <= 16
        trained = [t for t in e["labels"] if t != -100]
        assert trained == tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@pytest.mark.parametrize("overrides,message", [
    (["train.objective=dpo", "peft.method=full"], "peft.method=full has no adapter; set train.precompute_reference=true"),
    (["train.objective=ipo", "data.task=classification"], "set data.task=chat .* or completion"),
    (["train.objective=dpo", "train.beta=0"], "train.beta: must be positive"),
    (["train.objective=dpo", "train.label_smoothing=0.5"], r"train.label_smoothing: must be in \[0, 0.5\)"),
    (["train.objective=kto"], "train.objective: 'kto' is not one of sft, dpo, ipo, orpo"),
])
def test_preference_settings_that_cannot_work_are_refused(tiny_models, pairs_file, tmp_path, overrides, message):
    from peft_tuner.config import ConfigError, load_config

    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], pairs_file, tmp_path / "run",
                          data={"task": "completion", "train_file": str(pairs_file)})
    with pytest.raises(ConfigError, match=message):
        load_config(str(recipe), overrides)
    if overrides == ["train.objective=dpo", "peft.method=full"]:  # a precomputed reference is one
        load_config(str(recipe), overrides + ["train.precompute_reference=true"])


def test_a_bad_pair_is_named_before_the_model_loads(tiny_models, tmp_path):
    from peft_tuner.config import ConfigError, load_config
    from peft_tuner.preflight import preflight

    rows = pair_rows()[:3] + [{"prompt": "hello", "chosen": " same", "rejected": " same"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], path, tmp_path / "run",
                          data={"task": "completion", "train_file": str(path)}, train={"objective": "dpo"})
    with pytest.raises(ConfigError, match=r"pairs.jsonl: row 4: the chosen and the rejected answer are the same text"):
        preflight(load_config(str(recipe)), resume=False, overwrite=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("shape", ["strings", "messages", "alpaca"])
def test_the_example_recipe_reads_pairs_of_each_shape(tiny_models, tmp_path, shape):
    """configs/example_dpo.yaml with its files given, pairs written as strings, as lists of messages, or Alpaca-style:
    the same encoded pairs, through the chat template."""
    import yaml
    from transformers import AutoTokenizer

    from conftest import ROOT
    from peft_tuner.config import load_config
    from peft_tuner.preflight import preflight

    rows = [{k: v.strip() for k, v in r.items()} for r in pair_rows()[:4]]  # a chat answer has no leading space
    if shape == "messages":
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    elif shape == "alpaca":
        rows = [{"instruction": r["prompt"], "input": "", "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = yaml.safe_load((ROOT / "configs" / "example_dpo.yaml").read_text())
    recipe["model"]["name_or_path"] = str(tiny_models["llama"])
    recipe["data"].update(train_file=str(path), eval_file=str(path), chat_template="chatml")
    recipe["output_dir"] = str(tmp_path / "run")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    data = preflight(load_config(str(tmp_path / "r.yaml")), resume=False, overwrite=False).data
    assert data.preference and data.rows == 4 and len(data.eval_pairs) == 4
    assert data.task["data_format"]["format"] == "preference" and data.task["objective"] == "dpo"
    first = data.examples[0]

    def prompt_and_answer(example):
        start = next(i for i, t in enumerate(example["labels"]) if t != -100)
        return example["input_ids"][:start], [t for t in example["labels"] if t != -100]

    (prompt, chosen), (same_prompt, rejected) = prompt_and_answer(first["chosen"]), prompt_and_answer(first["rejected"])
    assert prompt == same_prompt and chosen != rejected
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    assert tokenizer.decode(chosen).startswith(pair_rows()[0]["chosen"].strip())
    assert tokenizer.decode(prompt).rstrip().endswith("assistant")  # the chat template's turns around the answer


def test_make_pairs_takes_the_reference_as_chosen_and_the_models_different_answer_as_rejected(tmp_path):
    from conftest import BIN
    from peft_tuner.data import DataError

    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], "source": "s"}
             for i in range(3)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    outputs = ["a0", "wrong", " a2 "]  # the first and the last already give the reference answer
    (tmp_path / "pred.jsonl").write_text("".join(json.dumps({"index": i, "output": o, "reference": f"a{i}"}) + "\n"
                                                 for i, o in enumerate(outputs)))
    out = tmp_path / "pairs.jsonl"
    done = run([str(BIN / "peft-tuner"), "make-pairs", str(tmp_path / "chat.jsonl"),
                str(tmp_path / "pred.jsonl"), str(out)])
    assert "1 pairs of 3 rows (2 where the model already gives the reference answer)" in done.stdout
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": [{"role": "user", "content": "q1"}], "chosen": "a1", "rejected": "wrong", "source": "s"}]
    from peft_tuner.chat_data import build_pairs

    (tmp_path / "other.jsonl").write_text("".join(json.dumps({"index": i, "output": "x", "reference": "other"}) + "\n"
                                                  for i in range(3)))
    with pytest.raises(DataError, match="row 1 answers another question"):
        build_pairs(tmp_path / "chat.jsonl", tmp_path / "other.jsonl", tmp_path / "p2.jsonl")
    mine = tmp_path / "mine.jsonl"
    mine.write_text("a file of the user's\n")
    with pytest.raises(DataError, match="is there with other content; pass --overwrite"):
        build_pairs(tmp_path / "chat.jsonl", tmp_path / "pred.jsonl", mine)
    assert mine.read_text() == "a file of the user's\n"
