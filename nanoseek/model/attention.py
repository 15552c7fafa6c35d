"""What the two attentions (MLA in mla.py, GQA in dense.py) share: the SDPA mask of a forward over a KV cache;
and a GQA decode step's attention through the split-K kernel where it applies (nanoseek.kernels.decode_attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_mask_for(attention_mask: torch.Tensor | None, T: int, past: int,
                       device: torch.device) -> torch.Tensor | None:
    """Boolean SDPA mask [B|1, 1, T, past+T]: query t (slot past+t) sees slot s <= past+t that is a real token.

    None when plain causal attention over T keys suffices (SDPA's is_causal). A query always sees itself, so
    rows of left padding stay finite (their outputs are never used)."""
    if attention_mask is None and past == 0:
        return None
    q_slot = torch.arange(T, device=device)[:, None] + past                    # [T, 1]
    k_slot = torch.arange(past + T, device=device)[None, :]                    # [1, S]
    allowed = (k_slot <= q_slot)[None, None]                                    # [1, 1, T, S]
    if attention_mask is not None:
        allowed = (allowed & attention_mask[:, None, None, :].bool()) | (k_slot == q_slot)
    return allowed


DECODE_KERNEL = True    # the split-K Triton kernel for GQA decode steps on CUDA; False = SDPA (A/B)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A GQA decode step's attention with SDPA's default scale 1/sqrt(D): q [B, H, G, D] (the G query heads of each KV head as the queries of one
    head, so the cache is read once per KV head), k [B, H, S, D], v [B, H, S, Dv], mask from `attention_mask_for`
    ([B|1, 1, 1, S] bool, or None: every slot) -> [B, H, G, Dv]. The split-K kernel on CUDA where it applies;
    SDPA elsewhere (CPU, an fp32 cache, head dims that are not powers of two, DECODE_KERNEL off)."""
    if DECODE_KERNEL and q.is_cuda:
        from nanoseek.kernels import decode_attention as kernel    # lazily: Triton is a GPU install's package
        if kernel.supports(q, k, v):
            keep = mask[:, 0, 0] if mask is not None else torch.ones(1, k.shape[2], dtype=torch.bool,
                                                                      device=q.device)
            return kernel.decode_attention(q, k, v, keep, q.shape[-1] ** -0.5)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
