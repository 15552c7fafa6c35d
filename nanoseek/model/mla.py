"""Multi-head latent attention (DeepSeek-V2 §2.1, V3 §2.1.1); its latent KV cache lives in cache.py.

Keys and values are compressed jointly into c_kv [kv_lora_rank] per token; the position signal rides on ONE
extra rope head k_pe [qk_rope_head_dim] shared by all heads (decoupled RoPE). Two ways to attend:

- full path (training, scoring): expand c_kv into per-head k_nope and v with W_kvb and run SDPA;
- latent path (decoding with a cache): keep only [c_kv | rotated k_pe] (576 values/token/layer for V3) and
  fold W_kvb into the computation: q_nope·k_nope = (W_uk^T q_nope)·c_kv and o = W_uv (Σ p·c_kv), so
  attention is multi-query over the latent. Both paths give the same outputs to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model import packed_linears
from nanoseek.model.attention import sdpa
from nanoseek.model.cache import MLACache
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope, softmax_scale


_CUDNN_TAKES: dict[tuple, bool] = {}


@torch.compiler.assume_constant_result
def _cudnn_takes(device_index: int, dtype: torch.dtype, qk_dim: int, v_dim: int) -> bool:
    """Whether SDPA's cuDNN backend runs causal attention with v's head dim below q/k's (Hopper and newer with
    a recent cuDNN do): then v needs no zero padding, which spends a third of the P·V FLOPs on zeros here.
    Asked once per (device, dtype, dims) on tiny tensors; a constant to torch.compile."""
    key = (device_index, dtype, qk_dim, v_dim)
    if key not in _CUDNN_TAKES:
        q = torch.zeros(1, 1, 128, qk_dim, device=torch.device("cuda", device_index), dtype=dtype)
        params = torch.backends.cuda.SDPAParams(q, q, q[..., :v_dim], None, 0.0, True, False)
        _CUDNN_TAKES[key] = bool(torch.backends.cuda.can_use_cudnn_attention(params))
    return _CUDNN_TAKES[key]


class MLA(packed_linears.Packable):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.scale = softmax_scale(cfg)
        self.q_lora = cfg.q_lora_rank is not None
        # both read the block's input: one GEMM when decoding (nanoseek.model.packed_linears)
        self.PACK = ("q_a_proj", "kv_a_proj_with_mqa") if self.q_lora else ()
        H, nh, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, nh * qk, bias=False)
        else:                                                   # low-rank query (V3): W_qb · RMSNorm(W_qa · h)
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nh * cfg.v_head_dim, H, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: MLACache | None = None) -> torch.Tensor:
        """x [B, T, H]; cos/sin [B, T, rope/2]; mask from `attention_mask_for` -> [B, T, H]."""
        B, T, _ = x.shape
        nh = self.n_heads
        if self.q_lora:
            q_a, kv_a = packed_linears.run(self, x)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        else:
            q, kv_a = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        q_nope, q_pe = q.view(B, T, nh, -1).transpose(1, 2).split([self.nope, self.rope], dim=-1)  # [B, nh, T, *]
        c_kv, k_pe = kv_a.split([self.kv_rank, self.rope], dim=-1)                                 # [B, T, r], [B, T, rope]
        c_kv = self.kv_a_layernorm(c_kv)
        cos, sin = cos[:, None], sin[:, None]                                                    # [B, 1, T, rope/2]
        q_pe = apply_rope(q_pe, cos, sin)                                                        # [B, nh, T, rope]
        k_pe = apply_rope(k_pe[:, None], cos, sin)                                               # [B, 1, T, rope]
        if cache is None:
            o = self._attend_expanded(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            o = self._attend_latent(q_nope, q_pe, c_kv, k_pe, mask, cache)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, nh * self.v_dim))

    def _attend_expanded(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Full path: per-head keys/values from c_kv; SDPA over [B, nh, T, qk] -> [B, nh, T, v]."""
        B, T, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, T, self.n_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)                   # [B, nh, T, nope], [B, nh, T, v]
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, self.n_heads, -1, -1)], dim=-1)
        qk_dim = q.shape[-1]
        if q.is_cuda:       # flash attention wants equal head dims: pad v, slice after, unless cuDNN (causal) or
                            # the memory-efficient kernel (every masked call, see attention.sdpa) takes unequal ones
            pad = (self.v_dim < qk_dim and mask is None
                   and not _cudnn_takes(q.device.index, q.dtype, qk_dim, self.v_dim))
        else:   # the CPU's fp32 flash kernel too (unpadded: the math path, T x T scores, ~25% slower at the tiny
                # shape); its bf16 backward disagreed with the math path in tests/test_parallel_equivalence.py
            pad = self.v_dim < qk_dim and q.dtype == torch.float32
        if pad:
            v = F.pad(v, (0, qk_dim - self.v_dim))
        o = sdpa(q, k, v, mask, self.scale)
        return o[..., :self.v_dim] if pad else o

    def _attend_latent(self, q_nope, q_pe, c_kv, k_pe, mask, cache):
        """Absorbed path: multi-query attention over the cached latent [c_kv | k_pe] -> [B, nh, T, v]."""
        B, nh = q_nope.shape[0], self.n_heads
        w_kvb = self.kv_b_proj.weight.view(nh, self.nope + self.v_dim, self.kv_rank)
        w_uk, w_uv = w_kvb[:, :self.nope], w_kvb[:, self.nope:]                 # [nh, nope, r], [nh, v, r]
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)                      # [B, nh, T, r]
        latent = cache.update(self.layer_idx, torch.cat([c_kv, k_pe[:, 0]], dim=-1)).to(q_lat.dtype)  # [B, S, r+rope]
        S = latent.shape[1]
        if q_lat.shape[2] == 1:
            # one query per row (a decode step): the nh query heads are the "queries" of ONE shared latent head,
            # so each row's cache is read once (SDPA over the head-expanded latent may copy it nh times)
            q = torch.cat([q_lat, q_pe], dim=-1)[:, :, 0]                        # [B, nh, r+rope]
            s = torch.bmm(q, latent.transpose(1, 2)).float() * self.scale       # [B, nh, S]
            if mask is not None:
                s = s.masked_fill(~mask[:, :, 0], float("-inf"))                # mask [B|1, 1, 1, S]
            o_lat = torch.bmm(s.softmax(-1).to(latent.dtype), latent[..., :self.kv_rank])   # [B, nh, r]
            return torch.einsum("bhr,hdr->bhd", o_lat, w_uv)[:, :, None]         # [B, nh, 1, v]
        kv = latent[:, None].expand(B, nh, S, latent.shape[-1])
        o_lat = sdpa(torch.cat([q_lat, q_pe], dim=-1), kv, kv[..., :self.kv_rank], mask, self.scale)
        return torch.einsum("bhtr,hdr->bhtd", o_lat, w_uv)                        # [B, nh, T, v]
