"""The pieces the DeepSeek-V3 trunk, its MTP modules and the dense students share: one decoder block
(V3 §2: pre-norm MLA, then a dense FFN or DeepSeekMoE), the model output, and the masked cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.compile import block_to_run
from nanoseek.model.cache import MLACache
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MLP, MoE
from nanoseek.model.norm import RMSNorm
from nanoseek.model.recompute import checkpointed, wants_checkpoint


@dataclass
class ModelOutput:
    logits: torch.Tensor                       # [B, T, V]
    loss: torch.Tensor | None = None           # next-token CE over labels != -100
    mtp_loss: torch.Tensor | None = None       # mean over depths of CE_k, unscaled (0 without labels or MTP)
    balance_loss: torch.Tensor | None = None   # Σ over MoE layers of Σ_i f_i P_i, unscaled by α
    hidden_states: torch.Tensor | None = None  # [B, T, H] after the final norm
    mtp_losses: torch.Tensor | None = None     # [D] CE of each MTP depth (None without labels or MTP)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over labels != -100 (0, not NaN, when there are none), in float32; no host sync."""
    loss = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss / (labels != -100).sum().clamp_min(1)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + MLA(norm(x)), then + FFN(norm(x)) with FFN dense below first_k_dense_replace."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    compiled = None     # set by `compile_blocks`: compiled `DecoderLayer.block` for the full-sequence path
    checkpoint = False  # set by `set_activation_checkpointing`: recompute this block in the backward

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: MLACache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, H] -> (x [B, T, H], this layer's balance loss or None for a dense layer)."""
        block = block_to_run(self, cache)
        if wants_checkpoint(self, cache):
            return checkpointed(block, x, cos, sin, mask)
        return block(x, cos, sin, mask, cache)

    def block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
              cache: MLACache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, balance = self.mlp(h)
            return x + y, balance
        return x + self.mlp(h), None
