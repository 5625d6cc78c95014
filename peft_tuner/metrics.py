"""Classification metrics: accuracy, macro-F1, per-class precision / recall / F1 and the confusion matrix, and their
printed report (outputs that match no class count as invalid); generated answers against references: exact match,
token F1 and ROUGE-L."""
from __future__ import annotations

import re
from collections import Counter
from typing import Optional

INVALID = "<invalid>"
HEADLINE_KEYS = ("accuracy", "macro_f1", "n", "examples_per_second", "confusion_matrix", "prior_matching")


def headline_metrics(result: dict) -> dict:
    """The figures a report keeps from an evaluation's result."""
    return {k: result[k] for k in HEADLINE_KEYS if k in result}


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
        counts = [str(n) for row in metrics["confusion_matrix"].values() for n in row.values()]
        width = max(len(c) for c in columns + classes + counts) + 2
        lines.append("confusion (rows: gold, columns: predicted)")
        lines.append(" " * width + "".join(c.rjust(width) for c in columns))
        for g in classes:
            lines.append(g.ljust(width) + "".join(str(metrics["confusion_matrix"][g][p]).rjust(width) for p in columns))
        for name, c in metrics["per_class"].items():
            lines.append(f"  {name}: precision {c['precision']:.3f} recall {c['recall']:.3f} f1 {c['f1']:.3f} (n={c['support']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Generated answers against references: exact match, token F1, ROUGE-L

_CJK_CHAR = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff"
_ANSWER_TOKEN = re.compile(f"[{_CJK_CHAR}]|[^\\W{_CJK_CHAR}]+")


def answer_tokens(text: str) -> list[str]:
    """Lower-cased words, punctuation left out; each CJK character is a token of its own (Chinese has no spaces)."""
    return _ANSWER_TOKEN.findall(text.lower())


class _AnswerTokenizer:
    """rouge-score's tokenizer interface over answer_tokens (its own drops every non-ASCII character)."""

    def tokenize(self, text: str) -> list[str]:
        return answer_tokens(text)


def token_f1(output: str, reference: str) -> float:
    out, ref = answer_tokens(output), answer_tokens(reference)
    if not out or not ref:
        return float(out == ref)
    common = sum((Counter(out) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(out), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_scores(outputs: list[str], references: list[str]) -> list[dict]:
    """Per answer: exact_match (the same tokens), token_f1, rouge_l (rouge-score's ROUGE-L F-measure)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_AnswerTokenizer())
    return [{"exact_match": float(answer_tokens(o) == answer_tokens(r)), "token_f1": token_f1(o, r),
             "rouge_l": scorer.score(r, o)["rougeL"].fmeasure} for o, r in zip(outputs, references)]


def mean_answer_scores(scores: list[dict]) -> dict:
    return {key: sum(s[key] for s in scores) / len(scores) for key in ("exact_match", "token_f1", "rouge_l")} if scores else {}
