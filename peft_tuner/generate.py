"""Text generation with the model's own `generate`: greedy, beam search, sampling (temperature, top-k, top-p);
batched prompts with left padding, no special token after them; stops at EOS (and a BERT vocabulary's [PAD]); a seed
makes sampling repeatable."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from peft_tuner.config import Config
from peft_tuner.data import collate, encode_prompt
from peft_tuner.modeling import decode, stop_token_ids


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


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cfg: Config, seed: Optional[int] = None) -> list[list[str]]:
    """For each prompt, `num_return_sequences` continuations (the prompt itself left out)."""
    g = cfg.generate
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(prompts), g.batch_size):
        chunk = prompts[start:start + g.batch_size]
        batch = collate([{"input_ids": encode_prompt(tokenizer, p)} for p in chunk], tokenizer.pad_token_id)
        sampling = dict(do_sample=True, temperature=g.temperature, top_k=g.top_k or None, top_p=g.top_p) if g.do_sample else {}
        output = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                max_new_tokens=g.max_new_tokens, num_beams=g.num_beams,
                                num_return_sequences=g.num_return_sequences, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=stop_token_ids(tokenizer), **sampling)
        texts = decode(tokenizer, output[:, batch["input_ids"].shape[1]:])
        n = g.num_return_sequences
        results += [texts[i * n:(i + 1) * n] for i in range(len(chunk))]
    return results
