"""Split-K decode attention ("flash decoding"): one query token per row over a preallocated GQA KV cache.

Why a kernel: in a decode step every row asks one question of its whole cache, so attention is a read of the
cache and nothing else: the roofline is the cache's bytes over the memory bandwidth. SDPA's kernels are built
for long query blocks; with the few queries a decode step has per KV head (the query group of GQA) their
64-128-row tiles run mostly empty. On an H200, cuDNN spent 18-24 us a layer on a Qwen2.5-0.5B-shaped decode
step at batch 128, this kernel 9.4 (benchmarks/RESULTS.md, 2026-12-04).

Each program takes one (row, KV head) and a chunk of the slots ("split-K" over the keys): its query group [G, D]
(padded to 16 rows for the tensor cores) against BLOCK_N slots at a time, with the online softmax of
FlashAttention (running max m, running sum l, un-normalised output). With one chunk per (row, head) (the batch
fills the GPU) it writes the answer; otherwise each chunk is written and a second kernel merges them
(o = Σ_c e^{m_c - m} o_c / Σ_c e^{m_c - m} l_c). Slots outside `keep` (left padding, unfilled slots) are never
loaded, so the bytes read follow the filled length, not the cache's size.

MLA's absorbed decode (576-wide latent, 16 heads on one latent head in `small`) stays on its bmm path: this
kernel measured no faster there (7.4-15 us against 7.1-17.7 us at batch 1-128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _partial_kernel(q_ptr, k_ptr, v_ptr, keep_ptr, o_ptr, ml_ptr, out_ptr,
                    sq_b, sq_h, sq_g, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, skeep_b, so_b, so_h, so_g,
                    H, G, S, CHUNK, scale,
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                    SPLITS: tl.constexpr):
    bh, c = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + h * sq_h + g[:, None] * sq_g + d[None, :],
                mask=g[:, None] < G, other=0.0)                                                  # [BG, D]
    k_base = k_ptr + b.to(tl.int64) * sk_b + h * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + h * sv_h
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, DV], tl.float32)
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, S)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        use = tl.load(keep_ptr + b.to(tl.int64) * skeep_b + n, mask=n < end, other=0) != 0        # [BN]
        k = tl.load(k_base + n[:, None] * sk_s + d[None, :], mask=use[:, None], other=0.0)       # [BN, D]
        # (scores stay fp32 whatever float type the scale argument arrives as)
        s = tl.where(use[None, :], (tl.dot(q, tl.trans(k)) * scale).to(tl.float32), float("-inf"))  # [BG, BN]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)        # a chunk with nothing kept yet: no NaN
        p = tl.exp(s - m_ref[:, None])
        alpha = tl.exp(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * sv_s + dv[None, :], mask=use[:, None], other=0.0)      # [BN, DV]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if SPLITS == 1:                                                 # one chunk: the answer, no merge
        tl.store(out_ptr + b.to(tl.int64) * so_b + h * so_h + g[:, None] * so_g + dv[None, :],
                 (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=g[:, None] < G)
    else:
        row = bh.to(tl.int64) * SPLITS + c                                                        # [B*H, SPLITS]
        tl.store(o_ptr + (row * BLOCK_G + g[:, None]) * DV + dv[None, :], acc)
        tl.store(ml_ptr + (row * 2) * BLOCK_G + g, m_i)
        tl.store(ml_ptr + (row * 2 + 1) * BLOCK_G + g, l_i)


@triton.jit
def _merge_kernel(o_ptr, ml_ptr, out_ptr, so_b, so_h, so_g, H, G,
                  DV: tl.constexpr, BLOCK_G: tl.constexpr, SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    c = tl.arange(0, BLOCK_SPLITS)
    g = tl.arange(0, BLOCK_G)
    dv = tl.arange(0, DV)
    row = bh.to(tl.int64) * SPLITS + c                                                            # [BS]
    ok = c < SPLITS
    m = tl.load(ml_ptr + (row[:, None] * 2) * BLOCK_G + g[None, :], mask=ok[:, None], other=float("-inf"))
    l = tl.load(ml_ptr + (row[:, None] * 2 + 1) * BLOCK_G + g[None, :], mask=ok[:, None], other=0.0)
    m_all = tl.max(m, 0)                                                                          # [BG]
    w = tl.exp(m - tl.where(m_all == float("-inf"), 0.0, m_all)[None, :])                         # [BS, BG]
    total = tl.sum(w * l, 0)
    acc = tl.zeros([BLOCK_G, DV], tl.float32)
    for i in tl.static_range(SPLITS):
        o = tl.load(o_ptr + ((bh.to(tl.int64) * SPLITS + i) * BLOCK_G + g[:, None]) * DV + dv[None, :])
        wi = tl.sum(tl.where(c[:, None] == i, w, 0.0), 0)                                         # [BG]
        acc += wi[:, None] * o
    out = acc / total[:, None]
    tl.store(out_ptr + b.to(tl.int64) * so_b + h * so_h + g[:, None] * so_g + dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g[:, None] < G)


_SMS: dict[int, int] = {}
BLOCK_N, WARPS, STAGES = 64, 4, 3   # measured best on an H200 for head dim 64 (benchmarks/RESULTS.md, 2026-12-04)


def _plan(B: int, H: int, S: int, device: torch.device) -> tuple[int, int]:
    """(chunk, splits): one chunk per (row, head) once B*H programs fill the GPU, else enough chunks to."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    blocks = triton.cdiv(S, BLOCK_N)
    splits = max(1, min(blocks, triton.cdiv(_SMS[idx], B * H), 64))
    chunk = triton.cdiv(blocks, splits) * BLOCK_N
    return chunk, triton.cdiv(S, chunk)


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    B, H, G, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    block_g = max(16, triton.next_power_of_2(G))
    chunk, splits = _plan(B, H, S, q.device)
    out = torch.empty(B, H, G, Dv, device=q.device, dtype=q.dtype)
    n_part = B * H * splits * block_g if splits > 1 else 1
    o_part = torch.empty(n_part * Dv, device=q.device, dtype=torch.float32)
    ml = torch.empty(n_part * 2, device=q.device, dtype=torch.float32)
    _partial_kernel[(B * H, splits)](
        q, k, v, keep, o_part, ml, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), keep.stride(0), out.stride(0), out.stride(1),
        out.stride(2), H, G, S, chunk, scale, D=D, DV=Dv, BLOCK_G=block_g, BLOCK_N=BLOCK_N, SPLITS=splits,
        num_warps=WARPS, num_stages=STAGES)
    if splits > 1:
        _merge_kernel[(B * H,)](o_part, ml, out, out.stride(0), out.stride(1), out.stride(2), H, G, DV=Dv,
                                BLOCK_G=block_g, SPLITS=splits, BLOCK_SPLITS=triton.next_power_of_2(splits),
                                num_warps=4)
    return out


# an opaque op under torch.compile: Inductor calls `_run` as it is (tracing into the Triton launches instead, its
# own wrapper around them measured 1.4x slower at batch 128)
_op = torch.library.custom_op("nanoseek::decode_attention", _run, mutates_args=())
_op.register_fake(lambda q, k, v, keep, scale: q.new_empty(*q.shape[:3], v.shape[3]))


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `decode_attention` takes these operands: CUDA, a 16-bit cache, power-of-two head dims <= 256,
    at most 64 queries per KV head, unit-stride head dims."""
    return (q.is_cuda and k.dtype in (torch.bfloat16, torch.float16) and v.dtype == k.dtype
            and _pow2(q.shape[-1]) and _pow2(v.shape[-1]) and max(q.shape[-1], v.shape[-1]) <= 256
            and q.shape[2] <= 64 and k.stride(-1) == 1 and v.stride(-1) == 1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale over the slots where keep) · v: q [B, H, G, D], k [B, H, S, D], v [B, H, S, Dv],
    keep [B|1, S] (bool or integer, nonzero = attend; at least one per row) -> [B, H, G, Dv] in k's dtype."""
    B, S = q.shape[0], k.shape[2]
    q = q.to(k.dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    keep = keep.expand(B, S)
    if keep.stride(-1) != 1:
        keep = keep.contiguous()
    return _op(q, k, v, keep, float(scale))
