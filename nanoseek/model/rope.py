"""Rotary position embedding with DeepSeek's YaRN extension, on interleaved pairs.

DeepSeek checkpoints rotate adjacent channel pairs (x0, x1), (x2, x3), ... (their reference code views the
rope dims as complex numbers). We rotate the even/odd slices directly and write the result de-interleaved,
[real parts | imaginary parts]: a fixed permutation applied to q and k alike, so every q·k is unchanged
(transformers' `rope_interleave=True` path does the same, so parity is exact).

YaRN (Peng et al. 2023; DeepSeek-V2 §B, V3 §4.3): dims whose wavelength is short compared with the original
context keep their frequency (extrapolate), long-wavelength dims are divided by `factor` (interpolate), with a
linear ramp between the correction range found from beta_fast / beta_slow rotations. The attention logits are
sharpened by mscale² (applied in MLA's softmax scale, docs/DESIGN.md §3); cos/sin carry the ratio
mscale(factor, mscale) / mscale(factor, mscale_all_dim), which is 1 for the released configs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1·mscale·ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(scaling: dict | None) -> dict | None:
    if scaling and scaling.get("type", scaling.get("rope_type")) == "yarn":
        return scaling
    return None


def rope_frequencies(dim: int, theta: float, scaling: dict | None,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (float32) and the cos/sin multiplier, for plain RoPE or YaRN."""
    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    yarn = _yarn(scaling)
    if yarn is None:
        return 1.0 / pos_freqs, 1.0
    factor = float(yarn["factor"])
    original = yarn["original_max_position_embeddings"]
    beta_fast, beta_slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times in `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001                                   # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp 0: high-frequency dims keep their frequency; ramp 1: low-frequency dims are interpolated by `factor`
    inv_freq = (1.0 / pos_freqs) * (1 - ramp) + (1.0 / (factor * pos_freqs)) * ramp
    if yarn.get("attention_factor") is not None:
        attention_factor = float(yarn["attention_factor"])
    elif yarn.get("mscale") and yarn.get("mscale_all_dim"):
        attention_factor = yarn_mscale(factor, yarn["mscale"]) / yarn_mscale(factor, yarn["mscale_all_dim"])
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


def softmax_scale(cfg: ModelConfig) -> float:
    """MLA's attention scale: (qk_nope + qk_rope)^-0.5, times mscale² under YaRN (docs/DESIGN.md §3)."""
    scale = cfg.qk_head_dim ** -0.5
    yarn = _yarn(cfg.rope_scaling)
    if yarn is not None and yarn.get("mscale_all_dim"):
        scale *= yarn_mscale(float(yarn["factor"]), yarn["mscale_all_dim"]) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """Maps position ids [B, T] to (cos, sin) [B, T, qk_rope_head_dim / 2]; one instance per model."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dim, self.theta, self.scaling = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling
        inv_freq, self.attention_factor = rope_frequencies(self.dim, self.theta, self.scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recompute the frequencies (after `to_empty` from the meta device)."""
        self.inv_freq.copy_(rope_frequencies(self.dim, self.theta, self.scaling, device="cpu")[0])

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()      # [B, T, dim/2]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., d]; cos/sin broadcast to [..., d/2]. Output is [real | imag]."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
