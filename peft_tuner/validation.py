"""Evaluation during training (train.eval_steps, eval_epochs, eval_each_epoch): accuracy by rank classification for
classification, the loss and perplexity of the eval examples' targets otherwise, every rank taking part; and the best
evaluation so far, which keeps best_adapter/ and decides early stopping."""
from __future__ import annotations

import math
from typing import Optional

from peft_tuner import distributed as dist
from peft_tuner.config import Config
from peft_tuner.preflight import TrainData
from peft_tuner.deepspeed_patches import start_trace_afresh
from peft_tuner.losses import text_loss_over_ranks
from peft_tuner.runtime import eval_autocast


def evaluate_during_training(engine, cfg: Config, data: TrainData, tokenizer) -> tuple[dict, str]:
    """Accuracy by rank classification (classification), else the loss and perplexity of the eval examples' targets;
    every rank takes part. Returns (metrics, a line that says them)."""
    engine.eval()
    if data.eval_pairs:
        from peft_tuner.preference import evaluate_pairs

        metrics = evaluate_pairs(engine, data.eval_pairs, cfg.train, cfg.eval.batch_size, tokenizer.pad_token_id)
        said = (f"eval loss {metrics['eval_loss']:.4f}, reward accuracy {metrics['reward_accuracy']:.4f}, margin "
                f"{metrics['reward_margin']:.4f} on {len(data.eval_pairs)} pairs")
    elif data.eval_rows:
        metrics = {"accuracy": accuracy_during_training(engine, cfg, data)}
        said = f"eval accuracy {metrics['accuracy']:.4f} on {len(data.eval_rows)} rows"
    else:
        loss = text_loss_over_ranks(engine.module, data.eval_blocks, cfg.eval.batch_size, tokenizer.pad_token_id)
        metrics = {"eval_loss": loss, "perplexity": math.exp(loss)}
        said = f"eval loss {loss:.4f}, perplexity {math.exp(loss):.2f} on {len(data.eval_blocks)} examples"
    # Under ZeRO-3 the last forwards left weights prefetched for forwards that will not come; gathering the adapter
    # to save it as the best so far would find them in flight (DeepSpeed's "Cannot partition a param in flight",
    # with prefetch buckets the size of the hidden layer). Release them all; a no-op below ZeRO-3.
    engine.empty_partition_cache()
    start_trace_afresh(engine)
    engine.train()
    return metrics, said


class BestSoFar:
    """The best evaluation so far by eval.metric_for_best, and how many evaluations since; kept in checkpoints."""

    def __init__(self, metric: str, higher_is_better: bool, value: Optional[float] = None, step: Optional[int] = None,
                 evals_without_improvement: int = 0):
        self.metric, self.higher_is_better = metric, higher_is_better
        self.value, self.step, self.evals_without_improvement = value, step, evals_without_improvement

    @classmethod
    def from_state(cls, state: Optional[dict], metric: str, higher_is_better: bool) -> "BestSoFar":
        return cls(metric, higher_is_better, **{k: v for k, v in (state or {}).items() if k != "metric"})

    def state(self) -> dict:
        return {"metric": self.metric, "value": self.value, "step": self.step,
                "evals_without_improvement": self.evals_without_improvement}

    def update(self, metrics: dict, step: int) -> bool:
        """Whether `metrics` is the best so far (the first evaluation always is)."""
        value = metrics[self.metric]
        better = self.value is None or (value > self.value if self.higher_is_better else value < self.value)
        if better:
            self.value, self.step, self.evals_without_improvement = value, step, 0
        else:
            self.evals_without_improvement += 1
        return better


def accuracy_during_training(engine, cfg: Config, data: TrainData) -> float:
    """Rank classification of the eval rows, split evenly over the ranks (padded so that every rank runs as many
    forwards: under ZeRO-3 each forward is a collective)."""
    from peft_tuner.scoring import rank_scores

    rows, world, rank = data.eval_rows, dist.world_size(), dist.rank()
    per_rank = math.ceil(len(rows) / world)
    indices = range(rank * per_rank, (rank + 1) * per_rank)
    mine = [rows[min(i, len(rows) - 1)] for i in indices]
    with eval_autocast(cfg):
        scores = rank_scores(engine.module, data.encoder, mine, cfg.eval.batch_size)
    names, label = data.encoder.task.class_names, data.encoder.task.label_column
    correct = sum(names[int(s.argmax())] == row[label] for i, s, row in zip(indices, scores, mine) if i < len(rows))
    (total_correct,) = dist.all_reduce([float(correct)])
    return total_correct / len(rows)
