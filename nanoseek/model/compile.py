"""Regional torch.compile for training: each decoder block and the loss, never the decode path.

Compiling the whole model would trace the KV-cache decode too (its shapes change every step) and rename every
parameter (`_orig_mod.`); compiling the functions a layer calls keeps modules, state dicts and checkpoints those of
the eager model, and layers of one kind share one graph.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn


def block_to_run(layer: nn.Module, cache) -> Callable:
    """A decoder layer's `block` as its forward runs it: the compiled copy `compile_blocks` set, on the
    full-sequence (cache-free) path; the eager method otherwise (decoding with a KV cache, or never compiled)."""
    return functools.partial(layer.compiled, layer) if cache is None and layer.compiled is not None else layer.block


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Regional torch.compile for training (in place; returns the model): a DeepSeek-V3 model or a dense
    Llama/Qwen one (`DenseForCausalLM`: the same `layers`, `block`, `loss_fn` seams, no MTP). Each decoder layer and
    MTP block gets a compiled `block`, used whenever no KV cache is passed; layers of one kind share one graph, so the
    cost is a few compiles, not one per layer. The loss is compiled too: the fused cross-entropy reads the
    bf16 logits once and never writes fp32 log-probabilities [B·T, V]. Decoding with a cache stays eager
    (its shapes change every step). Shapes are static by default (`dynamic=False`): one compile per
    (batch, seq_len), as in pretraining. Parameters, state dict and outputs are unchanged."""
    compile_kwargs = {"dynamic": False, **compile_kwargs}
    for layer in (*model.model.layers, *getattr(model, "mtp", ())):
        layer.compiled = torch.compile(type(layer).block, **compile_kwargs)
    model.loss_fn = torch.compile(type(model).loss_fn, **compile_kwargs)     # the class's whole-logits loss
    return model
