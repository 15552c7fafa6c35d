"""The DeepSeek-V3 decoder (V3 report §2): embedding → L × [MLA, dense FFN | DeepSeekMoE] → norm → head,
plus D multi-token-prediction modules that reuse the embedding and head.

Parameter names follow the Hugging Face hub layout (DESIGN §3, docs/INTERFACES.md) so that loading and saving
is a thin key map; MTP module k lives under `mtp.{k}.` here and `model.layers.{L+k}.` in the hub.
One forward serves training (full attention, losses), scoring, and cached decoding (`cache=`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.mla import MLA, MLACache, attention_mask_for
from nanoseek.model.moe import MLP, GroupedExperts, MoE, Router
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor                       # [B, T, V]
    loss: torch.Tensor | None = None           # next-token CE over labels != -100
    mtp_loss: torch.Tensor | None = None       # mean over depths of CE_k, unscaled (0 without labels or MTP)
    balance_loss: torch.Tensor | None = None   # Σ over MoE layers of Σ_i f_i P_i, unscaled by α
    hidden_states: torch.Tensor | None = None  # [B, T, H] after the final norm


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: MLACache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, H] -> (x [B, T, H], this layer's balance loss or None for a dense layer)."""
        if cache is None and self.compiled is not None:
            return self.compiled(self, x, cos, sin, mask)
        return self.block(x, cos, sin, mask, cache)

    def block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
              cache: MLACache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, balance = self.mlp(h)
            return x + y, balance
        return x + self.mlp(h), None


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
        from nanoseek.model.mtp import MTPModule   # mtp.py builds on DecoderLayer above

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

        h = self.model.embed_tokens(input_ids)
        balance = h.new_zeros((), dtype=torch.float32)
        for layer in self.model.layers:
            h, b = layer(h, cos, sin, mask, cache)
            if b is not None:
                balance = balance + b
        if cache is not None:
            cache.length += T
        h = self.model.norm(h)
        logits = self.lm_head(h)

        loss, mtp_loss = None, balance.new_zeros(())
        if labels is not None:
            loss = self.loss_fn(logits, labels)
            if len(self.mtp):
                mtp_loss, mtp_balance = self._mtp_losses(h, input_ids, labels, cos, sin, mask)
                balance = balance + mtp_balance
        return ModelOutput(logits=logits, loss=loss, mtp_loss=mtp_loss, balance_loss=balance, hidden_states=h)

    def _mtp_losses(self, h, input_ids, labels, cos, sin, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """V3 §2.2: depth k (1-based) at position i reads h^{k-1}_i and token i+k, and predicts labels[:, i+k].
        Positions past the end get token 0 and target -100 (causal attention keeps them from leaking back)."""
        losses, balance = [], torch.zeros((), device=h.device)
        for k, module in enumerate(self.mtp, start=1):
            ids_k = F.pad(input_ids[:, k:], (0, k), value=0)                    # [B, T] token at i+k
            labels_k = F.pad(labels[:, k:], (0, k), value=-100)                 # [B, T] target of depth k
            h, b = module(h, self.model.embed_tokens(ids_k), cos, sin, mask)
            losses.append(self.loss_fn(self.lm_head(h), labels_k))
            balance = balance + b if b is not None else balance
        return torch.stack(losses).mean(), balance

    def save_pretrained(self, path, dtype=None) -> None:
        """Write the hub layout (per-expert keys, MTP as model.layers.{L+k}) with config.json."""
        from nanoseek.hf import save_pretrained

        save_pretrained(self, path, dtype)


def compile_blocks(model: DeepseekV3ForCausalLM, **compile_kwargs) -> DeepseekV3ForCausalLM:
    """Regional torch.compile for training (in place; returns the model). Each decoder layer and MTP block
    gets a compiled `block`, used whenever no KV cache is passed; layers of one kind share one graph, so the
    cost is a few compiles, not one per layer. The loss is compiled too: the fused cross-entropy reads the
    bf16 logits once and never writes fp32 log-probabilities [B·T, V]. Decoding with a cache stays eager
    (its shapes change every step). Shapes are static by default (`dynamic=False`): one compile per
    (batch, seq_len), as in pretraining. Parameters, state dict and outputs are unchanged."""
    compile_kwargs = {"dynamic": False, **compile_kwargs}
    for layer in (*model.model.layers, *model.mtp):
        layer.compiled = torch.compile(type(layer).block, **compile_kwargs)
    model.loss_fn = torch.compile(cross_entropy, **compile_kwargs)
    return model
