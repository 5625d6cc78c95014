"""Merge (LoRA, DoRA, rsLoRA on each family), loading the merged folder without peft, rank classification against
scoring each candidate alone, evaluation over 2 processes, RAFT submission files, generation."""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, launch_command, records, run, summary, write_recipe
from peft_tuner.config import Config, ConfigError, DataConfig, ModelConfig, PeftSettings
from peft_tuner.data import DataError, Encoder, build_task, prepare_split, read_table, select_rows
from peft_tuner.evaluate import prior_offsets
from peft_tuner.metrics import classification_metrics, headline_metrics
from peft_tuner.scoring import CandidateTree, rank_scores, shared_prefix, takes_tree_mask, text_to_class
from peft_tuner.merge import MergeError, merge
from peft_tuner.modeling import build_peft_model, decode, load_base_model, load_tokenizer

VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True}}


def make_adapter(model_path, out_dir, method="lora", seed=0, **settings):
    """An adapter whose weights are not the identity (LoRA B is zero at init), saved as training would."""
    torch.manual_seed(seed)
    model_cfg = ModelConfig(name_or_path=str(model_path))
    model = build_peft_model(load_base_model(model_cfg), PeftSettings(method=method, r=4, num_virtual_tokens=4, **settings),
                             model_cfg, total_steps=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out_dir)
    load_tokenizer(model_cfg).save_pretrained(out_dir)
    return model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ["gpt2", "bloom", "opt", "llama"])
def test_merged_logits_equal_adapter_logits(tiny_models, tmp_path, arch, variant):
    from transformers import AutoModelForCausalLM

    peft_model = make_adapter(tiny_models[arch], tmp_path / "adapter", **VARIANTS[variant])
    cfg = Config(model=ModelConfig(name_or_path=str(tiny_models[arch])))
    result = merge(cfg, tmp_path / "adapter", tmp_path / "merged")
    assert result["max_logit_diff"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[5, 9, 30, 41, 7, 12]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
        assert (base(ids).logits - merged(ids).logits).abs().max() > 1e-4  # the adapter did change something


def test_merged_folder_loads_without_peft_and_through_pipeline(tiny_models, tmp_path):
    make_adapter(tiny_models["llama"], tmp_path / "adapter")
    merge(Config(model=ModelConfig(name_or_path=str(tiny_models["llama"]))), tmp_path / "adapter", tmp_path / "merged",
          dtype="bf16")
    script = ("import sys; sys.modules['peft'] = None\n"
              "import torch; from transformers import AutoModelForCausalLM, pipeline\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r})\n"
              "assert m.dtype == torch.bfloat16, m.dtype\n"
              f"out = pipeline('text-generation', model={str(tmp_path / 'merged')!r})('Hello', max_new_tokens=4)\n"
              "print('OK', out[0]['generated_text'][:5])\n")
    proc = run([sys.executable, "-c", script], timeout=120)
    assert "OK Hello" in proc.stdout


def test_merge_refuses_a_non_empty_output_folder(tiny_models, tmp_path):
    make_adapter(tiny_models["gpt2"], tmp_path / "adapter")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "mine.txt").write_text("keep me")
    with pytest.raises(MergeError, match="not empty; choose another folder or pass --overwrite"):
        merge(Config(model=ModelConfig(name_or_path=str(tiny_models["gpt2"]))), tmp_path / "adapter", tmp_path / "merged")
    assert (tmp_path / "merged" / "mine.txt").read_text() == "keep me"


def test_prompt_tuning_cannot_merge_but_evaluates_with_its_adapter(tiny_models, tmp_path, data_dir):
    make_adapter(tiny_models["llama"], tmp_path / "adapter", method="prompt_tuning")
    cfg = Config(model=ModelConfig(name_or_path=str(tiny_models["llama"])))
    with pytest.raises(MergeError, match="cannot be merged; serve it with the adapter"):
        merge(cfg, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    from peft_tuner.evaluate import evaluate

    cfg.data.train_file, cfg.data.eval_file = str(data_dir / "raft"), str(data_dir / "raft")
    result = evaluate(cfg, tmp_path / "eval", adapter_dir=str(tmp_path / "adapter"), quiet=True)
    assert result["n"] == 8 and result["invalid"] == 0 and 0 <= result["accuracy"] <= 1


@pytest.mark.parametrize("arch", ["gpt2", "bloom", "opt", "llama"])
def test_rank_classification_matches_scoring_each_candidate_alone(tiny_models, data_dir, arch):
    from peft_tuner.config import DataConfig

    model = load_base_model(ModelConfig(name_or_path=str(tiny_models[arch]))).eval()
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_models[arch])))
    table = read_table(str(data_dir / "raft"), "train")
    # four classes whose label texts have different token lengths, one the prefix of another
    task = build_task(DataConfig(class_names=["complaint", "no complaint", "neither", "both"],
                                 label_words={"neither": "something else entirely", "both": "no complaint at all"}), table)
    encoder = Encoder(tokenizer, task, 64)
    rows = table.rows[:7]
    tree = CandidateTree([encoder.label_ids[name] for name in task.class_names])
    assert len(tree) < sum(len(ids) - 1 for ids in encoder.label_ids.values())  # shared prefixes are fed once
    assert takes_tree_mask(model) == (arch != "bloom")  # alibi: BLOOM keeps a cache copy per candidate
    batched = rank_scores(model, encoder, rows, batch_size=3, share_cache=True)
    alone = torch.zeros_like(batched)
    with torch.no_grad():
        for r, row in enumerate(rows):
            prompt = encoder.prompt_ids(row, reserve=max(len(v) for v in encoder.label_ids.values()))[0]
            for c, name in enumerate(task.class_names):
                label = encoder.label_ids[name]
                logp = torch.log_softmax(model(torch.tensor([prompt + label])).logits[0].float(), -1)
                alone[r, c] = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(label))
    torch.testing.assert_close(batched, alone, atol=2e-4, rtol=1e-4)
    assert batched.argmax(1).tolist() == alone.argmax(1).tolist()


def test_shared_prefix_is_the_longest_run_of_first_tokens_most_prompts_share():
    prompts = [[1, 2, 3, 4, 9], [1, 2, 3, 5], [1, 2, 3], [7, 2, 3, 4]]
    # [7, ...] lost its start to max_length; [1, 2, 3] needs its last token's logits, so it cannot take the third
    assert shared_prefix(prompts) == ([1, 2, 3], {0, 1})
    assert shared_prefix(prompts, share=0.75) == ([1, 2], {0, 1, 2})
    assert shared_prefix([[1, 2], [3, 4], [5, 6]]) == ([], set())
    assert shared_prefix([[1, 2], [1, 2]]) == ([1], {0, 1})


def test_rank_classification_runs_the_shared_prompt_head_once_with_the_same_scores(tiny_models, data_dir,
                                                                                    monkeypatch):
    from peft_tuner import scoring

    config = ModelConfig(name_or_path=str(tiny_models["llama"]))
    table = read_table(str(data_dir / "raft"), "train")
    encoder = Encoder(load_tokenizer(config), build_task(DataConfig(), table), 40)  # the longest row loses its start
    rows = table.rows[:12]
    model = load_base_model(config, "fp32").eval()
    built, cache_of = [], scoring._prefix_cache
    monkeypatch.setattr(scoring, "_prefix_cache", lambda m, prefix: built.append(prefix) or cache_of(m, prefix))
    shared = rank_scores(model, encoder, rows, batch_size=3)
    plain = rank_scores(model, encoder, rows, batch_size=3, share_prefix=False)
    assert len(built) == 1 and len(built[0]) >= 3  # "Tweet text :" at least, once for all the batches
    reserve = max(len(ids) for ids in encoder.label_ids.values())
    starts = [encoder.prompt_ids(row, reserve=reserve)[0][:len(built[0])] == built[0] for row in rows]
    assert 0 < starts.count(False) < len(rows) / 2  # both kinds of batch ran: with the cache and without
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert shared.argmax(1).tolist() == plain.argmax(1).tolist()


def test_rank_classification_in_bf16_on_the_cpu_runs_plain_attention_and_puts_sdpa_back(tiny_models, data_dir,
                                                                                         monkeypatch):
    from transformers.models.llama import modeling_llama

    from peft_tuner import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)  # put back as it was afterwards
    runtime.configure_cpu("auto")  # its eager_scoring
    config = ModelConfig(name_or_path=str(tiny_models["llama"]))
    table = read_table(str(data_dir / "raft"), "train")
    encoder = Encoder(load_tokenizer(config), build_task(DataConfig(), table), 64)
    calls = []
    eager = modeling_llama.eager_attention_forward
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", lambda *a, **k: calls.append(1) or eager(*a, **k))
    rank_scores(load_base_model(config, "fp32").eval(), encoder, table.rows[:5], batch_size=2)
    assert not calls  # fp32 keeps SDPA
    model = load_base_model(config, "bf16").eval()
    assert model.config._attn_implementation == "sdpa"
    plain = rank_scores(model, encoder, table.rows[:5], batch_size=2)
    assert calls and model.config._attn_implementation == "sdpa"  # plain attention while scoring, SDPA afterwards
    runtime.configure_cpu("off")
    seen = len(calls)
    with_sdpa = rank_scores(model, encoder, table.rows[:5], batch_size=2)
    assert len(calls) == seen
    torch.testing.assert_close(plain, with_sdpa, atol=0.1, rtol=0.02)  # bf16 rounding, summed over the label's tokens


def test_metrics_and_text_to_class():
    metrics = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", None], ["a", "b"])
    assert metrics["accuracy"] == 0.5 and metrics["invalid"] == 1
    assert metrics["confusion_matrix"]["b"] == {"a": 0, "b": 1, "<invalid>": 1}
    assert metrics["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    words = {"complaint": "complaint", "no complaint": "no complaint"}
    assert text_to_class(" no complaint", words) == "no complaint"
    assert text_to_class("complaint about", words) == "complaint"
    assert text_to_class("banana", words) is None


def test_prior_offsets_make_the_mean_predicted_shares_equal_the_training_shares():
    torch.manual_seed(0)
    scores = torch.randn(400, 3) * 2 + torch.tensor([1.0, 0.0, -1.0])  # leans towards class 0
    shares = torch.tensor([0.2, 0.3, 0.5])
    offsets = prior_offsets(scores, shares)
    torch.testing.assert_close((scores.log_softmax(-1) + offsets).softmax(-1).mean(0), shares, atol=1e-4, rtol=0)
    assert offsets[0] < offsets[1] < offsets[2]
    # a constant added to one class's scores everywhere is a lean like any other: taken out, same predictions
    shifted = prior_offsets(scores + torch.tensor([3.0, 0.0, 0.0]), shares)
    assert torch.equal((scores.log_softmax(-1) + offsets).argmax(-1),
                       ((scores + torch.tensor([3.0, 0.0, 0.0])).log_softmax(-1) + shifted).argmax(-1))


@pytest.mark.slow
def test_evaluation_over_two_processes_returns_every_row_once(tiny_models, data_dir, tmp_path):
    """10 test rows over 2 processes (and 7 labelled ones: an odd tail) match the 1-process predictions."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_models["opt"], data_dir / "raft", tmp_path / "run",
                          data={"eval_file": str(data_dir / "raft" / "dev.csv"), "test_file": str(data_dir / "raft"),
                                "max_rows": 7})
    outputs = {}
    for launcher in ("python", "torchrun"):
        for split in ("eval", "test"):
            out = tmp_path / f"{launcher}-{split}"
            run(launch_command(launcher, "launch/evaluate.py") + [str(recipe), "--split", split, "--out", str(out)], timeout=300)
            outputs[launcher, split] = [json.loads(l) for l in (out / f"predictions_{split}.jsonl").read_text().splitlines()]
    for split, n in (("eval", 7), ("test", 7)):
        two = outputs["torchrun", split]
        assert [p["index"] for p in two] == list(range(n))
        assert [p["prediction"] for p in two] == [p["prediction"] for p in outputs["python", split]]
        for a, b in zip(two, outputs["python", split]):
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    metrics = json.loads((tmp_path / "torchrun-eval" / "metrics_eval.json").read_text())
    assert metrics["processes"] == 2 and metrics["n"] == 7
    with open(tmp_path / "torchrun-test" / "submission_test.csv") as f:
        submission = list(csv.DictReader(f))
    assert [int(r["ID"]) for r in submission] == [100 + i for i in range(7)]
    assert [r["Label"] for r in submission] == [p["prediction"] for p in outputs["python", "test"]]


def test_generate_greedy_and_sampling(tiny_models, tmp_path):
    from peft_tuner.generate import generate

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_models["llama"])))
    model = load_base_model(ModelConfig(name_or_path=str(tiny_models["llama"]))).eval()
    prompts = ["Tweet text : hello", "a much longer prompt than the first one is"]
    cfg = Config()
    cfg.generate.max_new_tokens = 6
    greedy = generate(model, tokenizer, prompts, cfg)
    assert generate(model, tokenizer, prompts[:1], cfg) == greedy[:1]  # left padding does not change the output
    cfg.generate.num_beams, cfg.generate.num_return_sequences = 1, 1
    cfg.generate.do_sample, cfg.generate.top_k, cfg.generate.temperature = True, 5, 1.5
    sampled = generate(model, tokenizer, prompts, cfg, seed=3)
    assert sampled == generate(model, tokenizer, prompts, cfg, seed=3)
    assert sampled != generate(model, tokenizer, prompts, cfg, seed=4) and sampled != greedy  # sampling happens


def test_beam_search_returns_the_most_likely_continuations_it_found(tiny_models):
    """Beams are distinct token sequences in the order of their log-probability (computed here, one sequence at a time),
    the best at least as likely as greedy's, and more likely for a prompt where greedy's first token was a poor choice."""
    from peft_tuner.data import encode_prompt
    from peft_tuner.generate import generate

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_models["llama"])))
    model = load_base_model(ModelConfig(name_or_path=str(tiny_models["llama"]))).eval()
    prompts = ["Tweet text : hello", "a much longer prompt than the first one is"]
    generated, original = [], model.generate

    def keep_ids(**kwargs):
        out = original(**kwargs)
        generated.append(out[:, kwargs["input_ids"].shape[1]:])
        return out

    model.generate = keep_ids
    cfg = Config()
    cfg.generate.max_new_tokens = 3
    greedy_text = generate(model, tokenizer, prompts, cfg)
    cfg.generate.num_beams = cfg.generate.num_return_sequences = 4
    beam_text = generate(model, tokenizer, prompts, cfg)
    greedy, beams = generated[0].tolist(), generated[1].view(len(prompts), 4, -1).tolist()

    def log_prob(prompt: str, continuation: list[int]) -> float:
        ids = encode_prompt(tokenizer, prompt)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + continuation])).logits[0, len(ids) - 1:-1]
        return float(logits.log_softmax(-1).gather(-1, torch.tensor(continuation)[:, None]).sum())

    improved = 0
    for i, prompt in enumerate(prompts):
        assert all(tokenizer.eos_token_id not in b for b in beams[i])  # all of one length: scores compare as sums
        assert len({tuple(b) for b in beams[i]}) == 4
        scores = [log_prob(prompt, b) for b in beams[i]]
        assert scores == sorted(scores, reverse=True), scores
        assert scores[0] >= log_prob(prompt, greedy[i]) - 1e-5
        improved += scores[0] > log_prob(prompt, greedy[i]) + 1e-3
        assert beam_text[i] == decode(tokenizer, torch.tensor(beams[i]))
    assert improved >= 1 and beam_text != [[g] * 4 for g in greedy_text]


@pytest.mark.slow
def test_plain_text_task_trains_and_reports_perplexity(tiny_models, tmp_path):
    from peft_tuner.config import load_config
    from peft_tuner.evaluate import evaluate

    text = tmp_path / "train.txt"
    text.write_text("\n".join(f" the game began development in {2000 + i} , carrying over work ." for i in range(39)))
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_models["gpt2"], text, tmp_path / "run",
                          data={"task": "text", "text_column": "text", "eval_file": str(text), "max_length": 32},
                          train={"epochs": 3, "batch_size": 4, "eval_each_epoch": True})
    run(launch_command("python") + [str(recipe)], timeout=200)
    cfg = load_config(str(recipe))
    base = evaluate(cfg, tmp_path / "eval_base", quiet=True)
    adapter = str(tmp_path / "run" / "adapter")
    tuned = evaluate(cfg, tmp_path / "eval_tuned", adapter_dir=adapter, quiet=True)
    assert base["tokens"] == tuned["tokens"] > 0 and tuned["dtype"] == "fp32"
    assert tuned["perplexity"] < base["perplexity"]
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["loss"]))

    # after each epoch of training: eval loss and perplexity, falling; the last one is what evaluate measures
    evals = [r for r in records(tmp_path / "run") if r.get("event") == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2, 3]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    assert evals[-1]["eval_loss"] == pytest.approx(tuned["loss"], abs=1e-4)

    # over 2 processes (an odd number of blocks): every block once, the same loss, printed once
    two = run(launch_command("torchrun", "launch/evaluate.py") + [str(recipe), "--adapter", adapter, "--out",
                                                                   str(tmp_path / "eval_two")], timeout=300)
    assert two.stdout.count("perplexity") == 1 and "on 2 process(es)" in two.stdout
    metrics = json.loads((tmp_path / "eval_two" / "metrics_text.json").read_text())
    assert metrics["processes"] == 2 and metrics["blocks"] == tuned["blocks"] and metrics["blocks"] % 2 == 1
    assert metrics["loss"] == pytest.approx(tuned["loss"], abs=1e-5)


def test_several_adapters_are_scored_as_one_ensemble(tiny_models, tmp_path, data_dir):
    from peft_tuner.evaluate import evaluate

    cfg = Config(model=ModelConfig(name_or_path=str(tiny_models["llama"])))
    cfg.data.train_file, cfg.data.eval_file = str(data_dir / "raft"), str(data_dir / "raft")
    members, alone = [], []
    for seed in (1, 2):
        make_adapter(tiny_models["llama"], tmp_path / f"seed{seed}", seed=seed)
        members.append(str(tmp_path / f"seed{seed}"))
        evaluate(cfg, tmp_path / f"alone{seed}", adapter_dir=members[-1], quiet=True)
        alone.append([json.loads(l)["scores"] for l in (tmp_path / f"alone{seed}" / "predictions_eval.jsonl").open()])
    result = evaluate(cfg, tmp_path / "ensemble", adapter_dir=members, quiet=True)
    assert result["model"] == "ensemble of 2 lora adapters" and result["n"] == 8
    rows = [json.loads(l) for l in (tmp_path / "ensemble" / "predictions_eval.jsonl").open()]
    for row, first, second in zip(rows, *alone):
        # each member's class log-probabilities, normalised over the classes, averaged
        expected = (torch.tensor(list(first.values())).log_softmax(0) + torch.tensor(list(second.values())).log_softmax(0)) / 2
        torch.testing.assert_close(torch.tensor(list(row["scores"].values())), expected, atol=1e-5, rtol=1e-5)
        assert row["prediction"] == list(first)[int(expected.argmax())]
    assert alone[0] != alone[1]  # two different members
    # the same pass reports each member as its own evaluation does, with prior matching too (offsets of its own)
    for match_prior in (False, True):
        cfg.eval.match_prior, cfg.data.test_file = match_prior, str(data_dir / "raft")
        own = [evaluate(cfg, tmp_path / f"own{seed}-{match_prior}", adapter_dir=m, quiet=True) for seed, m in enumerate(members)]
        both = evaluate(cfg, tmp_path / f"both-{match_prior}", adapter_dir=members, quiet=True)
        assert [(m["adapter"], m["accuracy"], m["macro_f1"], m["confusion_matrix"]) for m in both["members"]] == \
            [(m, o["accuracy"], o["macro_f1"], o["confusion_matrix"]) for m, o in zip(members, own)]
        rows = [json.loads(l)["member_predictions"] for l in (tmp_path / f"both-{match_prior}" / "predictions_eval.jsonl").open()]
        for j in range(2):
            assert [r[j] for r in rows] == [json.loads(l)["prediction"]
                                            for l in (tmp_path / f"own{j}-{match_prior}" / "predictions_eval.jsonl").open()]
    assert "prior_matching" in both and "members" not in own[0]
    with pytest.raises(ConfigError, match="an ensemble of adapters is scored by rank classification"):
        evaluate(cfg, tmp_path / "generate", adapter_dir=members, method="generate", quiet=True)


def test_generate_scoring_maps_each_greedy_answer_to_its_class(tiny_models, tmp_path, data_dir):
    """--method generate: each row's output is the greedy continuation of its prompt (as `generate` gives it on the
    merged weights), and its class is the label that output names, else none (counted invalid)."""
    from peft_tuner.evaluate import evaluate
    from peft_tuner.generate import generate
    from peft_tuner.modeling import load_for_inference

    adapter = tmp_path / "adapter"
    make_adapter(tiny_models["llama"], adapter, seed=5)
    cfg = Config(model=ModelConfig(name_or_path=str(tiny_models["llama"])))
    cfg.data.train_file = cfg.data.eval_file = str(data_dir / "raft")
    cfg.eval.max_new_tokens = cfg.generate.max_new_tokens = 3
    result = evaluate(cfg, tmp_path / "eval", adapter_dir=str(adapter), method="generate", quiet=True)
    rows = [json.loads(l) for l in (tmp_path / "eval" / "predictions_eval.jsonl").open()]
    model, tokenizer, _ = load_for_inference(cfg, adapter_dir=str(adapter))
    expected = [o[0] for o in generate(model, tokenizer, [r["prompt"] for r in rows], cfg)]
    assert [r["output"] for r in rows] == expected
    assert [r["prediction"] for r in rows] == [text_to_class(o, {"complaint": "complaint", "no complaint": "no complaint"})
                                             for o in expected]
    invalid = sum(r["prediction"] is None for r in rows)
    assert result["n"] == 8 and result["accuracy"] == sum(r["prediction"] == r["gold"] for r in rows) / 8
    assert invalid == sum(result["confusion_matrix"][g].get("<invalid>", 0) for g in result["confusion_matrix"])


def test_calibration_subtracts_the_content_free_prior(tiny_models, tmp_path, data_dir):
    """eval.calibrate: each class score minus the mean class log-probability of the content-free prompts ("N/A", "",
    "[MASK]"), computed here from rank_scores of those prompts."""
    from peft_tuner.evaluate import evaluate
    from peft_tuner.modeling import load_for_inference

    adapter = tmp_path / "adapter"
    make_adapter(tiny_models["llama"], adapter, seed=6)
    cfg = Config(model=ModelConfig(name_or_path=str(tiny_models["llama"])))
    cfg.data.train_file = cfg.data.eval_file = str(data_dir / "raft")
    evaluate(cfg, tmp_path / "plain", adapter_dir=str(adapter), quiet=True)
    cfg.eval.calibrate = True
    evaluate(cfg, tmp_path / "calibrated", adapter_dir=str(adapter), quiet=True)
    plain, calibrated = ([json.loads(l) for l in (tmp_path / name / "predictions_eval.jsonl").open()]
                         for name in ("plain", "calibrated"))
    model, tokenizer, _ = load_for_inference(cfg, adapter_dir=str(adapter))
    task = build_task(cfg.data, read_table(cfg.data.train_file, "train"))
    content_free = rank_scores(model, Encoder(tokenizer, task, cfg.data.max_length),
                               [{"Tweet text": t} for t in ("N/A", "", "[MASK]")], batch_size=3)
    prior = torch.logsumexp(content_free.log_softmax(-1), 0) - math.log(3)
    assert prior.abs().max() > 1e-3  # a real offset, not zero
    for p, c in zip(plain, calibrated):
        expected = torch.tensor(list(p["scores"].values())) - prior
        torch.testing.assert_close(torch.tensor(list(c["scores"].values())), expected, atol=1e-5, rtol=1e-5)
        assert c["prediction"] == task.class_names[int(expected.argmax())]


@pytest.mark.slow
def test_merge_and_generate_launch_scripts_take_an_adapter_without_a_recipe(tiny_models, tmp_path):
    """`python launch/merge.py --adapter A --out M` and `python launch/generate.py --model M --prompt ...`: the adapter
    folder holds its base model's path and its tokenizer; the merged model generates what base + adapter does."""
    from peft_tuner.generate import generate
    from peft_tuner.modeling import load_for_inference

    adapter = tmp_path / "adapter"
    make_adapter(tiny_models["llama"], adapter, seed=8)
    run([sys.executable, str(ROOT / "launch" / "merge.py"), "--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "config.json").is_file() and not (tmp_path / "merged" / "adapter_config.json").exists()
    proc = run([sys.executable, str(ROOT / "launch" / "generate.py"), "--model", str(tmp_path / "merged"),
                "--prompt", "Tweet text : hello", "generate.max_new_tokens=4"])
    cfg = Config(model=ModelConfig(name_or_path=str(tiny_models["llama"])))
    cfg.generate.max_new_tokens = 4
    model, tokenizer, _ = load_for_inference(cfg, adapter_dir=str(adapter))
    expected = generate(model, tokenizer, ["Tweet text : hello"], cfg)[0][0]
    assert expected.strip() and expected.strip() in proc.stdout, (expected, proc.stdout[-2000:])


def test_match_prior_offsets_the_scores_to_the_training_shares(tiny_models, tmp_path, data_dir):
    from peft_tuner.evaluate import evaluate

    adapter = tmp_path / "adapter"
    make_adapter(tiny_models["llama"], adapter, seed=3)
    cfg = Config(model=ModelConfig(name_or_path=str(tiny_models["llama"])))
    cfg.data.train_file = cfg.data.eval_file = cfg.data.test_file = str(data_dir / "raft")
    plain = evaluate(cfg, tmp_path / "plain", adapter_dir=str(adapter), quiet=True)
    cfg.eval.match_prior = True
    matched = evaluate(cfg, tmp_path / "matched", adapter_dir=str(adapter), quiet=True)
    labels = [r["Label"] for r in read_table(str(data_dir / "raft"), "train").rows]
    shares = matched["prior_matching"]["training_shares"]
    assert shares == pytest.approx({c: labels.count(c) / len(labels) for c in ("complaint", "no complaint")})
    assert matched["prior_matching"]["rows"] == 10  # every row of test_unlabeled.csv (fewer than eval.prior_rows)

    def scores(folder, split="eval"):
        return torch.tensor([list(json.loads(l)["scores"].values()) for l in (folder / f"predictions_{split}.jsonl").open()])

    # each row: its class log-probabilities normalised over the classes, plus the offsets
    offsets = torch.tensor(list(matched["prior_matching"]["offsets"].values()))
    torch.testing.assert_close(scores(tmp_path / "matched"), scores(tmp_path / "plain").log_softmax(-1) + offsets)
    assert plain["n"] == matched["n"] == 8
    # on the rows the lean was measured on, the mean predicted shares are the training shares
    evaluate(cfg, tmp_path / "test", split="test", adapter_dir=str(adapter), quiet=True)
    torch.testing.assert_close(scores(tmp_path / "test", "test").softmax(-1).mean(0), torch.tensor(list(shares.values())),
                               atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="eval.match_prior: works on rank classification"):
        evaluate(cfg, tmp_path / "generate", adapter_dir=str(adapter), method="generate", quiet=True)
    (tmp_path / "empty.csv").write_text("Tweet text,ID\n,1\n")  # one row, its text empty: dropped
    cfg.data.test_file = str(tmp_path / "empty.csv")
    with pytest.raises(DataError, match="empty.csv: no rows left to use"):
        evaluate(cfg, tmp_path / "no_rows", adapter_dir=str(adapter), quiet=True)


def test_split_by_shares_gives_out_the_training_shares_most_confident_first():
    from peft_tuner.distill import split_by_shares

    # a model leaning to class 0 on every row: argmax would say 0 four times; the shares say one 0, three 1
    scores = torch.tensor([[2.0, 0.0], [5.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    assert split_by_shares(scores, torch.tensor([0.25, 0.75])) == [1, 0, 1, 1]
    # three classes: the rarer ones (0, then 2) pick first, each its one row; class 1, the most common, takes the rest
    scores = torch.tensor([[0.0, 0.0, 9.0], [0.0, 0.0, 8.0], [4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert split_by_shares(scores, torch.tensor([0.2, 0.6, 0.2])) == [2, 1, 0, 1, 1]


@pytest.mark.slow
def test_pseudo_label_writes_the_training_rows_then_the_labelled_test_rows(tiny_models, tmp_path, data_dir, capsys):
    from peft_tuner.cli import main

    adapters = []
    for seed in (1, 2):
        make_adapter(tiny_models["llama"], tmp_path / f"seed{seed}", seed=seed)
        adapters += ["--adapter", str(tmp_path / f"seed{seed}")]
    raft = data_dir / "raft"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_models["llama"], raft, tmp_path / "run",
                          data={"test_file": str(raft)})
    out = tmp_path / "distilled.csv"
    assert main(["pseudo-label", str(recipe), *adapters, "--rows", "8", "--out", str(out)]) == 0
    # the recipe's columns came from the RAFT folder's task.json; the CSV does not say them, so the hint names them
    assert f"data.train_file={out} 'data.text_column=Tweet text' data.label_column=Label" in capsys.readouterr().out

    train = read_table(str(raft / "train.csv")).rows
    test = read_table(str(raft / "test_unlabeled.csv")).rows[:8]
    written = list(csv.DictReader(out.open()))
    assert [(r["Tweet text"], r["Label"]) for r in written[: len(train)]] == [(r["Tweet text"], r["Label"]) for r in train]
    pseudo = written[len(train):]
    assert [(r["Tweet text"], r["ID"]) for r in pseudo] == [(r["Tweet text"], str(r["ID"])) for r in test]
    # the ensemble's scores are kept; the rarer class went to the rows it is most confident of, in its training share
    scored = [json.loads(l) for l in (tmp_path / "distilled_scores.jsonl").open()]
    labels = [r["Label"] for r in train]
    rare = min(("complaint", "no complaint"), key=labels.count)
    quota = round(labels.count(rare) / len(labels) * 8)
    confidence = [torch.tensor(list(p["scores"].values())).log_softmax(0)[list(p["scores"]).index(rare)] for p in scored]
    most_confident = sorted(range(8), key=lambda i: -float(confidence[i]))[:quota]
    assert sorted(i for i, r in enumerate(pseudo) if r["Label"] == rare) == sorted(most_confident)
    common = ({"complaint", "no complaint"} - {rare}).pop()
    assert [r["Label"] for i, r in enumerate(pseudo) if i not in most_confident] == [common] * (8 - quota)
    # the file trains as it is: every row is a labelled example of a known class
    data = Config().data
    data.text_column, data.label_column = "Tweet text", "Label"
    table = read_table(str(out))
    assert len(prepare_split(build_task(data, table), table, data, require_labels=True).rows) == len(train) + 8

    # nothing written is replaced unless asked; other mistakes are named before any model loads
    before = out.read_text()
    assert main(["pseudo-label", str(recipe), *adapters, "--out", str(out)]) == 2
    assert out.read_text() == before
    assert main(["pseudo-label", str(recipe), *adapters, "--out", str(tmp_path / "labels.txt")]) == 2
    assert main(["pseudo-label", str(recipe), *adapters, "--out", str(out), "--overwrite"]) == 0
    assert len(list(csv.DictReader(out.open()))) == len(train) + 10  # every row of test_unlabeled.csv this time
    # data.max_rows cut the adapters' training rows: the CSV holds just those, and the hint lifts the cut for the student
    capsys.readouterr()
    assert main(["pseudo-label", str(recipe), "data.max_rows=5", *adapters, "--out", str(out), "--overwrite"]) == 0
    seen = [train[i]["Tweet text"] for i in select_rows(train, DataConfig(max_rows=5), "train", "Label")]  # as training drew them
    assert len(seen) == 5 and seen != [r["Tweet text"] for r in train[:5]]
    assert [r["Tweet text"] for r in csv.DictReader(out.open())][:6] == seen + [test[0]["Tweet text"]]
    assert "data.label_column=Label data.max_rows=null" in capsys.readouterr().out


@pytest.mark.slow
def test_distill_trains_teachers_labels_and_a_student_then_continues_where_it_stopped(tiny_models, tmp_path, data_dir,
                                                                                     capsys, monkeypatch):
    from peft_tuner.cli import main

    raft = data_dir / "raft"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_models["llama"], raft, tmp_path / "unused",
                          data={"test_file": str(raft), "eval_file": str(raft / "dev.csv")},
                          train={"epochs": 1, "checkpoint_steps": 2}, distill={"teachers": 2, "rows": 6, "student_epochs": 5})
    out = tmp_path / "distill"
    args = ["distill", str(recipe), "--out", str(out), "--student-epochs", "2"]  # the recipe's distill section, a flag on top
    # the first teacher dies after its 3rd of 4 steps; the next call continues it from its step-2 checkpoint
    monkeypatch.setenv("PEFT_TUNER_KILL_AT", "after_step:3")
    with pytest.raises(RuntimeError, match="training failed"):
        main(args)
    monkeypatch.delenv("PEFT_TUNER_KILL_AT")
    assert not (out / "teacher2").exists()
    assert main(args) == 0
    assert [r["start_step"] for r in records(out / "teacher1") if r["event"] == "start"] == [0, 2]
    assert summary(out / "teacher1")["steps_done"] == 4
    report = json.loads((out / "distill_report.json").read_text())
    assert [Path(t["adapter"]) for t in report["teachers"]] == [out / "teacher1" / "adapter", out / "teacher2" / "adapter"]
    assert [yaml.safe_load((out / f"teacher{s}" / "run_config.yaml").read_text())["train"]["seed"] for s in (1, 2)] == [1, 2]
    train_rows = len(read_table(str(raft / "train.csv")).rows)
    assert len(list(csv.DictReader((out / "distilled.csv").open()))) == train_rows + 6 == report["labels"]["training_rows"] + 6
    student = json.loads((out / "student" / "summary.json").read_text())
    # 2 epochs over the training rows and the 6 labelled ones, 4 to a batch
    assert student["steps_done"] == 2 * -(-(train_rows + 6) // 4) and Path(student["adapter_dir"]) == out / "student" / "adapter"
    metrics = json.loads((out / "student" / "eval" / "metrics_eval.json").read_text())
    assert report["student"]["eval"]["accuracy"] == metrics["accuracy"] and metrics["n"] == 8
    assert report["ensemble_eval"]["n"] == 8
    ensemble = json.loads((out / "ensemble_eval" / "metrics_eval.json").read_text())
    # each teacher's figures come from the ensemble's pass, which scored it: no pass of its own
    assert [t["eval"] for t in report["teachers"]] == [headline_metrics(m) for m in ensemble["members"]]
    assert "accuracy" in report["teachers"][0]["eval"] and not (out / "teacher1" / "eval").exists()
    assert f"accuracy {metrics['accuracy']:.4f}" in capsys.readouterr().out

    # a second call with the same settings trains nothing again; other settings are refused, then replaced on request
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == stamps
    assert "kept" in capsys.readouterr().out
    assert json.loads((out / "distill_report.json").read_text())["labels"] == report["labels"]
    assert main(args[:-1] + ["3"]) == 2 and json.loads((out / "student" / "summary.json").read_text()) == student
    # asked to, with the same recipe: the finished teachers stay, a third one trains, the labels and the student again
    edited = recipe.read_text().replace("student_epochs: 5", "student_epochs: 4")  # not what the teachers depend on
    assert edited != recipe.read_text()
    recipe.write_text(edited)
    assert main(args[:-1] + ["3", "--teachers", "3", "--overwrite"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("teacher[12]/summary.json")} == \
        {p: t for p, t in stamps.items() if p.parent.name != "student"}
    grown = json.loads((out / "distill_report.json").read_text())
    assert len(grown["teachers"]) == 3 and summary(out / "teacher3")["steps_done"] == 4
    assert json.loads((out / "student" / "summary.json").read_text())["steps_done"] == 3 * -(-(train_rows + 6) // 4)
    # teachers trained in another dtype are other teachers: refused, then every run trained again on request
    in_bf16 = args[:-1] + ["3", "--teachers", "3", "--dtype", "bf16"]
    assert main(in_bf16) == 2
    trained = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    assert main(in_bf16 + ["--overwrite"]) == 0
    assert all(p.stat().st_mtime_ns != t for p, t in trained.items()) and len(trained) == 4
    assert {run: yaml.safe_load((out / run / "run_config.yaml").read_text())["model"]["dtype"]
            for run in ("teacher1", "teacher3", "student")} == {"teacher1": "bf16", "teacher3": "bf16", "student": "bf16"}
    assert json.loads((out / "distill_plan.json").read_text())["dtype"] == "bf16"
    recipe.write_text(recipe.read_text().replace("learning_rate: 0.05", "learning_rate: 0.01"))
    assert main(args) == 2  # the recipe was edited: other settings too
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["distill", str(recipe), "--out", str(tmp_path / "mine")]) == 2
    assert main(["distill", str(recipe), "--out", str(tmp_path / "text"), "data.task=text"]) == 2  # before any training
    assert not (tmp_path / "text").exists()


@pytest.mark.slow
def test_distill_trains_teachers_side_by_side_on_shares_of_the_cores(tiny_models, tmp_path, data_dir, monkeypatch):
    """distill.parallel=2: two teachers train at once, each on half the cores; one failing stops the other before the
    third starts, and the next call continues the failed one from its checkpoint and trains the rest."""
    import os

    from peft_tuner.cli import main

    raft = data_dir / "raft"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_models["llama"], raft, tmp_path / "unused",
                          data={"test_file": str(raft)}, train={"epochs": 1, "checkpoint_steps": 2},
                          distill={"teachers": 3, "rows": 4, "student_epochs": 1})
    out = tmp_path / "distill"
    args = ["distill", str(recipe), "--out", str(out), "--parallel", "2"]
    monkeypatch.setenv("PEFT_TUNER_KILL_AT", "after_step:3")  # the first to reach its 3rd step dies there
    with pytest.raises(RuntimeError, match="training failed"):
        main(args)
    monkeypatch.delenv("PEFT_TUNER_KILL_AT")
    assert not (out / "teacher3").exists()  # a failure starts nothing more

    assert main(args) == 0
    starts = {seed: [r for r in records(out / f"teacher{seed}") if r["event"] == "start"] for seed in (1, 2)}
    assert [r["start_step"] for r in starts[1]] == [0, 2] or [r["start_step"] for r in starts[2]] == [0, 2], starts
    assert {s[-1]["cpu_threads"] for s in starts.values()} == {max(1, (os.cpu_count() or 1) // 2)}  # started as a pair
    assert all(summary(out / f"teacher{seed}")["steps_done"] == 4 for seed in (1, 2, 3))
    assert json.loads((out / "distill_plan.json").read_text())["overrides"] == []  # how many at once is not a setting
    assert main(["distill", str(recipe), "--out", str(out)]) == 0  # the same distillation: every run kept


@pytest.mark.slow
def test_distill_stopped_by_sigterm_lets_the_teacher_checkpoint_then_continues(tiny_models, tmp_path, data_dir):
    """SIGTERM to `peft-tuner distill` reaches every worker of its DeepSpeed run (2 processes), which save a checkpoint
    before all exit 143 (dying at once, distill closed the pipe the run wrote to and the run died with no checkpoint;
    passed to the deepspeed runner alone, it died without telling its workers); the next call continues."""
    import os
    import signal
    import subprocess
    import time

    from peft_tuner.cli import main

    raft = data_dir / "raft"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_models["llama"], raft, tmp_path / "unused",
                          data={"test_file": str(raft)}, train={"epochs": 40},
                          distill={"teachers": 1, "rows": 4, "student_epochs": 1})
    out = tmp_path / "distill"
    cli = [sys.executable, "-c", "import sys; from peft_tuner.cli import main; sys.exit(main(sys.argv[1:]))"]
    proc = subprocess.Popen([*cli, "distill", str(recipe), "--out", str(out), "--processes", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    log, deadline = out / "teacher1" / "train_log.jsonl", time.time() + 300
    while not (log.is_file() and any(r["event"] == "step" for r in records(out / "teacher1"))):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, stdout[-3000:]
    assert "saved a checkpoint first" in stdout and (out / "teacher1" / "checkpoints" / "latest").is_file()
    stopped_at = [r for r in records(out / "teacher1") if r["event"] == "step"][-1]["step"]
    assert stopped_at < summary_steps_expected(raft, 40, batch=8)  # 2 processes x 4 rows a step

    assert main(["distill", str(recipe), "--out", str(out), "--processes", "2"]) == 0
    starts = [r["start_step"] for r in records(out / "teacher1") if r["event"] == "start"]
    assert starts[0] == 0 and 0 < starts[1] <= stopped_at
    assert summary(out / "teacher1")["steps_done"] == summary_steps_expected(raft, 40, batch=8)


def summary_steps_expected(raft, epochs: int, batch: int = 4) -> int:
    return epochs * -(-len(read_table(str(raft / "train.csv")).rows) // batch)


def test_the_confusion_matrix_keeps_counts_apart_when_class_names_are_short():
    """Classes "0" / "1" with three-digit counts printed as "26238" for 26 and 238."""
    from peft_tuner.metrics import format_report

    report = format_report(classification_metrics(["0"] * 136 + ["1"] * 264,
                                                  ["0"] * 58 + ["1"] * 78 + ["0"] * 26 + ["1"] * 238, ["0", "1"]))
    rows = {line.split()[0]: line.split()[1:] for line in report.splitlines()[3:5]}
    assert rows == {"0": ["58", "78"], "1": ["26", "238"]}
