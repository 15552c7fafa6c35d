"""Multi-token prediction module (V3 §2.2).

Depth k keeps the causal chain: at position i it combines the previous depth's representation h^{k-1}_i with
the embedding of token t_{i+k}, h' = W_eh · [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)] (embedding first, as
the released checkpoints are laid out), runs one transformer block, and predicts t_{i+k+1} through the SHARED
output head after its own norm (`shared_head.norm`). h^0 is the trunk's final normed hidden state and each
depth passes on its head-normed output, as inference engines feed these checkpoints. The block has index
num_hidden_layers + k - 1, so it is an MoE block whenever that index is; embedding and head are the trunk's.
The wiring over depths lives in `DeepseekV3ForCausalLM.mtp_forward` (the loss in its `forward`).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import DecoderLayer
from nanoseek.model.norm import RMSNorm


class SharedHead(nn.Module):
    """The hub's `shared_head`: its own final norm (the projection is the trunk's lm_head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(DecoderLayer):
    """A decoder layer (same parameter names) plus enorm, hnorm, eh_proj and shared_head.norm."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h_prev [B, T, H] (depth k-1), emb [B, T, H] (tokens i+k) -> (head-normed h^k [B, T, H], balance)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        x, balance = super().forward(x, cos, sin, mask)
        return self.shared_head.norm(x), balance
