"""Regional torch.compile for training: each decoder block and the loss, never the decode path.

Compiling the whole model would trace the KV-cache decode too (its shapes change every step) and rename every
parameter (`_orig_mod.`); compiling the functions a layer calls keeps modules, state dicts and checkpoints those of
the eager model, and layers of one kind share one graph.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.model.block import cross_entropy


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
    model.loss_fn = torch.compile(cross_entropy, **compile_kwargs)
    return model
