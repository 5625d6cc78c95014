"""Batch evaluation: rank classification or generation for classification tasks, loss and perplexity for plain text.

Rank classification scores each class name by its log-likelihood after the prompt; the prompt is encoded once and its
KV cache is shared by every candidate label, and the candidates go through the model as one token tree (shared prefixes
fed once), so no answer can be invalid and 77 classes stay cheap. Over several
processes each takes every world_size-th row and rank 0 gathers them back in order: no row lost or counted twice.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from peft_tuner.config import PROMPT_LEARNING_METHODS, Config, ConfigError
from peft_tuner.data import (ClassificationTask, DataError, Encoder, build_task, collate, prepare_split, read_table,
                             text_blocks)
from peft_tuner.modeling import (DTYPES, ModelError, decode, load_base_model, load_tokenizer, prepare_tokenizer,
                                 stop_token_ids)

LOGITS_BUDGET = 64 * 2**20  # floats of candidate logits held at once (256 MB in fp32)
INVALID = "<invalid>"


# ----------------------------------------------------------------------------------------------------------------------
# Loading what to evaluate


def load_for_inference(cfg: Config, model_dir: Optional[str] = None, adapter_dir: Optional[str] = None):
    """(model, tokenizer, method): a merged/standalone folder, or the base model of `cfg` plus an adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = cfg.eval.dtype or cfg.model.dtype
    if adapter_dir and not (Path(adapter_dir) / "adapter_config.json").is_file() \
            and (Path(adapter_dir) / "config.json").is_file():
        model_dir, adapter_dir = adapter_dir, None  # method=full saves the whole model where the adapter would be
    if adapter_dir:
        from peft import PeftModel

        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise ModelError(f"--adapter {adapter_dir}: no adapter_config.json there")
        model = PeftModel.from_pretrained(load_base_model(cfg.model, "fp32"), adapter_dir)
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir) if (Path(adapter_dir) / "tokenizer_config.json").is_file() \
            else load_tokenizer(cfg.model)
        method = model.peft_config["default"].peft_type.value.lower()
        if not model.peft_config["default"].is_prompt_learning:
            # Merge in memory, in fp32 (as exact as base+adapter), then into a base model loaded in the eval dtype:
            # as fast as the base model. (A merged model cast with .to() ran 3x slower here, for reasons not found.)
            merged = model.merge_and_unload().state_dict()
            model = load_base_model(cfg.model, dtype)
            model.load_state_dict(merged)
        model = model.to(DTYPES[dtype])
    elif model_dir:
        if not (Path(model_dir) / "config.json").is_file():
            raise ModelError(f"--model {model_dir}: no config.json there; give a merged model folder")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        method = "merged"
    else:
        model, tokenizer, method = load_base_model(cfg.model, dtype), load_tokenizer(cfg.model), "base"
    return model.eval(), prepare_tokenizer(tokenizer, cfg.model), method


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
# Rank classification


def rank_scores(model, encoder: Encoder, rows: list[dict], batch_size: int, share_cache: bool = True, progress=None) -> torch.Tensor:
    """[rows, classes] summed log-probabilities of each class's tokens (label + EOS) after the prompt.

    With `share_cache` the prompt is encoded once; then, where the model takes position ids and a custom attention mask,
    all candidates are scored in one forward as a token tree (class names sharing a prefix share its tokens), else each
    candidate runs on its own copy of the prompt's cache."""
    candidates = [encoder.label_ids[name] for name in encoder.task.class_names]
    reserve = max(len(c) for c in candidates)
    pad = encoder.tokenizer.pad_token_id
    prompts = [encoder.prompt_ids(row, reserve=reserve)[0] for row in rows]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together: little padding
    tree = CandidateTree(candidates) if share_cache and takes_tree_mask(model) else None
    if tree is not None and len(tree):
        batch_size = max(1, min(batch_size, LOGITS_BUDGET // (len(tree) * _vocab_size(model))))
    scores = torch.zeros((len(rows), len(candidates)))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        if tree is not None:
            scores[chunk] = _score_tree(model, [prompts[i] for i in chunk], tree, pad)
        elif share_cache:
            scores[chunk] = _score_with_shared_cache(model, [prompts[i] for i in chunk], candidates, pad)
        else:
            scores[chunk] = torch.stack([_score_concatenated(model, prompts[i], candidates, pad) for i in chunk])
        if progress is not None:
            progress.update(len(chunk))
    return scores


class CandidateTree:
    """The candidates' tokens as a trie, flattened: one node per distinct prefix that is fed to the model.

    Node n holds token `tokens[n]` at depth `depths[n]` after the prompt and may attend to the prompt and to its own
    ancestors (`allowed[n]`); its logits score the next token of every candidate passing through it."""

    def __init__(self, candidates: list[list[int]]):
        index: dict[tuple, int] = {}
        self.candidates, self.tokens, self.depths, parents, self.paths = candidates, [], [], [], []
        for c in candidates:
            path, parent = [], -1
            for j in range(len(c) - 1):  # the last token is only scored, never fed
                node = index.setdefault(tuple(c[:j + 1]), len(self.tokens))
                if node == len(self.tokens):
                    self.tokens.append(c[j])
                    self.depths.append(j)
                    parents.append(parent)
                path.append(node)
                parent = node
            self.paths.append(path)
        self.allowed = torch.zeros((len(self.tokens), len(self.tokens)), dtype=torch.bool)
        for n, parent in enumerate(parents):  # parents come before their children
            if parent >= 0:
                self.allowed[n] = self.allowed[parent]
            self.allowed[n, n] = True
        # (node, next token, candidate) for every scored token after the first
        self.score_nodes = torch.tensor([n for path in self.paths for n in path], dtype=torch.long)
        self.score_tokens = torch.tensor([t for c in candidates for t in c[1:]], dtype=torch.long)
        self.score_owner = torch.tensor([i for i, c in enumerate(candidates) for _ in c[1:]], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.tokens)


def takes_tree_mask(model) -> bool:
    """Tree scoring places each node by its position id, so the model must take position ids (alibi models such as
    BLOOM do not); transformers passes a 4D attention mask through as given."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "position_ids" in inspect.signature(base.forward).parameters


def _vocab_size(model) -> int:
    weight = model.get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]  # under ZeRO-3 the local tensor is empty


@torch.no_grad()
def _score_tree(model, prompts: list[list[int]], tree: CandidateTree, pad: int) -> torch.Tensor:
    batch = collate([{"input_ids": p} for p in prompts], pad)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                use_cache=True, logits_to_keep=1)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)
    scores = first[:, [c[0] for c in tree.candidates]].clone()
    if not len(tree):
        return scores.cpu()
    n_prompts, width, nodes = len(prompts), batch["input_ids"].shape[1], len(tree)
    keep = torch.cat([batch["attention_mask"].bool()[:, None, :].expand(n_prompts, nodes, width),
                      tree.allowed.to(device)[None].expand(n_prompts, nodes, nodes)], dim=-1)
    dtype = out.logits.dtype
    mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, torch.finfo(dtype).min)[:, None]
    positions = batch["attention_mask"].sum(1)[:, None] + torch.tensor(tree.depths, device=device)[None]
    out.logits = None
    logits = model(input_ids=torch.tensor(tree.tokens, device=device)[None].expand(n_prompts, nodes),
                   attention_mask=mask, position_ids=positions, past_key_values=out.past_key_values, use_cache=True).logits
    logp = F.log_softmax(logits.float(), dim=-1)[:, tree.score_nodes.to(device), tree.score_tokens.to(device)]
    scores.index_add_(1, tree.score_owner.to(device), logp)
    return scores.cpu()


@torch.no_grad()
def _score_with_shared_cache(model, prompts: list[list[int]], candidates: list[list[int]], pad: int) -> torch.Tensor:
    batch = collate([{"input_ids": p} for p in prompts], pad)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                use_cache=True, logits_to_keep=1)  # only the last position's logits are needed
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]: the first token of every candidate
    scores = first[:, [c[0] for c in candidates]].clone()
    longest = max(len(c) for c in candidates)
    if longest == 1:
        return scores.cpu()
    n_prompts, vocab = len(prompts), out.logits.shape[-1]
    out.logits = None
    lengths = batch["attention_mask"].sum(1)
    chunk = max(1, LOGITS_BUDGET // (n_prompts * (longest - 1) * vocab))
    for c0 in range(0, len(candidates), chunk):
        group = candidates[c0:c0 + chunk]
        k = len(group)
        feed = torch.full((k, longest - 1), pad, dtype=torch.long, device=device)
        target = torch.full((k, longest - 1), -100, dtype=torch.long, device=device)
        for i, c in enumerate(group):
            feed[i, :len(c) - 1] = torch.tensor(c[:-1])
            target[i, :len(c) - 1] = torch.tensor(c[1:])
        cache = copy.deepcopy(out.past_key_values)
        cache.batch_repeat_interleave(k)  # row b*k + i: prompt b, candidate i
        mask = torch.cat([batch["attention_mask"].repeat_interleave(k, 0),
                          torch.ones((n_prompts * k, longest - 1), dtype=torch.long, device=device)], dim=1)
        positions = lengths.repeat_interleave(k)[:, None] + torch.arange(longest - 1, device=device)[None]
        logits = model(input_ids=feed.repeat(n_prompts, 1), attention_mask=mask, position_ids=positions,
                       past_key_values=cache, use_cache=True).logits
        scores[:, c0:c0 + k] += _sum_logprobs(logits, target.repeat(n_prompts, 1)).view(n_prompts, k)
    return scores.cpu()


@torch.no_grad()
def _score_concatenated(model, prompt: list[int], candidates: list[list[int]], pad: int) -> torch.Tensor:
    """Each candidate appended to the prompt as one sequence (no cache): prompt-learning models, and the reference."""
    device = next(model.parameters()).device
    batch = collate([{"input_ids": prompt + c, "labels": [-100] * len(prompt) + c} for c in candidates], pad)
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if not _is_prompt_learning(model):
        inputs["position_ids"] = batch["position_ids"].to(device)
    logits = model(**inputs).logits[:, -batch["input_ids"].shape[1]:]
    return _sum_logprobs(logits[:, :-1], batch["labels"][:, 1:].to(device)).cpu()


def _sum_logprobs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (target != -100)).sum(-1)


def _is_prompt_learning(model) -> bool:
    config = getattr(model, "peft_config", {}).get("default")
    return bool(config is not None and config.is_prompt_learning)


# ----------------------------------------------------------------------------------------------------------------------
# Generation as the reference does it: decode a few tokens, map the text to a class


@torch.no_grad()
def generate_labels(model, encoder: Encoder, rows: list[dict], cfg: Config, progress=None) -> list[str]:
    tokenizer = encoder.tokenizer
    reserve = cfg.eval.max_new_tokens
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(rows), cfg.eval.batch_size):
        prompts = [encoder.prompt_ids(row, reserve=reserve)[0] for row in rows[start:start + cfg.eval.batch_size]]
        batch = collate([{"input_ids": p} for p in prompts], tokenizer.pad_token_id)
        generated = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                   max_new_tokens=cfg.eval.max_new_tokens, num_beams=cfg.eval.num_beams, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer))
        outputs += decode(tokenizer, generated[:, batch["input_ids"].shape[1]:])
        if progress is not None:
            progress.update(len(prompts))
    return outputs


def text_to_class(text: str, label_words: dict[str, str]) -> Optional[str]:
    """Exact label text first, then the longest label the output starts with; None when nothing matches."""
    cleaned = text.strip().lower()
    words = {name: word.strip().lower() for name, word in label_words.items()}
    for name, word in words.items():
        if cleaned == word:
            return name
    for name, word in sorted(words.items(), key=lambda kv: -len(kv[1])):
        if cleaned.startswith(word):
            return name
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


def classification_metrics(gold: list[str], predicted: list[Optional[str]], class_names: list[str]) -> dict:
    predicted = [p if p is not None else INVALID for p in predicted]
    columns = class_names + ([INVALID] if INVALID in predicted else [])
    confusion = {g: {p: 0 for p in columns} for g in class_names}
    for g, p in zip(gold, predicted):
        confusion[g][p] += 1
    per_class = {}
    for name in class_names:
        tp = confusion[name][name]
        predicted_as = sum(confusion[g][name] for g in class_names)
        support = sum(confusion[name].values())
        precision = tp / predicted_as if predicted_as else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {"accuracy": sum(g == p for g, p in zip(gold, predicted)) / len(gold),
            "macro_f1": sum(c["f1"] for c in per_class.values()) / len(class_names),
            "invalid": predicted.count(INVALID), "n": len(gold), "per_class": per_class, "confusion_matrix": confusion}


def format_report(metrics: dict) -> str:
    lines = [f"accuracy {metrics['accuracy']:.4f} | macro-F1 {metrics['macro_f1']:.4f} | n={metrics['n']}"
             + (f" | invalid outputs {metrics['invalid']}" if metrics.get("invalid") else "")]
    classes = list(metrics["confusion_matrix"])
    if len(classes) <= 10:
        columns = list(next(iter(metrics["confusion_matrix"].values())))
        width = max(len(c) for c in columns + classes) + 2
        lines.append("confusion (rows: gold, columns: predicted)")
        lines.append(" " * width + "".join(c.rjust(width) for c in columns))
        for g in classes:
            lines.append(g.ljust(width) + "".join(str(metrics["confusion_matrix"][g][p]).rjust(width) for p in columns))
        for name, c in metrics["per_class"].items():
            lines.append(f"  {name}: precision {c['precision']:.3f} recall {c['recall']:.3f} f1 {c['f1']:.3f} (n={c['support']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# The job


def evaluate(cfg: Config, out_dir: str | Path, split: str = "eval", model_dir: Optional[str] = None,
             adapter_dir: Optional[str | list[str]] = None, method: Optional[str] = None, quiet: bool = False) -> dict:
    """Evaluate on data.eval_file (split=eval) or data.test_file (split=test); write predictions, metrics, submission.

    Several adapters (a list) are scored as one ensemble: each class's log-probability, normalised over the classes,
    averaged over the adapters (rank classification only)."""
    from peft_tuner import distributed as dist

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
    if cfg.data.task == "text":
        return evaluate_text(cfg, table, out_dir, model_dir, adapter_dir, quiet)
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

    world = 1
    if dist.detect_launcher() != "python":
        dist.init_distributed()
        world = dist.world_size()
    mine = list(range(dist.rank(), len(rows), world))
    my_rows = [rows[i] for i in mine]
    my_reference = reference[dist.rank()::world]  # scored with the rows, then split off again
    progress = None
    if dist.is_main() and not quiet:
        from tqdm.auto import tqdm

        progress = tqdm(total=(len(my_rows) + len(my_reference)) * len(members), dynamic_ncols=True,
                        desc=f"evaluate ({method}, rank 0 of {world})")
    started = time.time()
    if method == "rank":
        scores = torch.zeros((len(my_rows) + len(my_reference), len(task.class_names)))
        for member in members:
            model, tokenizer, model_kind = load_for_inference(cfg, model_dir, member)
            model.to(dist.device())
            encoder = Encoder(tokenizer, task, cfg.data.max_length)
            member_scores = rank_scores(model, encoder, my_rows + my_reference, cfg.eval.batch_size,
                                        share_cache=not _is_prompt_learning(model), progress=progress)
            if cfg.eval.calibrate:
                member_scores = member_scores - content_free_prior(model, encoder)
            if len(members) > 1:  # an ensemble averages the members' log-probabilities normalised over the classes
                member_scores = member_scores.log_softmax(-1) / len(members)
            scores += member_scores
            del model
        if len(members) > 1:
            model_kind = f"ensemble of {len(members)} {model_kind} adapters"
        scores, reference_scores = scores[: len(my_rows)], scores[len(my_rows):]
        if reference:
            offsets = prior_offsets(torch.cat(dist.all_gather_objects(reference_scores)), shares)
            scores = scores.log_softmax(-1) + offsets
        results = [{"prediction": task.class_names[int(s.argmax())], "scores": dict(zip(task.class_names, s.tolist()))}
                   for s in scores]
    else:
        model, tokenizer, model_kind = load_for_inference(cfg, model_dir, adapter_dir)
        model.to(dist.device())
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

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"predictions_{split}.jsonl", "w") as f:
        for record in predictions:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    result = {"split": split, "source": spec, "method": method, "model": model_kind, "rows": len(rows),
              "processes": world, "seconds": round(elapsed, 3), "examples_per_second": round(len(rows) / elapsed, 2),
              "peak_memory_gb": round(dist.peak_memory_gb(), 3)}
    if reference:
        result["prior_matching"] = {"rows": len(reference), "training_shares": dict(zip(task.class_names, shares.tolist())),
                                    "offsets": dict(zip(task.class_names, offsets.tolist()))}
    if labelled:
        result.update(classification_metrics([p["gold"] for p in predictions], [p["prediction"] for p in predictions],
                                             task.class_names))
    if not labelled or split == "test":
        result["submission"] = str(write_submission(out / f"submission_{split}.csv", predictions, task))
    (out / f"metrics_{split}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    if not quiet:
        print(f"evaluate | {spec} | {method} | {model_kind} | {len(rows)} rows on {world} process(es) | "
              f"{result['examples_per_second']} examples/s | peak memory {result['peak_memory_gb']:.2f} GB")
        if labelled:
            print(format_report(result))
        print(f"predictions: {out / f'predictions_{split}.jsonl'}" + (f" | submission: {result['submission']}" if "submission" in result else ""))
    dist.shutdown()
    return result


def write_submission(path: Path, predictions: list[dict], task: ClassificationTask) -> Path:
    """RAFT format: ID,Label, one row per test example; an unmatched generation gets the first class."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "Label"])
        for p in predictions:
            writer.writerow([p["id"], p["prediction"] or task.class_names[0]])
    return path


@torch.no_grad()
def content_free_prior(model, encoder: Encoder) -> torch.Tensor:
    """Class scores for content-free inputs ("N/A", "", "[MASK]"), averaged: subtracting them calibrates the classes."""
    rows = [{c: text for c in encoder.task.template_columns} for text in ("N/A", "", "[MASK]")]
    scores = rank_scores(model, encoder, rows, batch_size=3, share_cache=not _is_prompt_learning(model))
    return torch.logsumexp(scores.log_softmax(-1), 0) - math.log(len(rows))


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


def evaluate_text(cfg: Config, table, out_dir, model_dir, adapter_dir, quiet: bool) -> dict:
    """Plain text: mean token loss and perplexity over packed blocks of data.max_length, in the weights' dtype
    (eval.dtype, else model.dtype: fp32 unless asked), which the report names. Over several processes each takes an
    equal share of the blocks and the sums are added up: every block counted once, the result printed once."""
    from peft_tuner import distributed as dist

    model, tokenizer, model_kind = load_for_inference(cfg, model_dir, adapter_dir)
    dtype = cfg.eval.dtype or cfg.model.dtype
    blocks, _ = text_blocks(tokenizer, table, cfg.data)
    world = 1
    if dist.detect_launcher() != "python":
        dist.init_distributed()
        world = dist.world_size()
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


@torch.no_grad()
def text_loss_over_ranks(model, blocks: list[dict], batch_size: int, pad: int) -> float:
    """Mean next-token loss over `blocks`, each rank taking an equal run of them (the last rank's run filled up with
    blocks that are run but not counted: under ZeRO-3 every forward is a collective, so all ranks run as many)."""
    from peft_tuner import distributed as dist

    world, rank = dist.world_size(), dist.rank()
    per_rank = math.ceil(len(blocks) / world)
    mine = list(range(rank * per_rank, (rank + 1) * per_rank))
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, per_rank, batch_size):
        indices = mine[start:start + batch_size]
        counted = torch.tensor([i < len(blocks) for i in indices], device=device)
        batch = collate([blocks[min(i, len(blocks) - 1)] for i in indices], pad)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:].to(device), reduction="none")
        total += float(losses.sum(-1)[counted].sum())
        tokens += int(batch["labels"][:, 1:].numel() // len(indices)) * int(counted.sum())
    total, tokens = dist.all_reduce([total, tokens])
    return total / tokens
