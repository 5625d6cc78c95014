"""Liger's Triton kernels for the training step on a GPU (`train.liger_kernels`): RMSNorm, SwiGLU and RoPE patched into
transformers' Llama-family classes, and the loss as Liger's fused linear cross-entropy, which never materializes the
logits: the final norm's output at the positions that predict a label goes through the LM head's weight and the
cross-entropy in one kernel, chunk by chunk.

Needs a CUDA GPU and `pip install liger-kernel` (Triton); refused elsewhere, and under ZeRO-3 (the head's weight is
partitioned there, and the fused loss reads it outside the head's own forward), before anything loads.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch

PATCHES = {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral",
           "qwen2": "apply_liger_kernel_to_qwen2"}


def check_liger(enabled: bool, model_type: Optional[str], zero_stage: Optional[int]) -> Optional[str]:
    """Why train.liger_kernels cannot work in this run, or None."""
    if not enabled:
        return None
    if importlib.util.find_spec("liger_kernel") is None:
        return "train.liger_kernels: needs liger-kernel (pip install liger-kernel) and a CUDA GPU"
    if not torch.cuda.is_available():
        return "train.liger_kernels: Liger's kernels are Triton kernels for a CUDA GPU; this machine has none"
    if model_type is not None and model_type not in PATCHES:
        return f"train.liger_kernels: for {', '.join(PATCHES)} models; this one is {model_type}"
    if zero_stage == 3:
        return "train.liger_kernels: ZeRO-0 to ZeRO-2 (under ZeRO-3 the LM head's weight is partitioned); use ZeRO-2"
    return None


def apply_liger(model_type: str) -> None:
    """Patch Liger's RMSNorm, SwiGLU and RoPE into transformers' classes for `model_type` (before the model loads)."""
    import liger_kernel.transformers as liger

    getattr(liger, PATCHES[model_type])(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)


def liger_loss() -> Callable:
    """Liger's fused linear cross-entropy, one loss per target row: f(head weight, hidden [N, h], targets [N])."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="none")


class FusedHeadLoss:
    """The training loss without logits: the final norm's output is caught by a hook, the LM head computes nothing
    (no position is kept), and `loss(weight, hidden, targets)` gives each label token's cross-entropy."""

    def __init__(self, model, loss: Callable):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.head = base.get_output_embeddings()
        self.loss = loss
        self.hidden = None
        base.model.norm.register_forward_hook(self._catch)

    def _catch(self, module, args, output):
        self.hidden = output

    def __call__(self, model, inputs: dict, targets: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros((wanted.shape[0], wanted.shape[1] + 1), dtype=torch.bool, device=wanted.device)
        model(**inputs, logits_to_keep=keep)
        hidden = self.hidden[:, :-1][wanted]
        self.hidden = None
        return self.loss(self.head.weight, hidden, targets[wanted])
