"""A small instruction set built from the data at hand, for the chat recipe (configs/chat_sft_smollm2.yaml).

Three kinds of question, each a user turn with one assistant answer:
- twitter_complaints: "Is this tweet a complaint ...?" -> `complaint` / `no complaint` (train.csv for training, rows of
  dev.csv for evaluation);
- ChnSentiCorp: "这条酒店评论是正面还是负面？" -> 正面 / 负面 (disjoint random draws for training and evaluation);
- WikiText-2: "Continue this text: <the first 30 words of a paragraph>" -> its next 12 words (train.txt for training,
  valid.txt for evaluation).
`peft-tuner make-chat-data OUT` writes OUT/train.jsonl and OUT/eval.jsonl (`{"messages": [...], "source": ...}` per
line); the same data folder and seed give the same files.
"""
from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

from peft_tuner.data import DataError

COMPLAINT_QUESTION = "Is this tweet a complaint about a product or service? Answer complaint or no complaint.\nTweet: {}"
REVIEW_QUESTION = "这条酒店评论是正面还是负面？请回答正面或负面。\n评论：{}"
CONTINUE_QUESTION = "Continue this text with the next few words.\n{}"
SIZES = {"train": {"twitter_complaints": 50, "chnsenticorp": 75, "wikitext2": 75},
         "eval": {"twitter_complaints": 40, "chnsenticorp": 40, "wikitext2": 40}}


def build_chat_set(data_root: str | Path, out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> dict:
    """Write OUT/train.jsonl and OUT/eval.jsonl; returns {split: {source: rows}}. A file that is there with other
    content is replaced only with `overwrite`."""
    root, out = Path(data_root), Path(out_dir)
    needed = [root / "raft/twitter_complaints/train.csv", root / "raft/twitter_complaints/dev.csv",
              root / "chnsenticorp/ChnSentiCorp_htl_all.csv", root / "wikitext-2/train.txt", root / "wikitext-2/valid.txt"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        from peft_tuner.data.sources import PUBLIC_SOURCES

        raise DataError(f"make-chat-data: {', '.join(missing)} not found; pass --data the folder that holds raft/, "
                        f"chnsenticorp/ and wikitext-2/ (or set PEFT_TUNER_DATA to it). They are: "
                        + "; ".join(PUBLIC_SOURCES.values()))
    rng = random.Random(seed)
    reviews = [r for r in _csv(root / "chnsenticorp/ChnSentiCorp_htl_all.csv") if (r.get("review") or "").strip()]
    review_draw = rng.sample(reviews, SIZES["train"]["chnsenticorp"] + SIZES["eval"]["chnsenticorp"])
    splits = {
        "train": (_csv(root / "raft/twitter_complaints/train.csv"), review_draw[: SIZES["train"]["chnsenticorp"]],
                  root / "wikitext-2/train.txt"),
        "eval": (rng.sample(_csv(root / "raft/twitter_complaints/dev.csv"), SIZES["eval"]["twitter_complaints"]),
                 review_draw[SIZES["train"]["chnsenticorp"]:], root / "wikitext-2/valid.txt"),
    }
    counts, texts = {}, {}
    for split, (tweets, split_reviews, wiki) in splits.items():
        rows = [_chat("twitter_complaints", COMPLAINT_QUESTION.format(r["Tweet text"]), r["Label"])
                for r in tweets[: SIZES[split]["twitter_complaints"]]]
        rows += [_chat("chnsenticorp", REVIEW_QUESTION.format(r["review"].strip()[:80]),
                       "正面" if r["label"] == "1" else "负面") for r in split_reviews]
        rows += [_chat("wikitext2", CONTINUE_QUESTION.format(prompt), answer)
                 for prompt, answer in _continuations(wiki, SIZES[split]["wikitext2"], random.Random(f"{seed}:{split}"))]
        random.Random(f"{seed}:{split}:order").shuffle(rows)
        texts[split] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        counts[split] = {source: sum(r["source"] == source for r in rows) for source in SIZES[split]}
    for split, text in texts.items():
        path = out / f"{split}.jsonl"
        if path.is_file() and path.read_text(encoding="utf-8") != text and not overwrite:
            raise DataError(f"make-chat-data: {path} is there with other content; pass --overwrite to replace it, or "
                            f"choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        (out / f"{split}.jsonl").write_text(text, encoding="utf-8")
    return counts


def _chat(source: str, question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], "source": source}


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _continuations(path: Path, n: int, rng: random.Random, prompt_words: int = 30, answer_words: int = 12):
    """(the first words of a paragraph, the words that follow) for n paragraphs drawn at random."""
    paragraphs = [_detokenize(line) for line in path.read_text(encoding="utf-8").splitlines()
                  if line.strip() and not line.strip().startswith("=") and "<unk>" not in line]
    paragraphs = [p for p in paragraphs if len(p.split()) >= prompt_words + answer_words]
    for paragraph in rng.sample(paragraphs, n):
        words = paragraph.split()
        yield " ".join(words[:prompt_words]), " ".join(words[prompt_words:prompt_words + answer_words])


def _detokenize(line: str) -> str:
    """WikiText's spaced punctuation ("1 @,@ 000", "game 's", "( lit . )") written back as ordinary text."""
    line = re.sub(r" @(.)@ ", r"\1", line.strip())
    line = re.sub(r" ([,.;:!?')\]])", r"\1", line)
    line = re.sub(r"([(\[]) ", r"\1", line)
    return line.replace(" n't", "n't")


def build_pairs(chat_file: str | Path, predictions_file: str | Path, out_file: str | Path, overwrite: bool = False) -> dict:
    """Preference pairs from a chat set and a model's answers to it (`peft-tuner evaluate`'s predictions_<split>.jsonl
    over that file): the reference answer chosen, the model's own greedy answer rejected, for every row where the two
    differ. Writes OUT (`{"prompt": [messages], "chosen", "rejected", "source"}` per line); returns the counts."""
    chats = [json.loads(line) for line in Path(chat_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    predictions = [json.loads(line) for line in Path(predictions_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(predictions) != len(chats):
        raise DataError(f"make-pairs: {predictions_file} has {len(predictions)} rows and {chat_file} {len(chats)}; "
                        f"evaluate every row of the chat file (no data.max_rows) with data.eval_file={chat_file}")
    pairs, same = [], 0
    for p in predictions:
        row = chats[p["index"]]
        *prompt, answer = row["messages"]
        if answer["role"] != "assistant" or answer["content"].strip() != (p.get("reference") or "").strip():
            raise DataError(f"make-pairs: {predictions_file} row {p['index'] + 1} answers another question than "
                            f"{chat_file} row {p['index'] + 1}; the predictions must come from that file")
        if p["output"].strip() == answer["content"].strip():
            same += 1
            continue
        pairs.append({"prompt": prompt, "chosen": answer["content"], "rejected": p["output"].strip(),
                      "source": row.get("source")})
    out = Path(out_file)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs)
    if out.is_file() and out.read_text(encoding="utf-8") != text and not overwrite:
        raise DataError(f"make-pairs: {out} is there with other content; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return {"pairs": len(pairs), "same_answer": same, "rows": len(chats)}
