"""The evaluate job: load what to evaluate, score the split's rows (over the processes of a launcher, each row once),
write predictions, metrics and a RAFT submission; for plain text, loss and perplexity; for completion and chat rows,
the loss and perplexity of the targets and generated answers against them. Calibration and prior matching
adjust rank classification's class scores. The scoring itself is in scoring, the metrics in metrics."""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from peft_tuner.config import Config, ConfigError, eval_new_tokens
from peft_tuner.data import (ClassificationTask, DataError, Encoder, SftEncoder, SftTask, build_sft_task, build_task,
                             prepare_split, read_table, sft_rows, text_blocks)
from peft_tuner.metrics import answer_scores, classification_metrics, format_report, mean_answer_scores
from peft_tuner.losses import text_loss_over_ranks
from peft_tuner.modeling import ModelError, load_for_inference
from peft_tuner.runtime import configure_cpu, eval_dtype
from peft_tuner.scoring import generate_labels, generate_texts, score_rows, text_to_class



# ----------------------------------------------------------------------------------------------------------------------
# Loading what to evaluate


def load_task(cfg: Config, saved_dir: Optional[str]) -> ClassificationTask:
    """The task saved beside the adapter / merged model, else built from the config and the training data."""
    from peft_tuner.checkpoint import TASK_FILE

    if saved_dir and (Path(saved_dir) / TASK_FILE).is_file():
        task = ClassificationTask(**json.loads((Path(saved_dir) / TASK_FILE).read_text()))
        if cfg.data.prompt_template:  # the evaluation may try another template or label words on purpose
            task.prompt_template = cfg.data.prompt_template
        if cfg.data.label_words:
            task.label_words.update(cfg.data.label_words)
        return task
    source = cfg.data.train_file or cfg.data.eval_file or cfg.data.test_file
    if not source:
        raise DataError("data.train_file: needed to know the classes; or pass a trained adapter / merged model")
    return build_task(cfg.data, read_table(source, "train"))


# ----------------------------------------------------------------------------------------------------------------------
# The job


def join_launcher_processes() -> int:
    """Under a launcher, bring up its process group (the rows are split over its processes); the world size."""
    from peft_tuner import distributed as dist

    if dist.detect_launcher() == "python":
        return 1
    dist.init_distributed()
    return dist.world_size()


def evaluate(cfg: Config, out_dir: str | Path, split: str = "eval", model_dir: Optional[str] = None,
             adapter_dir: Optional[str | list[str]] = None, method: Optional[str] = None, quiet: bool = False) -> dict:
    """Evaluate on data.eval_file (split=eval) or data.test_file (split=test); write predictions, metrics, submission.

    Several adapters (a list) are scored as one ensemble: each class's log-probability, normalised over the classes,
    averaged over the adapters (rank classification only)."""
    from peft_tuner import distributed as dist

    configure_cpu(cfg.train.cpu_tuning)  # before the process group shares the cores out
    method = method or cfg.eval.method
    members = list(adapter_dir) if isinstance(adapter_dir, (list, tuple)) else [adapter_dir]
    adapter_dir = members[0]
    if len(members) > 1:
        if method != "rank" or model_dir:
            raise ConfigError(f"--adapter given {len(members)} times: an ensemble of adapters is scored by rank "
                              "classification (--method rank), without --model")
        for member in members:
            if not any((Path(member) / name).is_file() for name in ("adapter_config.json", "config.json")):
                raise ModelError(f"--adapter {member}: no adapter_config.json there")
    spec = cfg.data.eval_file if split == "eval" else cfg.data.test_file
    held_out = split == "eval" and not spec and cfg.data.eval_fraction > 0
    if held_out:  # the rows that training held out of data.train_file
        spec = cfg.data.train_file
    if not spec:
        raise DataError(f"data.{split}_file: not set; nothing to evaluate"
                        + ("; or hold out part of data.train_file with data.eval_fraction=0.2" if split == "eval" else ""))
    table = read_table(spec, "train" if held_out else split)  # data problems surface before any model loads
    if cfg.data.task == "chat":
        from peft_tuner.data.conversations import as_chat_table

        table, _ = as_chat_table(table, cfg.data)  # whatever format the file has
    if cfg.data.task == "text":
        return evaluate_text(cfg, table, out_dir, model_dir, adapter_dir, quiet, role="eval" if held_out else split)
    if cfg.data.task in ("completion", "chat"):
        return evaluate_answers(cfg, table, out_dir, split, model_dir, adapter_dir, quiet)
    task = load_task(cfg, adapter_dir or model_dir)
    for other in members[1:]:
        classes = load_task(cfg, other).class_names
        if classes != task.class_names:
            raise ConfigError(f"--adapter {other}: its classes {classes} differ from {task.class_names} of "
                              f"--adapter {adapter_dir}; an ensemble needs the same classes")
    rows = prepare_split(task, table, cfg.data, require_labels=False, role=split).rows
    if held_out:
        spec = f"{spec} (the {cfg.data.eval_fraction:.0%} held out by data.eval_fraction)"
    labelled = all(r.get(task.label_column) is not None for r in rows) and task.label_column in table.columns
    if cfg.eval.match_prior and method != "rank":
        raise ConfigError("eval.match_prior: works on rank classification's class scores; evaluate with --method rank")
    shares, reference = prior_reference(cfg, task) if cfg.eval.match_prior else (None, [])

    world = join_launcher_processes()
    mine = list(range(dist.rank(), len(rows), world))
    my_rows = [rows[i] for i in mine]
    my_reference = reference[dist.rank()::world]  # scored with the rows, then split off again
    progress = None
    if dist.is_main() and not quiet:
        from tqdm.auto import tqdm

        progress = tqdm(total=(len(my_rows) + len(my_reference)) * len(members), dynamic_ncols=True,
                        desc=f"evaluate ({method}, rank 0 of {world})")
    if method == "rank":
        each = [] if len(members) > 1 else None  # an ensemble's members are scored anyway: each is reported too
        scores, model_kind, elapsed = score_rows(cfg, task, my_rows + my_reference, model_dir, members, progress, each)

        def matched(scored: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
            """The rows' scores and eval.match_prior's offsets (from every process's reference rows) when it is on."""
            scores, reference_scores = scored[: len(my_rows)], scored[len(my_rows):]
            if not reference:
                return scores, None
            offsets = prior_offsets(torch.cat(dist.all_gather_objects(reference_scores)), shares)
            return scores.log_softmax(-1) + offsets, offsets

        scores, offsets = matched(scores)
        results = [{"prediction": task.class_names[int(s.argmax())], "scores": dict(zip(task.class_names, s.tolist()))}
                   for s in scores]
        for member_scores in each or []:
            for result, s in zip(results, matched(member_scores)[0]):
                result.setdefault("member_predictions", []).append(task.class_names[int(s.argmax())])
    else:
        model, tokenizer, model_kind = load_for_inference(cfg, model_dir, adapter_dir)
        model.to(dist.device())
        started = time.time()  # model loading left out, as for rank classification
        encoder = Encoder(tokenizer, task, cfg.data.max_length)
        texts = generate_labels(model, encoder, my_rows, cfg, progress=progress)
        results = [{"prediction": text_to_class(t, task.label_words), "output": t} for t in texts]
        elapsed = time.time() - started
    if progress is not None:
        progress.close()
    gathered = dist.all_gather_objects([(i, r) for i, r in zip(mine, results)])
    elapsed = max(dist.all_gather_objects(elapsed))
    if not dist.is_main():
        dist.shutdown()
        return {}
    by_index = dict(pair for part in gathered for pair in part)
    assert sorted(by_index) == list(range(len(rows))), "every row exactly once"
    predictions = []
    for i, row in enumerate(rows):
        record = {"index": i, "id": row.get(cfg.data.id_column), "prompt": task.prompt(row), **by_index[i]}
        if labelled:
            record["gold"] = row[task.label_column]
        predictions.append(record)

    out = write_predictions(Path(out_dir), split, predictions)
    result = {"split": split, "source": spec, "method": method, "model": model_kind, "rows": len(rows),
              "processes": world, "seconds": round(elapsed, 3), "examples_per_second": round(len(rows) / elapsed, 2),
              "peak_memory_gb": round(dist.peak_memory_gb(), 3)}
    if reference:
        result["prior_matching"] = {"rows": len(reference), "training_shares": dict(zip(task.class_names, shares.tolist())),
                                    "offsets": dict(zip(task.class_names, offsets.tolist()))}
    if labelled:
        result.update(classification_metrics([p["gold"] for p in predictions], [p["prediction"] for p in predictions],
                                             task.class_names))
        if len(members) > 1 and method == "rank":  # each member as it alone would have scored: no second pass needed
            result["members"] = [{"adapter": str(member), **classification_metrics(
                [p["gold"] for p in predictions], [p["member_predictions"][j] for p in predictions], task.class_names)}
                for j, member in enumerate(members)]
    if not labelled or split == "test":
        result["submission"] = str(write_submission(out / f"submission_{split}.csv", predictions, task))
    (out / f"metrics_{split}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    if not quiet:
        print(f"evaluate | {spec} | {method} | {model_kind} | {len(rows)} rows on {world} process(es) | "
              f"{result['examples_per_second']} examples/s | peak memory {result['peak_memory_gb']:.2f} GB")
        if labelled:
            print(format_report(result))
            for member in result.get("members", []):
                print(f"  member {member['adapter']}: accuracy {member['accuracy']:.4f} | macro-F1 {member['macro_f1']:.4f}")
        print(f"predictions: {out / f'predictions_{split}.jsonl'}" + (f" | submission: {result['submission']}" if "submission" in result else ""))
    dist.shutdown()
    return result


def write_predictions(out: Path, split: str, predictions: list[dict]) -> Path:
    """predictions_<split>.jsonl in `out` (made if missing), one JSON line per row; returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"predictions_{split}.jsonl", "w") as f:
        for record in predictions:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return out


def write_submission(path: Path, predictions: list[dict], task: ClassificationTask) -> Path:
    """RAFT format: ID,Label, one row per test example; an unmatched generation gets the first class."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "Label"])
        for p in predictions:
            writer.writerow([p["id"], p["prediction"] or task.class_names[0]])
    return path


def prior_reference(cfg: Config, task: ClassificationTask) -> tuple[torch.Tensor, list[dict]]:
    """For eval.match_prior: the training labels' class shares and the unlabelled rows to measure the lean on."""
    shares = training_shares(read_table(cfg.data.train_file, "train"), task)
    reference = prepare_split(task, read_table(cfg.data.test_file, "test"), cfg.data, require_labels=False, role="test").rows
    return shares, reference[: cfg.eval.prior_rows]  # prepare_split refuses a file with no rows


def training_shares(train, task: ClassificationTask) -> torch.Tensor:
    """Each class's share among the labels of the training table."""
    labels = [str(r.get(task.label_column)) for r in train.rows if r.get(task.label_column) not in (None, "")]
    counts = torch.tensor([float(labels.count(name)) for name in task.class_names])
    if counts.sum() == 0:
        raise DataError(f"{train.source} has no labels of the classes {task.class_names} in column "
                        f"'{task.label_column}'; the training shares cannot be counted")
    return counts / counts.sum()


def prior_offsets(scores: torch.Tensor, shares: torch.Tensor, steps: int = 200) -> torch.Tensor:
    """Per-class offsets b for [rows, classes] scores such that softmax(scores + b), averaged over the rows, equals
    `shares` (the classes' shares among the training labels): the model's lean towards one class, measured on
    unlabelled rows, is taken out. Iterative scaling: b += log(wanted share) - log(mean predicted share)."""
    log_probs = scores.double().log_softmax(-1)
    wanted = shares.double().clamp_min(1e-12).log()
    offsets = torch.zeros(scores.shape[-1], dtype=torch.float64)
    for _ in range(steps):
        offsets += wanted - (log_probs + offsets).softmax(-1).mean(0).log()
    return (offsets - offsets.mean()).float()


def evaluate_text(cfg: Config, table, out_dir, model_dir, adapter_dir, quiet: bool, role: str = "eval") -> dict:
    """Plain text: mean token loss and perplexity over packed blocks of data.max_length, in the weights' dtype
    (eval.dtype, else model.dtype: fp32 unless asked), which the report names. Over several processes each takes an
    equal share of the blocks and the sums are added up: every block counted once, the result printed once."""
    from peft_tuner import distributed as dist

    model, tokenizer, model_kind = load_for_inference(cfg, model_dir, adapter_dir)
    dtype = eval_dtype(cfg)
    blocks, _ = text_blocks(tokenizer, table, cfg.data, role)
    world = join_launcher_processes()
    model.to(dist.device())
    started = time.time()
    loss = text_loss_over_ranks(model, blocks, cfg.eval.batch_size, tokenizer.pad_token_id)
    tokens = sum(len(b["input_ids"]) - 1 for b in blocks)
    elapsed = max(dist.all_gather_objects(time.time() - started))
    if not dist.is_main():
        dist.shutdown()
        return {}
    result = {"source": table.source, "model": model_kind, "dtype": dtype, "blocks": len(blocks), "tokens": tokens,
              "loss": loss, "perplexity": math.exp(loss), "processes": world, "seconds": round(elapsed, 3)}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "metrics_text.json").write_text(json.dumps(result, indent=2))
    if not quiet:
        print(f"evaluate | {table.source} | {model_kind} | {dtype} | {tokens} tokens on {world} process(es) | "
              f"loss {loss:.4f} | perplexity {math.exp(loss):.2f}")
    dist.shutdown()
    return result


def load_sft_task(cfg: Config, saved_dir: Optional[str], table, tokenizer) -> SftTask:
    """The completion / chat task saved beside the adapter, else built from the config and the table at hand."""
    from peft_tuner.checkpoint import TASK_FILE

    if saved_dir and (Path(saved_dir) / TASK_FILE).is_file():
        saved = json.loads((Path(saved_dir) / TASK_FILE).read_text())
        if saved.get("kind") == cfg.data.task:
            return SftTask(**saved)
    return build_sft_task(cfg.data, table, tokenizer, cfg.model.name_or_path)


def evaluate_answers(cfg: Config, table, out_dir, split: str, model_dir, adapter_dir, quiet: bool) -> dict:
    """Completion and chat rows: the mean loss and perplexity of the targets (teacher-forced, as in training), then
    each row's answer generated (greedy, or eval.num_beams; eval.max_new_tokens, 64 unless set) from everything before
    its target and compared with it: exact match, token F1, ROUGE-L, per row in predictions_<split>.jsonl and as means.
    Over several processes each takes every world-th row and rank 0 gathers them."""
    from peft_tuner import distributed as dist

    model, tokenizer, model_kind = load_for_inference(cfg, model_dir, adapter_dir)
    task = load_sft_task(cfg, adapter_dir or model_dir, table, tokenizer)
    rows = sft_rows(task, table, cfg.data, split, require_target=False)
    encoder = SftEncoder(tokenizer, task, cfg.data.max_length)
    world = join_launcher_processes()
    model.to(dist.device())
    started = time.time()
    new_tokens = eval_new_tokens(cfg)
    prompts = [encoder.generation_prompt(row, new_tokens) for row in rows]
    examples = [e for row, (_, ref) in zip(rows, prompts) if ref is not None for e in [encoder.training_example(row)[0]] if e]
    loss = text_loss_over_ranks(model, examples, cfg.eval.batch_size, tokenizer.pad_token_id) if examples else None
    mine = list(range(dist.rank(), len(rows), world))
    progress = None
    if dist.is_main() and not quiet:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(mine), dynamic_ncols=True, desc=f"generate answers (rank 0 of {world})")
    outputs = generate_texts(model, tokenizer, [prompts[i][0] for i in mine], new_tokens, cfg.eval.batch_size,
                             encoder.stop_ids, num_beams=cfg.eval.num_beams, progress=progress)
    if progress is not None:
        progress.close()
    gathered = dist.all_gather_objects([(i, o[0]) for i, o in zip(mine, outputs)])
    elapsed = max(dist.all_gather_objects(time.time() - started))
    if not dist.is_main():
        dist.shutdown()
        return {}
    by_index = dict(pair for part in gathered for pair in part)
    predictions = [{"index": i, "prompt": encoder.prompt_text(row), "output": by_index[i], "reference": prompts[i][1]}
                   for i, row in enumerate(rows)]
    scored = [p for p in predictions if p["reference"] is not None]
    for p, scores in zip(scored, answer_scores([p["output"] for p in scored], [p["reference"] for p in scored])):
        p.update(scores)
    out = write_predictions(Path(out_dir), split, predictions)
    result = {"split": split, "source": table.source, "task": task.kind, "model": model_kind, "rows": len(rows),
              "with_reference": len(scored), "processes": world, "seconds": round(elapsed, 3),
              "examples_per_second": round(len(rows) / elapsed, 2), "max_new_tokens": new_tokens,
              "peak_memory_gb": round(dist.peak_memory_gb(), 3),
              **({"loss": loss, "perplexity": math.exp(loss)} if loss is not None else {}),
              **mean_answer_scores([{k: p[k] for k in ("exact_match", "token_f1", "rouge_l")} for p in scored])}
    (out / f"metrics_{split}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    if not quiet:
        print(f"evaluate | {table.source} | {task.kind} | {model_kind} | {len(rows)} rows on {world} process(es) | "
              f"{result['examples_per_second']} examples/s")
        if scored:
            print((f"loss {loss:.4f} | perplexity {math.exp(loss):.2f} | " if loss is not None else "") +
                  f"exact match {result['exact_match']:.4f} | token F1 {result['token_f1']:.4f} | "
                  f"ROUGE-L {result['rouge_l']:.4f} | n={len(scored)}")
        print(f"predictions: {out / f'predictions_{split}.jsonl'}")
    dist.shutdown()
    return result
