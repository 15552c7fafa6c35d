"""Sampling a token from the logits in one pass: Gumbel-max, with the temperature-1 log-prob on the side.

Why a kernel: at a 152K vocabulary the sampler was the largest piece of a decode step after the layers
(~130 us of 1.7 ms for a Qwen2.5-0.5B-shaped model at batch 128 on an H200: a cast to fp32, a softmax, the
two-level inverse-CDF scan, a log-sum-exp, each a pass over [B, V]). Without top-k / top-p the sampling
distribution is softmax(logits / T), and the Gumbel-max trick draws from it exactly:
argmax_v(logits_v / T + G_v) with G_v = -log(-log U_v) i.i.d. Gumbel(0, 1) noise (Gumbel 1954; e.g. Maddison
et al. 2014, §2). One read of the logits gives the draw and, alongside, the log-sum-exp that the token's
temperature-1 log-prob needs (log π(v) = logit_v − logsumexp(logits)).

The uniforms are Philox draws keyed by a seed the caller draws outside the step (from its generator, so runs
replay exactly) plus the row, counted by the vocabulary index: no [B, V] noise tensor is ever stored. Each
program reduces one chunk of one row (running best perturbed value and index; running max and sum of
exponentials); a second kernel combines a row's chunks. Reads the logits once in their own dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _chunk_kernel(logits_ptr, seed_ptr, val_ptr, idx_ptr, m_ptr, s_ptr, stride_row, V, CHUNK, inv_t, C,
                  BLOCK: tl.constexpr):
    row, c = tl.program_id(0), tl.program_id(1)
    seed = tl.load(seed_ptr) + row                  # one Philox key per row: the rows' noise is independent
    base = logits_ptr + row.to(tl.int64) * stride_row
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int32)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, V)
    for off in range(start, end, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        valid = cols < end
        x = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32)
        u = tl.rand(seed, cols)                                             # [BLOCK] in [0, 1)
        y = tl.where(valid, x * inv_t - tl.log(-tl.log(u)), float("-inf"))  # u = 0 gives -inf: never drawn
        y_max = tl.max(y, 0)
        y_arg = tl.argmax(y, 0)
        best_i = tl.where(y_max > best, off + y_arg, best_i)
        best = tl.maximum(best, y_max)
        m_new = tl.maximum(m, tl.max(x, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)                # all -inf so far: no NaN
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), 0)
        m = m_new
    out = row * C + c
    tl.store(val_ptr + out, best)
    tl.store(idx_ptr + out, best_i)
    tl.store(m_ptr + out, m)
    tl.store(s_ptr + out, s)


@triton.jit
def _combine_kernel(logits_ptr, val_ptr, idx_ptr, m_ptr, s_ptr, tok_ptr, logp_ptr, stride_row, C,
                    BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    ok = c < C
    val = tl.load(val_ptr + row * C + c, mask=ok, other=float("-inf"))
    j = tl.argmax(val, 0)
    tok = tl.sum(tl.where(c == j, tl.load(idx_ptr + row * C + c, mask=ok, other=0), 0), 0)
    m = tl.load(m_ptr + row * C + c, mask=ok, other=float("-inf"))
    s = tl.load(s_ptr + row * C + c, mask=ok, other=0.0)
    m_all = tl.max(m, 0)
    m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    lse = m_ref + tl.log(tl.sum(s * tl.exp(m - m_ref), 0))
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + tok).to(tl.float32)
    tl.store(tok_ptr + row, tok.to(tl.int64))
    tl.store(logp_ptr + row, x - lse)


BLOCK = 1024
_SMS: dict[int, int] = {}


def _run(logits: torch.Tensor, seed: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, V = logits.shape
    idx = logits.device.index if logits.device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    blocks = triton.cdiv(V, BLOCK)
    chunks = max(1, min(blocks, triton.cdiv(2 * _SMS[idx], B)))     # enough programs for two per SM
    chunk = triton.cdiv(blocks, chunks) * BLOCK
    C = triton.cdiv(V, chunk)
    val = torch.empty(B, C, device=logits.device, dtype=torch.float32)
    arg = torch.empty(B, C, device=logits.device, dtype=torch.int32)
    m = torch.empty_like(val)
    s = torch.empty_like(val)
    tok = torch.empty(B, device=logits.device, dtype=torch.int64)
    logp = torch.empty(B, device=logits.device, dtype=torch.float32)
    _chunk_kernel[(B, C)](logits, seed, val, arg, m, s, logits.stride(0), V, chunk, 1.0 / temperature, C,
                          BLOCK=BLOCK, num_warps=4)
    _combine_kernel[(B,)](logits, val, arg, m, s, tok, logp, logits.stride(0), C,
                          BLOCK_C=max(16, triton.next_power_of_2(C)), num_warps=1)
    return tok, logp


# opaque under torch.compile, as nanoseek::decode_attention is: Inductor calls `_run` as it is
_op = torch.library.custom_op("nanoseek::gumbel_sample", _run, mutates_args=())
_op.register_fake(lambda logits, seed, temperature: (logits.new_empty(logits.shape[0], dtype=torch.int64),
                                                     logits.new_empty(logits.shape[0], dtype=torch.float32)))


def gumbel_sample(logits: torch.Tensor, seed: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A token per row from softmax(logits / temperature) and its temperature-1 log-prob: logits [B, V] (CUDA,
    any float dtype), seed [1] int64 (a fresh draw per call; the same seed and logits give the same tokens)
    -> tokens [B] long, log-probs [B] fp32."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _op(logits, seed, float(temperature))
