"""Verbs after training: merge, evaluate, generate, model preparation and the demo."""
from __future__ import annotations


def register(sub) -> None:
    """Filled in as the verbs land."""
