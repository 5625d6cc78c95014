"""Text generation with the model's own `generate`: greedy, beam search, sampling (temperature, top-k, top-p);
batched prompts with left padding, no special token after them; stops at EOS (and a BERT vocabulary's [PAD]); a seed
makes sampling repeatable. Chat questions are rendered with the chat template and stop at the end of the turn."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from peft_tuner.config import Config
from peft_tuner.data import encode_prompt
from peft_tuner.scoring import generate_texts


def read_prompts(prompts: list[str], prompt_file: Optional[str]) -> list[str]:
    from peft_tuner.data import DataError

    out = list(prompts)
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise DataError(f"--prompt-file {prompt_file}: no such file")
        out += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        raise DataError("no prompts: pass --prompt TEXT (repeatable) or --prompt-file FILE (one prompt per line)")
    return out


def generate(model, tokenizer, prompts: list[str], cfg: Config, seed: Optional[int] = None,
             encoded: Optional[list[list[int]]] = None, stop_ids: Optional[list[int]] = None) -> list[list[str]]:
    """For each prompt, `num_return_sequences` continuations (the prompt itself left out). `encoded`: the prompts'
    tokens when they are not plain text (a chat rendered by its template), `stop_ids` what ends an answer there."""
    g = cfg.generate
    if seed is not None:
        torch.manual_seed(seed)
    encoded = encoded or [encode_prompt(tokenizer, p) for p in prompts]
    sampling = dict(do_sample=True, temperature=g.temperature, top_k=g.top_k or None, top_p=g.top_p) if g.do_sample else None
    return generate_texts(model, tokenizer, encoded, g.max_new_tokens, g.batch_size, stop_ids, g.num_beams,
                          g.num_return_sequences, sampling)


def chat_prompts(tokenizer, questions: list[str], cfg: Config, system: Optional[str] = None) -> tuple[list[list[int]], list[int]]:
    """`--chat` questions as user turns (after `system`), rendered with data.chat_template or the tokenizer's own and
    the generation prompt; returns (their tokens, the tokens that end an answer: EOS and the end-of-turn token)."""
    from peft_tuner.data.chat import answer_stop_ids, encode_rendered, render, resolve_chat_template

    template = resolve_chat_template(cfg.data.chat_template, tokenizer)
    head = [{"role": "system", "content": system}] if system else []
    encoded = [encode_rendered(tokenizer, render(tokenizer, template, head + [{"role": "user", "content": q}], True))
               for q in questions]
    return encoded, answer_stop_ids(tokenizer, template)
