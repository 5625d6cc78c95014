"""Attention for padding-free batches: the rows of one packed sequence kept apart.

`attend_row_by_row` registers `row_by_row_attention` with transformers: a padding-free batch (its row boundaries in
`cu_seq_lens_q`, as flash-attention's varlen kernels take them) attends within each row, through torch's
flash-attention varlen kernel on a GPU in bf16 / fp16 and one row at a time elsewhere; every other batch (padded
evaluation, a scoring tree's 4D mask, generation) goes through SDPA unchanged. `check_padding_free` proves, before the
first step, that the model keeps the rows apart at all.
"""
from __future__ import annotations

import math

import torch

from peft_tuner import runtime

ROW_BY_ROW = "sdpa_row_by_row"


def row_by_row_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers' SDPA attention, except for a padding-free batch, whose rows are named by `cu_seq_lens_q` (row
    boundaries in the one sequence, as for flash-attention's varlen kernels): there each row attends causally to
    itself alone. On a GPU in bf16 / fp16, torch's flash-attention varlen kernel takes all rows in one call; elsewhere
    the rows run one at a time. SDPA alone would attend over the whole sequence under a block-diagonal mask, work
    that grows with the square of the whole length (8 rows of 200 tokens: 1600^2 against 8 x 200^2, 8 times more; a
    SmolLM2 forward + backward of such a batch took 10.56 s with the mask, 5.61 s row by row, on 2 CPU cores; for rows
    of 30 tokens 1.01 s and 0.94 s)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.is_cuda:
        if max_length_q is not None and varlen_fits(query, kwargs.get("dropout", 0.0)):
            return _varlen_attention(query, key, value, cu_seq_lens_q, max_length_q, kwargs.get("scaling")), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # the block-diagonal mask
    bounds = cu_seq_lens_q.tolist()
    rows = [_row_attention(sdpa_attention_forward, module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], **kwargs)
            for a, b in zip(bounds, bounds[1:])]
    return torch.cat(rows, dim=1), None  # [1, tokens, heads, head_dim], as SDPA returns it


def _varlen_kernel():
    """torch's flash-attention varlen function (torch 2.10 and later), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_fits(query: torch.Tensor, dropout: float = 0.0) -> bool:
    """torch's varlen kernel can take this attention: a CUDA tensor in bf16 / fp16, no attention dropout."""
    return (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and not dropout
            and _varlen_kernel() is not None)


def _varlen_attention(query, key, value, cu_seq_lens, max_length: int, scaling):
    """Causal attention within each row of a padding-free batch in one flash-attention varlen call. query / key /
    value: [1, heads, tokens, head_dim] as transformers passes them; returns [1, tokens, heads, head_dim]. torch 2.10
    names causality `is_causal`, later versions a window (-1, 0); where the function takes no `enable_gqa`, grouped
    key / value heads are repeated to the query's."""
    import inspect

    varlen_attn = _varlen_kernel()
    parameters = inspect.signature(varlen_attn).parameters
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [tokens, heads, head_dim]
    options = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in parameters:
            options["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if scaling is not None:
        options["scale"] = scaling
    cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q, k, v, cu, cu, int(max_length), int(max_length), **options).unsqueeze(0)


def _row_attention(sdpa_attention_forward, module, query, key, value, **kwargs):
    """One row's causal SDPA. With the CPU tuning's short_rows_fp32, a bf16 / fp16 row of up to that many tokens runs
    in fp32: the CPU's half-precision flash-attention backward is slow on short rows (forward + backward of 9 query
    and 3 key/value heads of 64 on 2 cores: 40 tokens 842 us in bf16, 239 us in fp32; 80 tokens 1,404 / 546 us;
    200 tokens 3,413 / 2,855 us; 400 tokens even, 9,882 / 10,334 us)."""
    up_to = runtime.cpu_tuning().short_rows_fp32
    if up_to and query.dtype in (torch.bfloat16, torch.float16) and query.shape[2] <= up_to:
        with torch.autocast(query.device.type, enabled=False):  # autocast would cast them back
            out = sdpa_attention_forward(module, query.float(), key.float(), value.float(), None, **kwargs)[0]
        return out.to(query.dtype)
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)[0]


def attend_row_by_row(model) -> bool:
    """Padding-free training on SDPA models: each row attends to itself alone (row_by_row_attention: one row at a
    time on the CPU, flash-attention varlen on a GPU in bf16 / fp16, else SDPA's block-diagonal mask). Other batches
    (padded evaluation, a scoring tree's 4D mask, generation) go through SDPA unchanged. False where the model does
    not use SDPA (flash-attention takes the same row boundaries itself; eager is left alone)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) not in ("sdpa", ROW_BY_ROW):
        return False
    AttentionInterface.register(ROW_BY_ROW, row_by_row_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ROW_BY_ROW, sdpa_mask)  # padded batches get SDPA's masks
    base.set_attn_implementation(ROW_BY_ROW)
    return True


def packed_attention_name(rows_apart: bool, device: torch.device, dtype: torch.dtype) -> str:
    """What attention a padding-free batch gets, for the run's start record: after attend_row_by_row (`rows_apart`)
    on `device`, computing in `dtype`."""
    if not rows_apart:
        return "mask"
    if device.type == "cuda":
        return "flash varlen" if dtype in (torch.bfloat16, torch.float16) and _varlen_kernel() is not None else "mask"
    return "row by row"


def check_padding_free(model, examples: list[dict], pad: int, dtype: str, device: torch.device) -> None:
    """Padding-free batches rely on the model telling the rows of one sequence apart by their positions (Llama-style
    and GPT-2 models do; BLOOM's ALiBi takes no positions, and OPT builds a mask of its own). Checked once, before the
    first step, on the first rows: their loss as one sequence must be their loss as a padded batch (relative 1e-5 in
    fp32, as the tests measure; a looser 5e-3 in bf16 / fp16, chosen, not measured)."""
    from peft_tuner.config import ConfigError
    from peft_tuner.data import collate, collate_padding_free
    from peft_tuner.losses import token_loss_sum

    rows = examples[:4]
    if len(rows) < 2:
        return
    was_training = model.training
    model.eval()
    with torch.no_grad():
        padded, flat = (float(token_loss_sum(model, batch, True, device))
                        for batch in (collate(rows, pad), collate_padding_free(rows)))
    model.train(was_training)
    if not math.isclose(padded, flat, rel_tol=1e-5 if dtype == "fp32" else 5e-3):
        raise ConfigError(f"train.padding_free: this {model.config.model_type} model lets the rows of one sequence see "
                          f"each other (their loss {flat:.6f} against {padded:.6f} padded): it does not restart attention "
                          f"where the positions restart; set train.padding_free=false")
