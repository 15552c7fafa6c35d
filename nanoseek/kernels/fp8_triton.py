"""Triton kernels for FP8 training on Hopper (V3 §3.3): fused fine-grained quantisation and the grouped
expert GEMMs with FP32 promotion every 128 elements of K.

Why these kernels exist:
- quantisation is memory-bound; one pass per tensor (read once, write e4m3 + scales in the layout the GEMM
  wants, transposed where the GEMM needs it) keeps its cost below the GEMM time it saves;
- torch has no block-scaled grouped GEMM on Hopper, so the MoE experts get one here: every 128-row tile of the
  expert-sorted tokens belongs to one expert (a "tile plan", built on the GPU without a host sync), and each
  128-wide K block is multiplied on the tensor cores in e4m3 and then scaled and added into an FP32 accumulator
  (DeepSeek's promotion, V3 §3.3.2 "increasing accumulation precision").

Layouts (every feature dim padded with zeros to a multiple of 128; Kb = K/128 blocks):
  rows   (1x128, activations for Fprop/Dgrad): q [M, Kp] e4m3, s [Kb, M] fp32 (s[k//128, m])
  cols   (128x1 per tile, activations for Wgrad): qT [Cp, T*128] e4m3 (tile t owns columns t*128..t*128+127,
         holding rows row0[t]..rowend[t]-1, zeros after), s [T, Cp]
  blocks (128x128, weights): q [E, Np, Kp], qT [E, Kp, Np], s [E, Nb, round4(Kb)], sT [E, Kb, round4(Nb)]
         (scale rows padded to a multiple of 4 because cuBLAS wants that layout)
The float reference of every kernel is in nanoseek/train/fp8.py (`_ref_*`); tests/test_fp8.py pins them equal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128
_B = tl.constexpr(BLOCK)    # the same edge, as kernels must see it
_E4M3_MAX = tl.constexpr(448.0)
_INV_E4M3_MAX = tl.constexpr(1.0 / 448.0)     # scale = amax · fp32(1/448), exactly as torch computes it
_AMAX_EPS = tl.constexpr(1e-12)
_FP32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _scale(amax):
    """amax -> decode scale amax/448, never 0, inf or NaN (matches fp8.scale_from_amax)."""
    amax = tl.where(amax == amax, amax, 0.0)                                   # NaN -> 0
    amax = tl.minimum(tl.maximum(amax, _AMAX_EPS), _FP32_MAX)
    return amax * _INV_E4M3_MAX


@triton.jit
def _cast(x, s):
    y = tl.clamp(tl.math.div_rn(x, s), -_E4M3_MAX, _E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
    return y.to(tl.float8e4nv)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk, BLOCK_M: tl.constexpr):
    pid_m, kb = tl.program_id(0), tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = kb * _B + tl.arange(0, _B)
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0).to(tl.float32)   # [BLOCK_M, 128]
    s = _scale(tl.max(tl.abs(x), axis=1))                                               # [BLOCK_M]
    kp = tl.num_programs(1) * _B
    tl.store(q_ptr + rm[:, None] * kp + rk[None, :], _cast(x, s[:, None]), mask=rm[:, None] < M)
    tl.store(s_ptr + kb * M + rm, s, mask=rm < M)


@triton.jit
def _quant_cols_kernel(x_ptr, qt_ptr, s_ptr, row0_ptr, rowend_ptr, C, Cp, n_cols, stride_xm, stride_xc,
                       BLOCK_C: tl.constexpr):
    cb, t = tl.program_id(0), tl.program_id(1)
    row0 = tl.load(row0_ptr + t)
    rowend = tl.load(rowend_ptr + t)
    if row0 >= rowend:                                                                  # unused tile
        return
    offs = tl.arange(0, _B)
    rm = (row0 + offs).to(tl.int64)
    rc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rc[None, :] * stride_xc,
                mask=(rm[:, None] < rowend) & (rc[None, :] < C), other=0.0).to(tl.float32)  # [128, BLOCK_C]
    s = _scale(tl.max(tl.abs(x), axis=0))                                               # [BLOCK_C]
    cols = t.to(tl.int64) * _B + offs                # transposed store by addressing: see _quant_blocks_kernel
    tl.store(qt_ptr + rc.to(tl.int64)[None, :] * n_cols + cols[:, None], _cast(x, s[None, :]), mask=rc[None, :] < Cp)
    tl.store(s_ptr + t * Cp + rc, s, mask=rc < Cp)


@triton.jit
def _quant_blocks_kernel(w_ptr, q_ptr, qt_ptr, s_ptr, st_ptr, N, K, Np, Kp, stride_we, stride_wn, stride_wk,
                         s_ld, st_ld):
    kb, nb, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = tl.arange(0, _B)
    rn = (nb * _B + offs).to(tl.int64)
    rk = (kb * _B + offs).to(tl.int64)
    e64 = e.to(tl.int64)
    w_blk = w_ptr + e64 * stride_we
    w = tl.load(w_blk + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
                mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0).to(tl.float32)      # [128 n, 128 k]
    s = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0))
    tl.store(q_ptr + e64 * Np * Kp + rn[:, None] * Kp + rk[None, :], _cast(w, s))
    # Wᵀ block by a transposed re-load, not tl.trans of the e4m3 tile: with fp32 weights Triton 3.6 stored
    # tl.trans(q) wrongly on an H100 (2026-11-22); the block is L2-hot, so the second read is cheap.
    wt = tl.load(w_blk + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                 mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0).to(tl.float32)    # [128 k, 128 n]
    tl.store(qt_ptr + e64 * Kp * Np + rk[:, None] * Np + rn[None, :], _cast(wt, s))
    nbs, kbs = Np // _B, Kp // _B
    tl.store(s_ptr + (e * nbs + nb) * s_ld + kb, s)
    tl.store(st_ptr + (e * kbs + kb) * st_ld + nb, s)
    pad = tl.arange(0, 4)                                   # zero the cuBLAS padding of the last scale column
    if kb == kbs - 1:
        tl.store(s_ptr + (e * nbs + nb) * s_ld + kbs + pad, tl.zeros((4,), tl.float32), mask=kbs + pad < s_ld)
    if nb == nbs - 1:
        tl.store(st_ptr + (e * kbs + kb) * st_ld + nbs + pad, tl.zeros((4,), tl.float32), mask=nbs + pad < st_ld)


_GEMM_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((8, 3), (8, 4), (8, 5), (4, 3), (4, 4))]


@triton.autotune(configs=_GEMM_CONFIGS, key=["n_out", "k_blocks"])
@triton.jit
def _gmm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, tile_e_ptr, row0_ptr, rowend_ptr,
                n_out, k_blocks, a_rows, stride_cm, stride_be, stride_bse, bs_ld):
    """c[rows of tile t, n block] = sum over K blocks of (a_q · b_q[e]^T) · s_a[row] · s_b[e, n block, k block]."""
    nb, t = tl.program_id(0), tl.program_id(1)
    e = tl.load(tile_e_ptr + t)
    if e < 0:                                                                           # unused tile
        return
    row0 = tl.load(row0_ptr + t)
    rowend = tl.load(rowend_ptr + t)
    offs = tl.arange(0, _B)
    rm = (row0 + offs).to(tl.int64)
    m_ok = rm < rowend
    rn = nb * _B + offs
    kp = k_blocks * _B
    a_ptrs = a_ptr + rm[:, None] * kp + offs[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + rn.to(tl.int64)[:, None] * kp + offs[None, :]
    as_ptrs = as_ptr + rm
    bs_ptrs = bs_ptr + e * stride_bse + nb * bs_ld
    acc = tl.zeros((_B, _B), dtype=tl.float32)
    for kb in range(0, k_blocks):
        a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)                            # [128 rows, 128 k] e4m3
        b = tl.load(b_ptrs)                                                             # [128 n, 128 k] e4m3
        sa = tl.load(as_ptrs + kb * a_rows, mask=m_ok, other=0.0)                       # [128]
        sb = tl.load(bs_ptrs + kb)
        acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb)                              # promote to FP32
        a_ptrs += _B
        b_ptrs += _B
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (rn[None, :] < n_out))


@triton.autotune(configs=_GEMM_CONFIGS, key=["n_out", "k_out"])
@triton.jit
def _gmm_wgrad_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, tile_begin_ptr, tile_count_ptr,
                      n_out, k_out, n_pad, k_pad, n_cols, stride_ce, stride_cn):
    """c[e] = sum over the tiles of expert e of (aT_q · bT_q^T) · s_a[t, n] · s_b[t, k] (contraction over tokens)."""
    kb, nb, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0 = tl.load(tile_begin_ptr + e)
    nt = tl.load(tile_count_ptr + e)
    offs = tl.arange(0, _B)
    rn = nb * _B + offs
    rk = kb * _B + offs
    cols = t0.to(tl.int64) * _B + offs
    a_ptrs = a_ptr + rn.to(tl.int64)[:, None] * n_cols + cols[None, :]
    b_ptrs = b_ptr + rk.to(tl.int64)[:, None] * n_cols + cols[None, :]
    acc = tl.zeros((_B, _B), dtype=tl.float32)
    for i in range(0, nt):
        t = t0 + i
        a = tl.load(a_ptrs)                                                             # [128 n, 128 tokens]
        b = tl.load(b_ptrs)                                                             # [128 k, 128 tokens]
        sa = tl.load(as_ptr + t * n_pad + rn)
        sb = tl.load(bs_ptr + t * k_pad + rk)
        acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb[None, :])
        a_ptrs += _B
        b_ptrs += _B
    tl.store(c_ptr + e.to(tl.int64) * stride_ce + rn[:, None] * stride_cn + rk[None, :], acc,
             mask=(rn[:, None] < n_out) & (rk[None, :] < k_out))


def _pad(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> q [M, Kp] e4m3, s [Kb, M] fp32 (1x128 tiles: per token per 128 channels)."""
    M, K = x.shape
    kb = _pad(K) // BLOCK
    q = torch.empty(M, kb * BLOCK, device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(kb, M, device=x.device, dtype=torch.float32)
    if M:
        _quant_rows_kernel[(triton.cdiv(M, 64), kb)](x, q, s, M, K, x.stride(0), x.stride(1), BLOCK_M=64, num_warps=4)
    return q, s


def quant_cols(x: torch.Tensor, row0: torch.Tensor, rowend: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, C] -> qT [Cp, T*128] e4m3, s [T, Cp] (128x1 tiles: per channel per 128 tokens of one tile)."""
    M, C = x.shape
    T, cp = row0.numel(), _pad(C)
    qt = torch.empty(cp, T * BLOCK, device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(T, cp, device=x.device, dtype=torch.float32)
    if T:
        _quant_cols_kernel[(cp // 64, T)](x, qt, s, row0, rowend, C, cp, T * BLOCK, x.stride(0), x.stride(1),
                                          BLOCK_C=64, num_warps=4)
    return qt, s


def _round4(n: int) -> int:
    return -(-n // 4) * 4


def quant_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [E, N, K] -> q [E, Np, Kp], qT [E, Kp, Np], s [E, Nb, round4(Kb)], sT [E, Kb, round4(Nb)]."""
    E, N, K = w.shape
    np_, kp = _pad(N), _pad(K)
    nb, kb = np_ // BLOCK, kp // BLOCK
    q = torch.empty(E, np_, kp, device=w.device, dtype=torch.float8_e4m3fn)
    qt = torch.empty(E, kp, np_, device=w.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(E, nb, _round4(kb), device=w.device, dtype=torch.float32)
    st = torch.empty(E, kb, _round4(nb), device=w.device, dtype=torch.float32)
    _quant_blocks_kernel[(kb, nb, E)](w, q, qt, s, st, N, K, np_, kp, w.stride(0), w.stride(1), w.stride(2),
                                      s.shape[-1], st.shape[-1], num_warps=8)
    return q, qt, s, st


def gmm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, tile_e: torch.Tensor,
        row0: torch.Tensor, rowend: torch.Tensor, n_out: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Grouped Fprop/Dgrad: a [M, Kp] rows-quantised, b [E, Np, Kp] block-quantised -> [M, n_out]."""
    M, kp = a.shape
    c = torch.empty(M, n_out, device=a.device, dtype=out_dtype)
    T = tile_e.numel()
    if T and M:
        _gmm_kernel[(b.shape[1] // BLOCK, T)](a, a_s, b, b_s, c, tile_e, row0, rowend, n_out, kp // BLOCK, M,
                                              c.stride(0), b.stride(0), b_s.stride(0), b_s.stride(1))
    return c


def gmm_wgrad(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, tile_begin: torch.Tensor,
              tile_count: torch.Tensor, n_out: int, k_out: int) -> torch.Tensor:
    """Grouped Wgrad: aT [Np, P], bT [Kp, P] cols-quantised -> c [E, n_out, k_out] fp32."""
    np_, n_cols = a.shape
    kp = b.shape[0]
    E = tile_begin.numel()
    c = torch.empty(E, n_out, k_out, device=a.device, dtype=torch.float32)
    _gmm_wgrad_kernel[(kp // BLOCK, np_ // BLOCK, E)](a, a_s, b, b_s, c, tile_begin, tile_count, n_out, k_out, np_,
                                                     kp, n_cols, c.stride(0), c.stride(1))
    return c
