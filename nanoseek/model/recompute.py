"""Activation checkpointing: a decoder layer keeps only its input for the backward and runs its forward again
there, trading one extra forward per layer for the activations of all but one layer at a time (what lets a
7B dense model fine-tune at sequence lengths its activations would not otherwise fit).

Non-reentrant `torch.utils.checkpoint` (the form torch recommends: it composes with autocast, FSDP2 and
`torch.compile`, and needs no input that requires grad). A layer's forward has one side effect, the MoE
router's expert-load counter (V3 §2.1.2's bias update reads it); `recomputing()` tells it that the forward it
runs is the backward's replay, so every token is counted once.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

_replaying = False


def recomputing() -> bool:
    """True while a checkpointed layer's forward is being replayed in the backward."""
    return _replaying


@contextlib.contextmanager
def _replay():
    global _replaying
    before, _replaying = _replaying, True
    try:
        yield
    finally:
        _replaying = before


def checkpointed(fn: Callable, *args):
    """fn(*args) with its activations recomputed in the backward instead of stored."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _replay()))


def wants_checkpoint(layer: torch.nn.Module, cache) -> bool:
    """A layer checkpoints when switched on (`set_activation_checkpointing`), on the full-sequence path (a KV
    cache means generation) and when a backward can follow."""
    return layer.checkpoint and cache is None and torch.is_grad_enabled()
