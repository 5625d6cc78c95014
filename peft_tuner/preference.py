"""Preference training (train.objective: dpo | ipo | orpo): pairs of a prompt and a chosen and a rejected answer,
encoded through the chat template (or as prompt + answer + EOS), the loss on the answers only.

- DPO (Rafailov et al. 2023): -(1 - e) log sigmoid(b x D) - e log sigmoid(-b x D), D the chosen answer's log-ratio to
  the reference minus the rejected one's, b = train.beta, e = train.label_smoothing (conservative DPO).
- IPO (Azar et al. 2023): (D' - 1 / (2b))^2, D' the same difference of log-ratios each averaged over its answer's
  tokens (as TRL computes it).
- ORPO (Hong et al. 2024): the chosen answer's mean token NLL plus b x -log sigmoid(log odds ratio), the odds from each
  answer's mean token log-probability; no reference.

The reference is the base model: the policy with its adapter switched off (peft's disable_adapter), no second copy,
under every ZeRO stage; or, with train.precompute_reference, the reference's log-probabilities of every pair computed
once before the first step. What users read: the rewards b x log-ratio of chosen and rejected, the reward accuracy
(chosen above rejected), the margin, the log-probabilities.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

from peft_tuner.data.chat import assistant_token_mask
from peft_tuner.data.formats import IGNORE_INDEX, collate, collate_padding_free
from peft_tuner.modeling import is_prompt_learning

OBJECTIVES = ("sft", "dpo", "ipo", "orpo")
NEEDS_REFERENCE = ("dpo", "ipo")
STATS = ("chosen_reward", "rejected_reward", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp")


def check_objective(cfg) -> list[str]:
    """What a preference objective needs of the rest of the config, each problem naming its key."""
    objective, problems = cfg.train.objective, []
    if objective == "sft":
        return problems
    if cfg.data.task not in ("chat", "completion"):
        problems.append(f"train.objective={objective}: set data.task=chat (pairs rendered with the chat template) or "
                        f"completion (prompt + answer + EOS); data.task={cfg.data.task} has no pairs")
    if cfg.train.beta <= 0:
        problems.append(f"train.beta: must be positive (got {cfg.train.beta})")
    if not 0 <= cfg.train.label_smoothing < 0.5:
        problems.append(f"train.label_smoothing: must be in [0, 0.5) (got {cfg.train.label_smoothing})")
    if objective in NEEDS_REFERENCE and cfg.peft.method == "full" and not cfg.train.precompute_reference:
        problems.append(f"train.objective={objective}: the reference is the base model with the adapter switched off, "
                        f"and peft.method=full has no adapter; set train.precompute_reference=true (the reference's "
                        f"log-probabilities taken before the first step), use an adapter method, or objective=orpo")
    return problems


# ----------------------------------------------------------------------------------------------------------------------
# Encoding


def encode_pair(tokenizer, template: Optional[str], prompt: list[dict], answer: str, max_length: int) -> tuple[dict, bool]:
    """({input_ids, labels}, whether it was cut) of the prompt and one answer, trained on the answer (and its end of
    turn). Too long for max_length: the prompt loses its start first, then the answer its end."""
    if template:
        ids, mask = assistant_token_mask(tokenizer, template, prompt + [{"role": "assistant", "content": answer}],
                                         "last_assistant")
    else:
        head = tokenizer(prompt[-1]["content"])["input_ids"]
        tail = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, mask = head + tail, [False] * len(head) + [True] * len(tail)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    cut = len(ids) > max_length
    if cut:
        drop = min(len(ids) - max_length, mask.index(True) - 1)  # keep one prompt token: the answer's first is predicted
        ids, labels = ids[drop:][:max_length], labels[drop:][:max_length]
    return {"input_ids": ids, "labels": labels}, cut


def encode_pairs(tokenizer, template: Optional[str], pairs: list[tuple], max_length: int) -> tuple[list[dict], int]:
    """(examples {chosen, rejected}, how many pairs were cut to max_length)."""
    examples, cut = [], 0
    for prompt, chosen, rejected in pairs:
        a, cut_a = encode_pair(tokenizer, template, prompt, chosen, max_length)
        b, cut_b = encode_pair(tokenizer, template, prompt, rejected, max_length)
        examples.append({"chosen": a, "rejected": b})
        cut += cut_a or cut_b
    return examples, cut


def collate_pairs(pairs: list[dict], pad: int, padding_free: bool = False) -> dict:
    """The chosen answers' rows, then the rejected ones', as one batch of 2 x pairs (padded, or one packed sequence);
    precomputed reference log-probabilities ride along."""
    rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    batch = collate_padding_free(rows) if padding_free else collate(rows, pad)
    batch["pairs"] = torch.tensor(len(pairs))
    if all("ref_chosen" in p for p in pairs):
        batch["reference"] = torch.tensor([p["ref_chosen"] for p in pairs] + [p["ref_rejected"] for p in pairs],
                                          dtype=torch.float64)
    return batch


# ----------------------------------------------------------------------------------------------------------------------
# Log-probabilities and the losses


def sequence_logps(model, batch: dict, pass_positions: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's summed log-probability of its labelled tokens, their count): rows of the batch in order."""
    from peft_tuner.losses import batch_inputs, label_token_losses

    inputs, labels = batch_inputs(batch, pass_positions, device)
    losses, row_of = label_token_losses(model, inputs, labels)
    rows = 2 * int(batch["pairs"])
    if "cu_seq_lens" in batch:  # packed: the rows are the segments of one sequence
        bounds = batch["cu_seq_lens"].to(row_of.device)
        positions = (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 1]
        row_of = torch.bucketize(positions, bounds[1:], right=True)
    logps = torch.zeros(rows, dtype=losses.dtype, device=losses.device).index_add(0, row_of, -losses)
    counts = torch.zeros(rows, dtype=losses.dtype, device=losses.device).index_add(0, row_of, torch.ones_like(losses))
    return logps, counts


@contextlib.contextmanager
def adapter_off(model):
    """The base model as the reference: the policy with its adapter switched off (a DeepSpeed engine is looked into)."""
    inner = getattr(model, "module", model)
    with inner.disable_adapter():
        yield


def reference_logps(model, batch: dict, pass_positions: bool, device=None) -> torch.Tensor:
    """The reference's log-probabilities of the batch's rows: precomputed, or the base model's now."""
    if "reference" in batch:
        return batch["reference"].to(device or "cpu")
    with torch.no_grad(), adapter_off(model):
        return sequence_logps(model, batch, pass_positions, device)[0].detach()


def pair_losses(objective: str, logps: torch.Tensor, counts: torch.Tensor, reference: Optional[torch.Tensor],
                beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """(each pair's loss, the sums of what the log shows: rewards, accuracy, margin, log-probabilities)."""
    pairs = logps.shape[0] // 2
    chosen, rejected = logps[:pairs].float(), logps[pairs:].float()
    n_chosen, n_rejected = counts[:pairs].float(), counts[pairs:].float()
    if objective == "orpo":
        mean_chosen, mean_rejected = chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1)
        log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
        nll = -chosen  # summed here; divided by the global batch's chosen tokens by the caller (losses_for_step)
        losses = nll, -beta * F.logsigmoid(log_odds)
        chosen_reward, rejected_reward = beta * mean_chosen.detach(), beta * mean_rejected.detach()
    else:
        ref_chosen, ref_rejected = reference[:pairs].float(), reference[pairs:].float()
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if objective == "dpo":
            delta = beta * (chosen_ratio - rejected_ratio)
            losses = -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)
        else:  # ipo
            delta = chosen_ratio / n_chosen.clamp(min=1) - rejected_ratio / n_rejected.clamp(min=1)
            losses = (delta - 1 / (2 * beta)) ** 2
        chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    stats = {"chosen_reward": float(chosen_reward.sum()), "rejected_reward": float(rejected_reward.sum()),
             "reward_accuracy": float((chosen_reward > rejected_reward).float().sum()),
             "reward_margin": float((chosen_reward - rejected_reward).sum()),
             "chosen_logp": float(chosen.detach().sum()), "rejected_logp": float(rejected.detach().sum())}
    return losses, stats


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurately on both sides of -log 2."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ----------------------------------------------------------------------------------------------------------------------
# The training step and the evaluation


def pair_counts(batch: dict) -> tuple[int, int]:
    """(pairs, label tokens of the chosen answers) of a pair batch: what the step's loss is divided by."""
    pairs = int(batch["pairs"])
    labels = batch["labels"][:, 1:] != IGNORE_INDEX
    if "cu_seq_lens" in batch:
        chosen_end = int(batch["cu_seq_lens"][pairs])
        return pairs, int(labels[0, :chosen_end - 1].sum())
    return pairs, int(labels[:pairs].sum())


def pair_step_loss(model, batch: dict, train, pass_positions: bool, device, global_pairs: float,
                   global_chosen_tokens: float) -> tuple[torch.Tensor, dict]:
    """This micro-batch's share of the step's loss (the mean over the global batch's pairs; ORPO's NLL the mean over
    its chosen tokens), and the sums of the stats. The reference forward runs first, without gradients."""
    objective = train.objective
    reference = reference_logps(model, batch, pass_positions, device) if objective in NEEDS_REFERENCE else None
    logps, counts = sequence_logps(model, batch, pass_positions, device)
    losses, stats = pair_losses(objective, logps, counts, reference, train.beta, train.label_smoothing)
    if objective == "orpo":
        nll, odds = losses
        return nll.sum() / max(global_chosen_tokens, 1) + odds.sum() / max(global_pairs, 1), stats
    return losses.sum() / max(global_pairs, 1), stats


def shown_stats(sums: list[float], pairs: float) -> dict:
    """The stats' sums over the global batch as the means the log shows."""
    return {name: value / max(pairs, 1) for name, value in zip(STATS, sums)}


def pass_positions_of(model) -> bool:
    return not is_prompt_learning(getattr(model, "module", model))


def add_reference(model, pairs: list[dict], batch_size: int, pad: int) -> None:
    """train.precompute_reference: each pair's reference log-probabilities, computed once, each rank an equal run of
    the pairs (under ZeRO-3 every forward is a collective), then shared with every rank."""
    from peft_tuner import distributed as dist

    world, rank = dist.world_size(), dist.rank()
    per_rank = math.ceil(len(pairs) / world)
    mine = [min(i, len(pairs) - 1) for i in range(rank * per_rank, (rank + 1) * per_rank)]
    device = next(model.parameters()).device
    found = []
    for start in range(0, per_rank, batch_size):
        indices = mine[start:start + batch_size]
        batch = collate_pairs([pairs[i] for i in indices], pad)
        with torch.no_grad(), adapter_off(model):
            logps = sequence_logps(model, batch, pass_positions_of(model), device)[0].double().cpu()
        found += [(i, float(c), float(r)) for i, c, r in zip(indices, logps[:len(indices)], logps[len(indices):])]
    for part in dist.all_gather_objects(found):
        for i, chosen, rejected in part:
            pairs[i]["ref_chosen"], pairs[i]["ref_rejected"] = chosen, rejected


@torch.no_grad()
def evaluate_pairs(model, pairs: list[dict], train, batch_size: int, pad: int) -> dict:
    """The eval pairs' loss, reward accuracy, margin and rewards, over every rank (the last rank's run filled up with
    pairs that are run but not counted)."""
    from peft_tuner import distributed as dist

    world, rank = dist.world_size(), dist.rank()
    per_rank = math.ceil(len(pairs) / world)
    mine = list(range(rank * per_rank, (rank + 1) * per_rank))
    device = next(model.parameters()).device
    sums, counted_pairs, chosen_tokens, nll, odds = [0.0] * len(STATS), 0, 0.0, 0.0, 0.0
    for start in range(0, per_rank, batch_size):
        indices = mine[start:start + batch_size]
        keep = torch.tensor([i < len(pairs) for i in indices])
        batch = collate_pairs([pairs[min(i, len(pairs) - 1)] for i in indices], pad)
        passes = pass_positions_of(model)
        reference = reference_logps(model, batch, passes, device) if train.objective in NEEDS_REFERENCE else None
        logps, counts = sequence_logps(model, batch, passes, device)
        both = torch.cat([keep, keep]).to(logps.device)
        logps, counts = logps[both], counts[both]
        losses, stats = pair_losses(train.objective, logps, counts, None if reference is None else reference[both],
                                    train.beta, train.label_smoothing)
        sums = [a + stats[name] for a, name in zip(sums, STATS)]
        counted_pairs += int(keep.sum())
        if train.objective == "orpo":
            nll, odds = nll + float(losses[0].sum()), odds + float(losses[1].sum())
            chosen_tokens += float(counts[:int(keep.sum())].sum())
        else:
            odds += float(losses.sum())
    totals = dist.all_reduce(sums + [counted_pairs, chosen_tokens, nll, odds])
    pairs_total, tokens_total, nll_total, odds_total = totals[len(STATS):]
    loss = odds_total / max(pairs_total, 1) + (nll_total / max(tokens_total, 1) if train.objective == "orpo" else 0.0)
    return {"eval_loss": loss, **shown_stats(totals[:len(STATS)], pairs_total)}
