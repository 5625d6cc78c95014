"""The losses: the training loop's next-token cross-entropy over label tokens, and the evaluation loss of text,
completion and chat examples over every rank. The LM head runs only where a label is predicted, where the model
allows it."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from peft_tuner.data import IGNORE_INDEX, collate
from peft_tuner.modeling import is_prompt_learning
from peft_tuner.scoring import forward_takes, takes_tree_mask


def takes_chosen_logits(model) -> bool:
    """Whether the model computes logits only at the positions a boolean `logits_to_keep` mask names (transformers'
    causal LMs do; prompt-learning models prepend virtual tokens, which would shift the mask)."""
    return not is_prompt_learning(getattr(model, "module", model)) and forward_takes(model, "logits_to_keep")


def label_token_losses(model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of every label token (labels are -100 elsewhere), and the batch row of each.

    The LM head (for SmolLM2 a 49,152 x 576 matrix, a fifth of the model's multiply-adds per token) runs only at the
    positions that predict a label, where the model allows it: a classification row's prompt costs no logits at all."""
    targets = labels[:, 1:]
    wanted = targets != IGNORE_INDEX
    fused = getattr(getattr(model, "module", model), "fused_head_loss", None)
    if fused is not None and torch.is_grad_enabled():  # train.liger_kernels: no logits at all (peft_tuner.kernels)
        return fused(model, inputs, targets, wanted), wanted.nonzero()[:, 0]
    if takes_chosen_logits(model):
        keep = F.pad(wanted, (0, 1), value=False)  # position t predicts token t + 1
        logits = model(**inputs, logits_to_keep=keep).logits  # [kept positions, vocab]
    else:
        logits = model(**inputs).logits[:, -labels.shape[1]:]  # prompt-learning models prepend virtual tokens
        logits = logits[:, :-1][wanted]
    losses = F.cross_entropy(logits.float(), targets[wanted], reduction="none")
    return losses, wanted.nonzero()[:, 0]


@torch.no_grad()
def text_loss_over_ranks(model, blocks: list[dict], batch_size: int, pad: int) -> float:
    """Mean next-token loss over the label tokens of `blocks` (every token of a text block; the target of a completion
    or chat example), each rank taking an equal run of them (the last rank's run filled up with blocks that are run
    but not counted: under ZeRO-3 every forward is a collective, so all ranks run as many)."""
    from peft_tuner import distributed as dist

    world, rank = dist.world_size(), dist.rank()
    per_rank = math.ceil(len(blocks) / world)
    mine = list(range(rank * per_rank, (rank + 1) * per_rank))
    device = next(model.parameters()).device
    pass_positions = not is_prompt_learning(model) and takes_tree_mask(model)  # BLOOM takes no positions
    total, tokens = 0.0, 0
    for start in range(0, per_rank, batch_size):
        indices = mine[start:start + batch_size]
        counted = torch.tensor([i < len(blocks) for i in indices], device=device)
        batch = collate([blocks[min(i, len(blocks) - 1)] for i in indices], pad)
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") + (("position_ids",) if pass_positions else ())}
        losses, row_of = label_token_losses(model, inputs, batch["labels"].to(device))
        total += float(losses[counted[row_of]].sum())
        tokens += int(counted[row_of].sum())
    total, tokens = dist.all_reduce([total, tokens])
    return total / tokens


def batch_inputs(batch: dict, pass_positions: bool, device: Optional[torch.device] = None) -> tuple[dict, torch.Tensor]:
    """(the model's inputs, the labels) of a collated batch. A padding-free batch has no attention mask: its position
    ids tell the rows apart. No cache: a training forward never reads one again. With `device`, the batch comes from
    the host and moves there after its longest row is read: no wait on the device."""
    moved = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)} if device is not None else batch
    inputs = {k: moved[k] for k in ("input_ids", "attention_mask") if k in moved}
    if pass_positions:
        inputs["position_ids"] = moved["position_ids"]
        if "cu_seq_lens" in batch:  # the rows' boundaries, for attention that runs row by row
            longest = int((batch["cu_seq_lens"][1:] - batch["cu_seq_lens"][:-1]).max())
            inputs.update(cu_seq_lens_q=moved["cu_seq_lens"], cu_seq_lens_k=moved["cu_seq_lens"],
                          max_length_q=longest, max_length_k=longest)
    return {**inputs, "use_cache": False}, moved["labels"]


def token_loss_sum(engine, batch: dict, pass_positions: bool, device: Optional[torch.device] = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over label tokens (prompt and padding are -100)."""
    inputs, labels = batch_inputs(batch, pass_positions, device)
    losses, _ = label_token_losses(engine, inputs, labels)
    return losses.sum()
