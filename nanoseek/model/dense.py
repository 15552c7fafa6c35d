"""Llama / Qwen2 / Qwen3-style dense decoder: the distillation student and the shape of most user checkpoints.

R1 §2.4 distils the MoE teacher into small dense models, so the student is the plain decoder everyone
already ships: grouped-query attention (GQA, n_kv < n_heads key/value heads shared by groups of query
heads), SwiGLU MLP, pre-RMSNorm, RoPE on half-split pairs (`rotate_half`, as Llama / Qwen2 checkpoints
are laid out — DeepSeek's MLA uses interleaved pairs instead), optional q/k/v bias (Qwen2), per-head q/k
RMSNorm before RoPE (Qwen3) and optional tied embeddings. It speaks the same interface as
`DeepseekV3ForCausalLM` (docs/INTERFACES.md): aligned labels, the same output fields (mtp_loss and
balance_loss are zero), a preallocated KV cache for rollouts, and the hub layout `nanoseek.hf.save_pretrained`
writes, so the trainer, the RL engine and `hf.py` never ask which one they hold.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from nanoseek.config import DenseConfig
from nanoseek.errors import UserError
from nanoseek.model import packed_linears
from nanoseek.model.attention import attention_mask_for, decode_attention, sdpa
from nanoseek.model.block import ModelOutput, cross_entropy
from nanoseek.model.cache import DenseCache
from nanoseek.model.compile import block_to_run
from nanoseek.model.moe import MLP
from nanoseek.model.norm import RMSNorm
from nanoseek.model.recompute import checkpointed, wants_checkpoint
from nanoseek.model.rope import rope_frequencies


def rope_inv_freq(cfg: DenseConfig, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the cos/sin multiplier, with the scalings Llama / Qwen2 ship."""
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in ("default", "yarn"):
        return rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device)
    inv, _ = rope_frequencies(cfg.head_dim, cfg.rope_theta, None, device)
    try:
        if kind == "linear":  # position interpolation: every frequency slowed by `factor`
            return inv / rs["factor"], 1.0
        if kind == "llama3":  # Llama 3.1: long wavelengths / factor, short ones kept, a linear ramp between
            factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
            ramp = ((rs["original_max_position_embeddings"] * inv / (2 * math.pi) - lo) / (hi - lo)).clamp(0, 1)
            return (1 - ramp) * inv / factor + ramp * inv, 1.0
    except KeyError as e:
        raise UserError(f"dense model: rope_scaling {kind!r} needs {e.args[0]!r}; add it to config.json") from None
    raise UserError(f"dense model: rope_scaling type {kind!r} is not supported; use default, linear, llama3 or yarn")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DenseAttention(packed_linears.Packable):
    PACK = ("q_proj", "k_proj", "v_proj")   # one GEMM when decoding (nanoseek.model.packed_linears)

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        # Llama and Qwen3 put attention_bias on o_proj too; Qwen2's o_proj never has one
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias and cfg.model_type != "qwen2")
        if cfg.qk_norm:                 # Qwen3: one [head_dim] gain shared by all heads of q (of k)
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, cache: DenseCache | None, layer: int):
        B, T, _ = x.shape
        q, k, v = packed_linears.run(self, x)
        q = q.view(B, T, self.n_heads, self.head_dim)                           # [B, T, nh, hd]
        k = k.view(B, T, self.n_kv, self.head_dim)                              # [B, T, nkv, hd]
        if self.q_norm is not None:     # over each head's hd features, before RoPE (as Qwen3Attention)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                             # [B, nh | nkv, T, hd]
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:  # write the T new slots, attend over everything filled so far
            k, v = cache.update(layer, k, v)
        if T == 1 and cache is not None:
            # a decode step: each kv head's query group as the queries of one head, so the cache is read once
            # per kv head (SDPA's enable_gqa with a mask can fall back to repeating k/v per query head)
            y = decode_attention(q.view(B, self.n_kv, -1, self.head_dim), k, v, mask)
            return self.o_proj(y.reshape(B, 1, -1))                             # heads in (kv, group) order
        y = sdpa(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DenseDecoderLayer(nn.Module):
    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DenseAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    compiled = None     # set by `compile_blocks`: compiled `DenseDecoderLayer.block` for the full-sequence path
    checkpoint = False  # set by `set_activation_checkpointing`: recompute this block in the backward

    def forward(self, h, cos, sin, mask, cache, layer):
        block = block_to_run(self, cache)
        if wants_checkpoint(self, cache):
            return checkpointed(block, h, cos, sin, mask, None, layer)
        return block(h, cos, sin, mask, cache, layer)

    def block(self, h, cos, sin, mask, cache, layer):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class DenseModel(nn.Module):
    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DenseDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DenseForCausalLM(nn.Module):
    loss_fn = staticmethod(cross_entropy)   # `compile_blocks` swaps in a compiled copy, `train.loss_chunk` a
                                            # chunked one

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        rope_inv_freq(cfg)  # reject an unsupported rope_scaling at construction, not at the first forward
        self.config = cfg
        self.model = DenseModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """N(0, std) for matrices and embeddings (HF initializer_range), zero biases, ones for norms.
        Call again after `to_empty()` when the model was built on the meta device."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                m.reset_parameters()

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> DenseCache:
        w = self.lm_head.weight
        c = self.config
        shape = (c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim)
        device, dtype = device or w.device, dtype or w.dtype
        return DenseCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None, cache=None) -> ModelOutput:
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        h = self.model.embed_tokens(input_ids)                                  # [B, T, H]

        inv_freq, scale = rope_inv_freq(self.config, h.device)
        freqs = position_ids[..., None].float() * inv_freq                      # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                        # [B, 1, T, hd], half-split pairs
        cos, sin = (emb.cos() * scale).to(h.dtype), (emb.sin() * scale).to(h.dtype)

        mask = attention_mask_for(attention_mask, T, past, h.device)            # None = plain causal
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        h = self.model.norm(h)
        logits = self.lm_head(h)
        zero = logits.new_zeros(())
        loss = self.loss_fn(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, mtp_loss=zero, balance_loss=zero, hidden_states=h)
