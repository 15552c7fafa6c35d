"""What the two attentions (MLA in mla.py, GQA in dense.py) share: the SDPA mask of a forward over a KV cache,
SDPA itself (`sdpa`: which kernel a masked call takes), and a GQA decode step's attention through the split-K
kernel where it applies (nanoseek.kernels.decode_attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


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


# A masked call (left-padded prompts, RL and reward-model batches, a forward over a KV cache) has lengths that
# change from call to call. cuDNN's attention, first in torch's order on Hopper, builds an execution plan for
# every new shape and compiles its kernels at run time: on an H200 each new padded length cost a GRPO step ~2 s
# (3 of 8 steps 3x slower) until the driver's kernel cache held it (benchmarks/RESULTS.md). So masked calls run
# without cuDNN (switched off, not put last: torch 2.11 re-applies its cuDNN-first order at the first call); the
# memory-efficient kernel takes any length with no plan to build. Unmasked (causal) calls, pretraining's fixed
# shapes, keep torch's order and cuDNN's speed.
_VARIABLE_LENGTH = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         scale: float | None = None) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k [B, Hkv, S, D], v [B, Hkv, S, Dv] (Hkv divides H: grouped-query heads,
    query head h reads k/v head h // (H/Hkv)): causal when mask is None, else under the boolean `mask` from
    `attention_mask_for` -> [B, H, T, Dv]. On CUDA a masked call runs the memory-efficient kernel (see
    _VARIABLE_LENGTH), with the k/v heads repeated for it (it takes no grouped heads)."""
    gqa = k.shape[1] != q.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if gqa:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    with sdpa_kernel(_VARIABLE_LENGTH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


DECODE_KERNEL = True    # the split-K Triton kernel for GQA decode steps on CUDA; False = SDPA (A/B)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A GQA decode step's attention with SDPA's default scale 1/sqrt(D): q [B, H, G, D] (the G query heads of
    each KV head as the queries of one head, so the cache is read once per KV head), k [B, H, S, D],
    v [B, H, S, Dv], mask from `attention_mask_for` ([B|1, 1, 1, S] bool, or None: every slot) -> [B, H, G, Dv].
    The split-K kernel on CUDA where it applies; SDPA elsewhere (CPU, an fp32 cache, head dims that are not powers
    of two, DECODE_KERNEL off)."""
    if DECODE_KERNEL and q.is_cuda:
        from nanoseek.kernels import decode_attention as kernel    # lazily: Triton is a GPU install's package
        if kernel.supports(q, k, v):
            keep = mask[:, 0, 0] if mask is not None else torch.ones(1, k.shape[2], dtype=torch.bool,
                                                                      device=q.device)
            return kernel.decode_attention(q, k, v, keep, q.shape[-1] ** -0.5)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
