"""The scoring engine: how a model's answers to prompts are measured, with no files and no metrics.

Rank classification scores each class name by its log-likelihood after the prompt: the prompt is encoded once and
every candidate label reads it, the candidates going through the model as one token tree (shared prefixes fed once)
in the prompt's own forward, so no answer can be invalid and 77 classes stay cheap. Generation decodes a few tokens and maps the text to
a class, as the reference recipe does. Text is scored by its mean next-token loss.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from peft_tuner.config import Config, eval_new_tokens
from peft_tuner.data import Encoder, collate
from peft_tuner.modeling import decode, is_prompt_learning, stop_token_ids

LOGITS_BUDGET = 64 * 2**20  # floats of candidate logits held at once (256 MB in fp32)


# ----------------------------------------------------------------------------------------------------------------------
# Rank classification


def rank_scores(model, encoder: Encoder, rows: list[dict], batch_size: int, share_cache: Optional[bool] = None,
                progress=None, share_prefix: bool = True) -> torch.Tensor:
    """[rows, classes] summed log-probabilities of each class's tokens (label + EOS) after the prompt.

    With `share_cache` (the default, except for prompt-learning models) the prompt is encoded once: where the model
    takes position ids and a custom attention mask, its tokens and all candidates' as a token tree (class names sharing
    a prefix share its tokens) go through one forward, else each candidate runs on its own copy of the prompt's cache.
    One forward rather than the prompt's and then the tree's on its cache: SmolLM2 on the 300 dev rows in bf16 on a
    2-core CPU, 32.8 against 28.3-28.6 examples/s, the same scores (fp32: 15.3 against 15.4). The tokens that most
    prompts start with (the template's head; with data.chat_format the chat template's system turn) go through the
    model once, and the batches of those prompts read their cache (unless `share_prefix` is false)."""
    share_cache = not is_prompt_learning(model) if share_cache is None else share_cache
    candidates = [encoder.label_ids[name] for name in encoder.task.class_names]
    reserve = max(len(c) for c in candidates)
    pad = encoder.tokenizer.pad_token_id
    prompts = [encoder.prompt_ids(row, reserve=reserve)[0] for row in rows]
    tree = CandidateTree(candidates) if share_cache and takes_tree_mask(model) else None
    if tree is not None and len(tree):
        batch_size = max(1, min(batch_size, LOGITS_BUDGET // (len(tree) * _vocab_size(model))))
    scores = torch.zeros((len(rows), len(candidates)))
    with eager_attention_on_cpu(model):
        prefix, sharing = [], set()
        if share_prefix and tree is not None and not _zero3_partitioned(model):
            prefix, sharing = shared_prefix(prompts)
        cache = _prefix_cache(model, prefix) if prefix else None
        groups = [[i for i in range(len(prompts)) if i not in sharing], sorted(sharing)] if cache is not None \
            else [list(range(len(prompts)))]
        for group, group_cache in zip(groups, (None, cache)):
            skip = len(prefix) if group_cache is not None else 0
            order = sorted(group, key=lambda i: len(prompts[i]))  # similar lengths together: little padding
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                if tree is not None:
                    scores[chunk] = _score_tree(model, [prompts[i][skip:] for i in chunk], tree, pad, group_cache)
                elif share_cache:
                    scores[chunk] = _score_with_shared_cache(model, [prompts[i] for i in chunk], candidates, pad)
                else:
                    scores[chunk] = torch.stack([_score_concatenated(model, prompts[i], candidates, pad) for i in chunk])
                if progress is not None:
                    progress.update(len(chunk))
    return scores


@contextlib.contextmanager
def eager_attention_on_cpu(model):
    """The CPU tuning's eager_scoring: in bf16 / fp16 on the CPU, scoring's short prompts under padding masks run
    faster through plain attention (two matrix products and a softmax) than through SDPA's kernel: SmolLM2 rank
    classification of the 300 dev rows, bf16, 32 prompts a forward, 2 cores: 58.6 against 49.5 examples/s. In fp32 it
    gained nothing (16.0 against 16.3), so fp32 keeps SDPA, as do GPUs. SDPA comes back afterwards."""
    from peft_tuner.packed_attention import ROW_BY_ROW
    from peft_tuner.runtime import cpu_tuning

    base = _base_model(model)
    before = getattr(base.config, "_attn_implementation", None)
    if not cpu_tuning().eager_scoring or before not in ("sdpa", ROW_BY_ROW) \
            or next(model.parameters()).device.type != "cpu" or next(model.parameters()).dtype == torch.float32 \
            or not base._can_set_attn_implementation():
        yield
        return
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(before)


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


def forward_takes(model, parameter: str) -> bool:
    """Whether the model's own forward takes `parameter` (a DeepSpeed engine and a peft wrapper are looked through).
    Asked at every training step: the signature is read once per forward function."""
    base = _base_model(model)
    return parameter in _parameters_of(getattr(base.forward, "__func__", base.forward))


def _base_model(model):
    """The transformers model inside a DeepSpeed engine and a peft wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.lru_cache(maxsize=None)
def _parameters_of(function) -> frozenset:
    import inspect

    return frozenset(inspect.signature(function).parameters)


def takes_tree_mask(model) -> bool:
    """Tree scoring places each node by its position id, so the model must take position ids (alibi models such as
    BLOOM do not); transformers passes a 4D attention mask through as given."""
    return forward_takes(model, "position_ids")


def _vocab_size(model) -> int:
    weight = model.get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]  # under ZeRO-3 the local tensor is empty


def shared_prefix(prompts: list[list[int]], share: float = 0.5) -> tuple[list[int], set[int]]:
    """(tokens, prompts): the longest run of first tokens that at least `share` of the prompts (and two) start with,
    short of each one's last token (whose logits are needed), and the indices of the prompts that start with it. A
    prompt cut at data.max_length loses its start, so not every prompt need share the template's head."""
    prefix, group = [], list(range(len(prompts)))
    while True:
        depth = len(prefix)
        by_token: dict[int, list[int]] = {}
        for i in group:
            if len(prompts[i]) > depth + 1:
                by_token.setdefault(prompts[i][depth], []).append(i)
        token, members = max(by_token.items(), key=lambda kv: len(kv[1]), default=(None, []))
        if len(members) < max(2, share * len(prompts)):
            return prefix, set(group) if prefix else set()
        prefix, group = prefix + [token], members


def _zero3_partitioned(model) -> bool:
    """Whether the weights are ZeRO-3 shards, where every rank must run as many forwards (each gathers the weights)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@torch.no_grad()
def _prefix_cache(model, prefix: list[int]):
    """The key/value cache of the shared prefix at batch size 1, or None where the model keeps no cache."""
    device = next(model.parameters()).device
    cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values
    return cache if cache is not None and cache.get_seq_length() == len(prefix) else None


@torch.no_grad()
def _score_tree(model, prompts: list[list[int]], tree: CandidateTree, pad: int, prefix_cache=None) -> torch.Tensor:
    """One forward over each left-padded prompt followed by the tree's nodes: the nodes see the prompt's real tokens
    and their own ancestors, the prompt sees only itself (causally), so the prompt's positions compute what they
    would alone. Logits only at the prompt's last token (every candidate's first token) and at the nodes. With
    `prefix_cache` the prompts are what follows the shared prefix, which every position sees from the cache."""
    batch = collate([{"input_ids": p} for p in prompts], pad)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    n_prompts, width, nodes = len(prompts), batch["input_ids"].shape[1], len(tree)
    shared = prefix_cache.get_seq_length() if prefix_cache is not None else 0
    real = batch["attention_mask"].bool()
    causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
    prompt_rows = torch.cat([causal[None] & real[:, None, :], torch.zeros((n_prompts, width, nodes), dtype=torch.bool,
                                                                            device=device)], dim=-1)
    node_rows = torch.cat([real[:, None, :].expand(n_prompts, nodes, width),
                           tree.allowed.to(device)[None].expand(n_prompts, nodes, nodes)], dim=-1)
    keep = torch.cat([prompt_rows, node_rows], dim=1)
    keep |= torch.eye(width + nodes, dtype=torch.bool, device=device)[None]  # a padding position sees itself: no empty row
    keep = torch.cat([torch.ones((n_prompts, width + nodes, shared), dtype=torch.bool, device=device), keep], dim=-1)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, torch.finfo(dtype).min)[:, None]
    depths, node_tokens = (torch.tensor(v, dtype=torch.long, device=device)[None] for v in (tree.depths, tree.tokens))
    positions = shared + torch.cat([batch["position_ids"], real.sum(1)[:, None] + depths], dim=1)
    tokens = torch.cat([batch["input_ids"], node_tokens.expand(n_prompts, nodes)], dim=1)
    cache = None
    if prefix_cache is not None:  # a copy per batch: the forward appends this batch's keys and values to it
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(n_prompts)
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=cache is not None, logits_to_keep=nodes + 1).logits.float()  # [prompts, 1 + nodes, vocab]
    first = F.log_softmax(logits[:, 0], dim=-1)
    scores = first[:, [c[0] for c in tree.candidates]].clone()
    logp = F.log_softmax(logits[:, 1:], dim=-1)[:, tree.score_nodes.to(device), tree.score_tokens.to(device)]
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
    if not is_prompt_learning(model):
        inputs["position_ids"] = batch["position_ids"].to(device)
    logits = model(**inputs).logits[:, -batch["input_ids"].shape[1]:]
    return _sum_logprobs(logits[:, :-1], batch["labels"][:, 1:].to(device)).cpu()


def _sum_logprobs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (target != -100)).sum(-1)


def score_rows(cfg: Config, task, rows: list[dict], model_dir: Optional[str] = None,
               adapters: Sequence[Optional[str]] = (None,), progress=None,
               each: Optional[list] = None) -> tuple[torch.Tensor, str, float]:
    """Rank classification's class scores for `rows` on this process: ([rows, classes] in task.class_names' order,
    what was scored, seconds spent scoring, model loading left out). The model is the base model, `model_dir`, or
    each adapter in turn, loaded one at a time; eval.calibrate subtracts each one's content-free prior. Several
    adapters are one ensemble: each class's log-probability, normalised over the classes, averaged over the adapters.
    With `each` (a list), each adapter's own scores are appended to it too, as that adapter alone would score."""
    import time

    from peft_tuner import distributed as dist
    from peft_tuner.modeling import load_for_inference

    total, seconds = torch.zeros((len(rows), len(task.class_names))), 0.0
    for adapter in adapters:
        model, tokenizer, kind = load_for_inference(cfg, model_dir, adapter)
        model.to(dist.device())
        started = time.time()
        encoder = Encoder(tokenizer, task, cfg.data.max_length)
        scores = rank_scores(model, encoder, rows, cfg.eval.batch_size, progress=progress)
        if cfg.eval.calibrate:
            scores = scores - content_free_prior(model, encoder)
        total += scores.log_softmax(-1) / len(adapters) if len(adapters) > 1 else scores
        if each is not None:
            each.append(scores)
        seconds += time.time() - started
        del model
    return total, (f"ensemble of {len(adapters)} {kind} adapters" if len(adapters) > 1 else kind), seconds


# ----------------------------------------------------------------------------------------------------------------------
# Generation as the reference does it: decode a few tokens, map the text to a class


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                   stop_ids: Optional[list[int]] = None, num_beams: int = 1, num_return_sequences: int = 1,
                   sampling: Optional[dict] = None, progress=None) -> list[list[str]]:
    """For each prompt (token ids), `num_return_sequences` decoded continuations: batches of similar lengths,
    left-padded, each sequence ending at a stop token (EOS, an end-of-turn token) or after max_new_tokens."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([{"input_ids": prompts[i]} for i in chunk], tokenizer.pad_token_id)
        output = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                max_new_tokens=max_new_tokens, num_beams=num_beams,
                                num_return_sequences=num_return_sequences, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=stop_ids or stop_token_ids(tokenizer), **(sampling or {"do_sample": False}))
        texts = decode(tokenizer, output[:, batch["input_ids"].shape[1]:])
        for k, i in enumerate(chunk):
            results[i] = texts[k * num_return_sequences:(k + 1) * num_return_sequences]
        if progress is not None:
            progress.update(len(chunk))
    return results


def generate_labels(model, encoder: Encoder, rows: list[dict], cfg: Config, progress=None) -> list[str]:
    """Classification by generation, as the reference does it: decode a few tokens after each prompt."""
    reserve = eval_new_tokens(cfg)
    prompts = [encoder.prompt_ids(row, reserve=reserve)[0] for row in rows]
    texts = generate_texts(model, encoder.tokenizer, prompts, reserve, cfg.eval.batch_size, num_beams=cfg.eval.num_beams,
                           progress=progress)
    return [t[0] for t in texts]


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


@torch.no_grad()
def content_free_prior(model, encoder: Encoder) -> torch.Tensor:
    """Class scores for content-free inputs ("N/A", "", "[MASK]"), averaged: subtracting them calibrates the classes."""
    rows = [{c: text for c in encoder.task.template_columns} for text in ("N/A", "", "[MASK]")]
    scores = rank_scores(model, encoder, rows, batch_size=3)
    return torch.logsumexp(scores.log_softmax(-1), 0) - math.log(len(rows))
