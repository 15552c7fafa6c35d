"""The DeepSeek-V3 decoder (V3 report §2): embedding → L × [MLA, dense FFN | DeepSeekMoE] → norm → head,
plus D multi-token-prediction modules that reuse the embedding and head.

Parameter names follow the Hugging Face hub layout (docs/DESIGN.md §3, docs/INTERFACES.md) so that loading and saving
is a thin key map; MTP module k lives under `mtp.{k}.` here and `model.layers.{L+k}.` in the hub.
One forward serves training (full attention, losses), scoring, and cached decoding (`cache=`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import DecoderLayer, ModelOutput, cross_entropy
from nanoseek.model.cache import MLACache
from nanoseek.model.attention import attention_mask_for
from nanoseek.model.moe import GroupedExperts, Router
from nanoseek.model.mtp import MTPModule
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding


def shift_labels(labels: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T] targets of MTP depth k: position i predicts labels[:, i+k]; the last k positions get -100."""
    return F.pad(labels[:, k:], (0, k), value=-100)


class DeepseekV3Model(nn.Module):
    """The trunk: `model.` in the hub layout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class DeepseekV3ForCausalLM(nn.Module):
    loss_fn = staticmethod(cross_entropy)   # `compile_blocks` swaps in a compiled copy

    def __init__(self, cfg: ModelConfig):
        super().__init__()

        self.config = cfg
        self.model = DeepseekV3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """N(0, std) for matrices and embeddings, ones for norms, zero balancing state (HF initializer_range).
        Call again after `to_empty()` when the model was built on the meta device."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, Router)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, GroupedExperts):
                nn.init.normal_(m.gate_up_proj, std=std)
                nn.init.normal_(m.down_proj, std=std)
            elif isinstance(m, (RMSNorm, RotaryEmbedding)):
                m.reset_parameters()
            if isinstance(m, Router):
                m.e_score_correction_bias.zero_()
                m.expert_load.zero_()

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> MLACache:
        """Latent cache for decoding: [L, B, max_len, kv_lora_rank + qk_rope_head_dim] zeros."""
        cfg, w = self.config, self.lm_head.weight
        return MLACache(torch.zeros(cfg.num_hidden_layers, batch_size, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                    device=device or w.device, dtype=dtype or w.dtype))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: MLACache | None = None) -> ModelOutput:
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(T, device=input_ids.device) + past).expand(B, T)
        cos, sin = self.model.rotary_emb(position_ids)                          # [B, T, rope/2]
        mask = attention_mask_for(attention_mask, T, past, input_ids.device)

        h, balance = self.decode(self.model.embed_tokens(input_ids), cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        h = self.model.norm(h)
        logits = self.lm_head(h)

        loss, mtp_loss, mtp_losses = None, balance.new_zeros(()), None
        if labels is not None:
            loss = self.loss_fn(logits, labels)
            if len(self.mtp):
                mtp_losses = []
                for k, (h_k, b) in enumerate(self.mtp_forward(h, self.mtp_embeddings(input_ids), cos, sin, mask), 1):
                    mtp_losses.append(self.loss_fn(self.lm_head(h_k), shift_labels(labels, k)))
                    balance = balance + b
                mtp_losses = torch.stack(mtp_losses)                                # [D]
                mtp_loss = mtp_losses.mean()
        return ModelOutput(logits=logits, loss=loss, mtp_loss=mtp_loss, balance_loss=balance, hidden_states=h,
                           mtp_losses=mtp_losses)

    # The pieces of `forward`. A pipeline stage (nanoseek.parallel.pipeline) is this model with the parts
    # other stages own set to None, and runs these same pieces.

    def decode(self, h: torch.Tensor, cos, sin, mask=None, cache: MLACache | None = None):
        """h [B, T, H] through the decoder layers this model holds (None: owned by another pipeline stage)
        -> (h [B, T, H], Σ balance statistic of its MoE layers, fp32 scalar)."""
        balance = torch.zeros((), dtype=torch.float32, device=h.device)
        for layer in self.model.layers:
            if layer is None:
                continue
            h, b = layer(h, cos, sin, mask, cache)
            if b is not None:
                balance = balance + b
        return h, balance

    def mtp_embeddings(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Embeddings of the tokens i+k each MTP depth k = 1..D reads (V3 §2.2), [B, T, H] each. Positions
        past the end get token 0 (their targets are -100, and causal attention keeps them from leaking back)."""
        return [self.model.embed_tokens(F.pad(input_ids[:, k:], (0, k), value=0))
                for k in range(1, self.config.num_nextn_predict_layers + 1)]

    def mtp_forward(self, h: torch.Tensor, embs: list[torch.Tensor], cos, sin, mask=None):
        """V3 §2.2: depth k at position i reads h^{k-1}_i and the embedding of token i+k. Yields, per depth,
        (head-normed h^k [B, T, H], its balance statistic, fp32 scalar); its logits are lm_head(h^k) and its
        targets `shift_labels(labels, k)`."""
        for module, emb in zip(self.mtp, embs):
            h, b = module(h, emb, cos, sin, mask)
            yield h, (b if b is not None else torch.zeros((), dtype=torch.float32, device=h.device))
