"""FP8 mixed-precision training, the DeepSeek-V3 way (V3 report §3.3).

Every GEMM of a converted Linear — Fprop y = x·Wᵀ, Dgrad dx = dy·W, Wgrad dW = dyᵀ·x — multiplies E4M3
operands with FP32 accumulation and writes bf16/fp32. What makes 3 mantissa bits enough is fine-grained
scaling with online amax (V3 §3.3.2): one scale per 1x128 tile of activations (per token, per 128 channels) and
per 128x128 block of weights, scale = amax/448, so one outlier spoils 128 values instead of a whole tensor.
Wgrad contracts over tokens, so there the activations and output gradients are regrouped into 128x1 tiles
(per channel, per 128 tokens). Master weights and their gradients stay fp32; what V3 keeps in high precision
stays out: embedding, output head, MoE gate, norms and the attention core (`convert_to_fp8`).

Two backends, chosen per device, computing the same recipe:
- "hopper" (SM90 GPU with Triton): fused Triton quantisers (nanoseek/kernels/fp8_triton.py); dense GEMMs on
  cuBLAS through torch's block-scaled `scaled_mm` (1x128 x 128x128 for Fprop/Dgrad, 1x128 x 1x128 for
  Wgrad; `DENSE_GEMM = "triton"` uses the grouped kernel instead); MoE expert GEMMs in a Triton grouped kernel.
  The quantisers and the cuBLAS path are checked against the reference once, on first use, and replaced by it
  if they disagree. Wrapped as torch custom ops, so torch.compile of the model sees them as opaque nodes.
- "emulate" (CPU, pre-Hopper GPUs): the float reference — quantise, dequantise in fp32, fp32 matmul. Same
  numbers up to fp32 summation order, far slower than bf16; tests use it to pin the numerics.

The MoE experts share the machinery: tokens arrive sorted by expert, cut into 128-row tiles that never straddle
two experts (a `TilePlan`, built on the device without a host sync), so 128x1 Wgrad tiles stay within one
expert — a dense Linear is the one-expert case.
"""

from __future__ import annotations

import itertools
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.moe import GroupedExperts

E4M3_MAX = 448.0        # largest finite float8_e4m3fn
BLOCK = 128             # tile / block edge (V3 §3.3.2)
AMAX_EPS = 1e-12        # floor on amax: an all-zero tile gets a tiny finite scale, never 0
FP8 = torch.float8_e4m3fn

# Linear layers that stay in high precision (V3 §3.3): the output head and any router/score head.
HIGH_PRECISION_NAMES = ("lm_head", "gate", "score", "value_head", "v_head")


def _pad(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _round4(n: int) -> int:
    return -(-n // 4) * 4


# ---------------------------------------------------------------------------------------------------------
# The recipe in plain torch: the reference the Triton kernels must equal bit for bit, and the CPU backend.
# Layouts are those of nanoseek/kernels/fp8_triton.py (see its docstring).
# ---------------------------------------------------------------------------------------------------------

def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Decode scale amax/448 (x ≈ q · scale), finite and > 0 for all-zero, huge, inf or NaN input. Computed as
    amax · fp32(1/448): what torch's CUDA division by a scalar does and what the Triton kernels do, on every
    device."""
    return amax.float().nan_to_num(0.0).clamp(AMAX_EPS, torch.finfo(torch.float32).max) * (1.0 / E4M3_MAX)


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def _ref_quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> q [M, Kp] e4m3, s [Kb, M]: one scale per 1x128 tile (token, 128 channels)."""
    M, K = x.shape
    kp = _pad(K)
    t = F.pad(x.float(), (0, kp - K)).view(M, kp // BLOCK, BLOCK)
    s = scale_from_amax(t.abs().amax(-1))                                       # [M, Kb]
    return _cast(t, s[..., None]).view(M, kp), s.t().contiguous()


def _ref_quant_cols(x: torch.Tensor, row0: torch.Tensor, rowend: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, C] -> qT [Cp, T*128], s [T, Cp]: one scale per 128x1 tile (channel, the ≤128 rows of tile t)."""
    M, C = x.shape
    cp, T = _pad(C), row0.numel()
    rows = row0.long()[:, None] + torch.arange(BLOCK, device=x.device)          # [T, 128]
    valid = rows < rowend.long()[:, None]
    xt = x.float()[rows.clamp(0, max(M - 1, 0))] if M else x.new_zeros(T, BLOCK, C, dtype=torch.float32)
    xt = F.pad(torch.where(valid[..., None], xt, 0.0), (0, cp - C))             # [T, 128, Cp]
    s = scale_from_amax(xt.abs().amax(1))                                       # [T, Cp]
    q = _cast(xt, s[:, None, :])
    return q.permute(2, 0, 1).reshape(cp, T * BLOCK).contiguous(), s


def _ref_quant_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [E, N, K] -> q [E, Np, Kp], qT [E, Kp, Np], s [E, Nb, round4(Kb)], sT [E, Kb, round4(Nb)]."""
    E, N, K = w.shape
    np_, kp = _pad(N), _pad(K)
    nb, kb = np_ // BLOCK, kp // BLOCK
    blocks = F.pad(w.float(), (0, kp - K, 0, np_ - N)).view(E, nb, BLOCK, kb, BLOCK)
    s = scale_from_amax(blocks.abs().amax((2, 4)))                              # [E, Nb, Kb]
    q = _cast(blocks, s[:, :, None, :, None]).view(E, np_, kp)
    return (q, q.transpose(1, 2).contiguous(), F.pad(s, (0, _round4(kb) - kb)),
            F.pad(s.transpose(1, 2), (0, _round4(nb) - nb)).contiguous())


def dequant_rows(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * s.t().repeat_interleave(BLOCK, dim=1)


def dequant_cols(qt: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return qt.float() * s.t().repeat_interleave(BLOCK, dim=1)


def dequant_blocks(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    kb = q.shape[2] // BLOCK
    return q.float() * s[..., :kb].repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)


def _emu_gemm(a, a_s, b, b_s, offs: torch.Tensor, n_out: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Fprop/Dgrad: rows of expert e times block-quantised b[e]ᵀ, all in fp32 after dequantisation."""
    A, B = dequant_rows(a, a_s), dequant_blocks(b, b_s)
    out = A.new_zeros(A.shape[0], n_out)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = A[start:end] @ B[e, :n_out].t()
        start = end
    return out.to(out_dtype)


def _emu_wgrad(a, a_s, b, b_s, tile_begin, tile_count, n_out: int, k_out: int) -> torch.Tensor:
    """Wgrad: per expert, contract the 128x1-quantised tiles of that expert over tokens, in fp32."""
    A, B = dequant_cols(a, a_s), dequant_cols(b, b_s)
    out = A.new_zeros(tile_begin.numel(), n_out, k_out)
    for e, (t0, nt) in enumerate(zip(tile_begin.tolist(), tile_count.tolist())):
        cols = slice(t0 * BLOCK, (t0 + nt) * BLOCK)
        out[e] = A[:n_out, cols] @ B[:k_out, cols].t()
    return out


# ---------------------------------------------------------------------------------------------------------
# Tile plan: 128-row tiles of expert-sorted tokens, each inside one expert.
# ---------------------------------------------------------------------------------------------------------

class TilePlan(NamedTuple):
    tile_expert: torch.Tensor   # [T] int32: expert of tile t, -1 for the unused tail
    row0: torch.Tensor          # [T] int32: first row of tile t
    rowend: torch.Tensor        # [T] int32: end of its expert's rows (rows >= rowend are masked)
    tile_begin: torch.Tensor    # [E] int32: first tile of expert e
    tile_count: torch.Tensor    # [E] int32: tiles of expert e


def tile_plan(offs: torch.Tensor, n_rows: int) -> TilePlan:
    """offs [E] cumulative row ends (as grouped_mm takes them) -> TilePlan with T = ceil(n_rows/128) + E - 1
    tiles, the most Σ_e ceil(c_e/128) can reach; computed on offs' device, no host sync."""
    E = offs.numel()
    ends = offs.long()
    counts = ends.diff(prepend=ends.new_zeros(1))
    tiles = (counts + BLOCK - 1) // BLOCK
    tile_end = tiles.cumsum(0)
    tile_begin = tile_end - tiles
    t = torch.arange(-(-n_rows // BLOCK) + E - 1, device=offs.device)
    e = torch.searchsorted(tile_end, t, right=True)
    used = e < E
    e = e.clamp(max=E - 1)
    row0 = torch.where(used, ends[e] - counts[e] + (t - tile_begin[e]) * BLOCK, 0)
    rowend = torch.where(used, ends[e], 0)
    tile_e = torch.where(used, e, -1)
    return TilePlan(*(v.to(torch.int32) for v in (tile_e, row0, rowend, tile_begin, tiles)))


_DENSE_PLANS: dict[tuple[int, torch.device], tuple[torch.Tensor, TilePlan]] = {}


def _dense_plan(m: int, device: torch.device) -> tuple[torch.Tensor, TilePlan]:
    """A Linear is one expert owning all m rows; cached per (m, device) in eager mode."""
    if torch.compiler.is_compiling():
        offs = torch.full((1,), m, dtype=torch.int32, device=device)
        return offs, tile_plan(offs, m)
    key = (m, device)
    if key not in _DENSE_PLANS:
        offs = torch.tensor([m], dtype=torch.int32, device=device)
        _DENSE_PLANS[key] = (offs, tile_plan(offs, m))
    return _DENSE_PLANS[key]


# ---------------------------------------------------------------------------------------------------------
# Backend choice and the Hopper custom ops
# ---------------------------------------------------------------------------------------------------------

_BACKENDS: dict[torch.device, str] = {}


def fp8_backend(device: torch.device | str) -> str:
    """"hopper" on an SM90 GPU with Triton, else "emulate" (announced once per device, one line on stderr)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _BACKENDS:
        why = None
        if device.type != "cuda":
            why = f"{device.type} has no FP8 tensor cores"
        elif torch.cuda.get_device_capability(device) != (9, 0):
            why = f"{torch.cuda.get_device_name(device)} is not an SM90 (Hopper) GPU"
        else:
            try:
                import triton  # noqa: F401
            except ImportError:
                why = "Triton is not installed"
        _BACKENDS[device] = "emulate" if why else "hopper"
        if why:
            print(f"nanoseek fp8: {why}; using the exact FP8 emulation (quantise -> dequantise -> fp32 matmul): "
                  f"numerically the same recipe, but slower than bf16", file=sys.stderr)
    return _BACKENDS[device]


def _hopper(t: torch.Tensor) -> bool:
    return t.is_cuda and fp8_backend(t.device) == "hopper"


def _kernels():
    # Lazy: the Triton kernels import triton, an optional dependency present only on CUDA machines.
    from nanoseek.kernels import fp8_triton
    return fp8_triton


# Dense (one-expert) GEMMs on Hopper: "cublas" = torch's block-scaled scaled_mm, fastest on large GEMMs;
# "triton" = the grouped kernel with one group, which skips cuBLASLt's per-call heuristic query (host time).
DENSE_GEMM = "cublas"
_CUBLAS_OK: bool | None = None


def _cublas_blockwise_ok() -> bool:
    """Does torch's block-scaled scaled_mm run here and agree with the emulation? Checked once, on first use."""
    global _CUBLAS_OK
    if _CUBLAS_OK is None:
        try:
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(256, 384, device="cuda", generator=g)
            w = torch.randn(1, 256, 384, device="cuda", generator=g)
            offs, plan = _dense_plan(256, x.device)
            xq, xs = _ref_quant_rows(x)
            wq, _, ws, _ = _ref_quant_blocks(w)
            xqt, xst = _ref_quant_cols(x, plan.row0, plan.rowend)
            got = (_cublas_gemm(xq, xs, wq, ws, 256, torch.float32), _cublas_wgrad(xqt, xst, xqt, xst, 384, 384))
            want = (_emu_gemm(xq, xs, wq, ws, offs, 256, torch.float32),
                    _emu_wgrad(xqt, xst, xqt, xst, plan.tile_begin, plan.tile_count, 384, 384)[0])
            _CUBLAS_OK = all(float((g_ - w_).norm() / w_.norm()) < 1e-3 for g_, w_ in zip(got, want))
        except (RuntimeError, NotImplementedError, AttributeError, TypeError, ValueError):
            _CUBLAS_OK = False
        if not _CUBLAS_OK:
            print("nanoseek fp8: torch's block-scaled scaled_mm is unavailable or disagrees with the reference here; "
                  "dense FP8 GEMMs use the Triton kernel", file=sys.stderr)
    return _CUBLAS_OK


def _cublas_gemm(a, a_s, b, b_s, n_out: int, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, Kp] (1x128, scales [M, Kb] stride (1, M)) · b[0]ᵀ (128x128, scales [round4(Kb), Nb] stride (1, ·))."""
    out = F.scaled_mm(a, b[0].t(), a_s.t(), F.ScalingType.BlockWise1x128, b_s[0].t(), F.ScalingType.BlockWise128x128,
                      output_dtype=out_dtype)
    return out[:, :n_out].contiguous() if out.shape[1] != n_out else out


def _cublas_wgrad(a, a_s, b, b_s, n_out: int, k_out: int) -> torch.Tensor:
    """aT [Np, P] · bT [Kp, P]ᵀ, both 1x128 along the tokens (scales [T, ·] read as [·, T] stride (1, ·))."""
    out = F.scaled_mm(a, b.t(), a_s.t(), F.ScalingType.BlockWise1x128, b_s.t(), F.ScalingType.BlockWise1x128,
                      output_dtype=torch.float32)
    return out[:n_out, :k_out].contiguous()


_TRITON_QUANT_OK: bool | None = None


def _triton_quant_ok() -> bool:
    """Do the Triton quantisers reproduce the torch reference here (fp32 and bf16 input)? Checked once, on first
    use: a miscompiled cast would silently corrupt training, so a failure falls back to the (slower) reference."""
    global _TRITON_QUANT_OK
    if _TRITON_QUANT_OK is None:
        k, g = _kernels(), torch.Generator(device="cuda").manual_seed(0)
        offs = torch.tensor([170, 170, 300], device="cuda", dtype=torch.int32)
        plan = tile_plan(offs, 300)
        used, pairs = int(plan.tile_count.sum()), []
        for dtype, width in itertools.product((torch.float32, torch.bfloat16), (333, 256)):   # odd and aligned rows
            x = (torch.randn(300, width, device="cuda", generator=g) * 7).to(dtype)
            pairs += zip(k.quant_rows(x), _ref_quant_rows(x))
            (qt, st), (qt_r, st_r) = k.quant_cols(x, plan.row0, plan.rowend), _ref_quant_cols(x, plan.row0, plan.rowend)
            pairs += [(qt[:, :used * BLOCK], qt_r[:, :used * BLOCK]), (st[:used], st_r[:used])]   # unused tiles: unset
            pairs += zip(k.quant_blocks(x[None]), _ref_quant_blocks(x[None]))
        _TRITON_QUANT_OK = all(
            float((a.view(torch.uint8) != b.view(torch.uint8)).float().mean()) <= 1e-4 if a.dtype == FP8
            else torch.allclose(a, b, rtol=2 ** -22, atol=0) for a, b in pairs)
        if not _TRITON_QUANT_OK:
            print("nanoseek fp8: the Triton quantisers disagree with the reference on this GPU/Triton; quantising "
                  "with torch ops instead (same numbers, slower)", file=sys.stderr)
    return _TRITON_QUANT_OK


# The five steps of the recipe. Each picks its backend from the tensor's device. Eager code calls them directly;
# under torch.compile they are opaque custom ops (`nanoseek::fp8_*`), so the graph never traces Triton launches,
# host syncs of the emulation, or the backend checks.

def _quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().quant_rows(x) if _hopper(x) and _triton_quant_ok() else _ref_quant_rows(x)


def _quant_cols(x: torch.Tensor, row0: torch.Tensor, rowend: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _hopper(x) and _triton_quant_ok():
        return _kernels().quant_cols(x, row0, rowend)
    return _ref_quant_cols(x, row0, rowend)


def _quant_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().quant_blocks(w) if _hopper(w) and _triton_quant_ok() else _ref_quant_blocks(w)


def _gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, offs: torch.Tensor,
          tile_expert: torch.Tensor, row0: torch.Tensor, rowend: torch.Tensor, n_out: int,
          out_dtype: torch.dtype) -> torch.Tensor:
    if not _hopper(a):
        return _emu_gemm(a, a_s, b, b_s, offs, n_out, out_dtype)
    if DENSE_GEMM == "cublas" and b.shape[0] == 1 and a.shape[0] % 16 == 0 and _cublas_blockwise_ok():
        return _cublas_gemm(a, a_s, b, b_s, n_out, out_dtype)
    return _kernels().gmm(a, a_s, b, b_s, tile_expert, row0, rowend, n_out, out_dtype)


def _wgrad(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, tile_begin: torch.Tensor,
           tile_count: torch.Tensor, n_out: int, k_out: int) -> torch.Tensor:
    if not _hopper(a):
        return _emu_wgrad(a, a_s, b, b_s, tile_begin, tile_count, n_out, k_out)
    if DENSE_GEMM == "cublas" and tile_begin.shape[0] == 1 and _cublas_blockwise_ok():
        return _cublas_wgrad(a, a_s, b, b_s, n_out, k_out).unsqueeze(0)
    return _kernels().gmm_wgrad(a, a_s, b, b_s, tile_begin, tile_count, n_out, k_out)


def _fake_rows(x):
    M, kp = x.shape[0], _pad(x.shape[1])
    return x.new_empty(M, kp, dtype=FP8), x.new_empty(kp // BLOCK, M, dtype=torch.float32)


def _fake_cols(x, row0, rowend):
    cp, T = _pad(x.shape[1]), row0.shape[0]
    return x.new_empty(cp, T * BLOCK, dtype=FP8), x.new_empty(T, cp, dtype=torch.float32)


def _fake_blocks(w):
    E, np_, kp = w.shape[0], _pad(w.shape[1]), _pad(w.shape[2])
    nb, kb = np_ // BLOCK, kp // BLOCK
    return (w.new_empty(E, np_, kp, dtype=FP8), w.new_empty(E, kp, np_, dtype=FP8),
            w.new_empty(E, nb, _round4(kb), dtype=torch.float32), w.new_empty(E, kb, _round4(nb), dtype=torch.float32))


def _fake_gemm(a, a_s, b, b_s, offs, tile_expert, row0, rowend, n_out, out_dtype):
    return a.new_empty(a.shape[0], n_out, dtype=out_dtype)


def _fake_wgrad(a, a_s, b, b_s, tile_begin, tile_count, n_out, k_out):
    return a.new_empty(tile_begin.shape[0], n_out, k_out, dtype=torch.float32)


# Quantisation under torch.compile: "traced" hands Inductor the plain-torch reference, which it fuses into the
# neighbouring elementwise kernels (the RMSNorm / SwiGLU that produce x, the casts that consume it), so the
# quantiser costs no extra pass over memory and no extra launch; "opaque" keeps the Triton quantisers as custom
# ops. The GEMMs are opaque either way.
COMPILED_QUANT = "traced"


def _opaque(name: str, fn, fake, traced=None):
    """fn, and under torch.compile the custom op nanoseek::<name> with the same body and a shape-only fake
    (or `traced`, plain torch code Inductor compiles itself, when COMPILED_QUANT says so)."""
    op = torch.library.custom_op(f"nanoseek::{name}", fn, mutates_args=())
    op.register_fake(fake)

    def step(*args):
        if not torch.compiler.is_compiling():
            return fn(*args)
        return traced(*args) if traced is not None and COMPILED_QUANT == "traced" else op(*args)
    return step


_quant_rows_step = _opaque("fp8_quant_rows", _quant_rows, _fake_rows, _ref_quant_rows)
_quant_cols_step = _opaque("fp8_quant_cols", _quant_cols, _fake_cols, _ref_quant_cols)
_quant_blocks_step = _opaque("fp8_quant_blocks", _quant_blocks, _fake_blocks, _ref_quant_blocks)
_gemm_step = _opaque("fp8_gemm", _gemm, _fake_gemm)
_wgrad_step = _opaque("fp8_wgrad", _wgrad, _fake_wgrad)


def quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 tiles (Fprop/Dgrad activations): x [M, K] -> q [M, Kp], s [Kb, M]."""
    return _quant_rows_step(x)


def quant_cols(x: torch.Tensor, plan: TilePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """128x1 tiles within each expert's rows (Wgrad operands): x [M, C] -> qT [Cp, T*128], s [T, Cp]."""
    return _quant_cols_step(x, plan.row0, plan.rowend)


def quant_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """128x128 blocks (weights): w [E, N, K] -> q, qT, s, sT."""
    return _quant_blocks_step(w)


def block_gemm(a, a_s, b, b_s, plan: TilePlan, offs: torch.Tensor, n_out: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Fprop / Dgrad: 1x128-quantised rows (grouped by offs) times 128x128-quantised b[e]ᵀ -> [M, n_out]."""
    return _gemm_step(a, a_s, b, b_s, offs, plan.tile_expert, plan.row0, plan.rowend, n_out, out_dtype)


def wgrad_gemm(a, a_s, b, b_s, plan: TilePlan, n_out: int, k_out: int) -> torch.Tensor:
    """Wgrad: 128x1-quantised aT [Np, P], bT [Kp, P] contracted over each expert's tiles -> [E, n_out, k_out] fp32."""
    return _wgrad_step(a, a_s, b, b_s, plan.tile_begin, plan.tile_count, n_out, k_out)


# ---------------------------------------------------------------------------------------------------------
# Autograd: the three FP8 GEMMs of y = x · w[e]ᵀ per expert
# ---------------------------------------------------------------------------------------------------------

class _Fp8GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offs, plan_tensors, out_dtype):
        plan = TilePlan(*plan_tensors)
        n_out, k = w.shape[1], w.shape[2]
        with torch.autocast(x.device.type, enabled=False):
            wq, wqt, ws, wst = quant_blocks(w)                     # 128x128 blocks: Fprop uses W, Dgrad Wᵀ
            xq, xs = quant_rows(x)                                 # 1x128 tiles
            y = block_gemm(xq, xs, wq, ws, plan, offs, n_out, out_dtype)
            xqt, xst = quant_cols(x, plan) if ctx.needs_input_grad[1] else (None, None)   # 128x1, kept for Wgrad
        ctx.save_for_backward(xqt, xst, wqt, wst, offs, *plan)
        ctx.dims = (n_out, k, x.dtype, w.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        xqt, xst, wqt, wst, offs, *plan = ctx.saved_tensors
        plan = TilePlan(*plan)
        n_out, k, x_dtype, w_dtype = ctx.dims
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dyq, dys = quant_rows(dy)                          # 1x128 tiles over the output channels
                dx = block_gemm(dyq, dys, wqt, wst, plan, offs, k, x_dtype)
            if ctx.needs_input_grad[1]:
                dyqt, dyst = quant_cols(dy, plan)                  # 128x1 tiles over tokens
                dw = wgrad_gemm(dyqt, dyst, xqt, xst, plan, n_out, k).to(w_dtype)
        return dx, dw, None, None, None


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """FP8 drop-in for nanoseek.model.moe.grouped_mm: x [N, in] sorted by expert, w [E, out, in], offs [E]
    int32 cumulative row ends -> [N, out] in the autocast dtype (else x's dtype)."""
    plan = tile_plan(offs, x.shape[0])
    return _Fp8GroupedMM.apply(x, w, offs, tuple(plan), _out_dtype(x))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · weightᵀ (+ bias) with all three GEMMs in FP8; x [..., in], weight [out, in]."""
    x2 = x.reshape(-1, x.shape[-1])
    offs, plan = _dense_plan(x2.shape[0], x2.device)
    y = _Fp8GroupedMM.apply(x2, weight[None], offs, tuple(plan), _out_dtype(x))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


class Fp8Linear(nn.Linear):
    """nn.Linear whose forward and backward GEMMs run in FP8; parameters (fp32 masters) are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias)


class Fp8GroupedExperts(GroupedExperts):
    """GroupedExperts with its grouped GEMMs in FP8 (same parameters, same SwiGLU)."""

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        offs = tokens_per_expert.cumsum(0).to(torch.int32)
        gate, up = fp8_grouped_mm(x_sorted, self.gate_up_proj, offs).chunk(2, dim=-1)
        return fp8_grouped_mm(F.silu(gate) * up, self.down_proj, offs)


def gemm_features(m: nn.Module) -> int:
    """The narrower of a layer's GEMM input and output widths (per expert for GroupedExperts): what decides
    whether FP8 can pay for its quantisation there."""
    if isinstance(m, GroupedExperts):
        return min(m.down_proj.shape[1:])                       # [E, H, I]: hidden and expert width
    return min(m.in_features, m.out_features)


def convert_to_fp8(model: nn.Module, *, min_features: int) -> nn.Module:
    """Switch every nn.Linear (except the output head / router-like heads) and every GroupedExperts of `model`
    whose GEMMs are at least `min_features` wide in and out (`gemm_features`; 0 = all of them) to FP8 GEMMs, in
    place (class swap: parameters, names and state dict are untouched). Narrower layers stay bf16: there the
    quantisation costs more than FP8 saves (benchmarks/RESULTS.md, per-GEMM table: a whole FP8 Linear loses
    below ~2-4K features and gains 1.35-1.39x at V3's 7168 x 18432). Embedding, norms, MoE gate and attention
    are not Linear layers here and stay as they are. Prints what was converted. Returns the model."""
    done = {"Linear layers": 0, "expert groups": 0}
    kept = dict(done)
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if type(m) is nn.Linear and leaf not in HIGH_PRECISION_NAMES:
            kind, fp8_class = "Linear layers", Fp8Linear
        elif type(m) is GroupedExperts:
            kind, fp8_class = "expert groups", Fp8GroupedExperts
        else:
            continue
        if gemm_features(m) >= min_features:
            m.__class__ = fp8_class
            done[kind] += 1
        else:
            kept[kind] += 1
    param = next(model.parameters(), None)
    if param is not None:
        msg = (f"nanoseek fp8: {done['Linear layers']} Linear layers and {done['expert groups']} expert groups now "
               f"run FP8 GEMMs ({fp8_backend(param.device)} backend)")
        if any(kept.values()):
            msg += (f"; {kept['Linear layers']} Linear layers and {kept['expert groups']} expert groups narrower "
                    f"than {min_features} features stay bf16, where FP8 would be slower (train.fp8_min_features)")
        print(msg, file=sys.stderr)
    return model
