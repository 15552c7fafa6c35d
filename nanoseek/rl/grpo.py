"""GRPO: group-relative advantages and the clipped policy loss (DeepSeekMath §4.1, R1 report §2.2).

GRPO drops PPO's critic: for each prompt it samples a group of G completions, scores them with rule
rewards, and uses the reward's deviation from the group mean as every token's advantage. The rest is
PPO's clipped ratio objective plus a KL penalty to a frozen reference model, written inside the loss
(not folded into the reward). Everything here is a pure function of tensors so it can be tested against
float64 formulas; the training loop lives in `nanoseek.rl.trainer`.

Variants that matter in practice, all selectable by config:
- advantage scaling "group" (divide by the group's std, GRPO), "batch" (by the std of all rewards in the
  batch) or "none" (Dr. GRPO, arXiv 2503.20783 §3: the std division biases toward easy/hard prompts);
- separate clip bounds ε_low / ε_high ("clip-higher", DAPO arXiv 2503.14476 §3.1, ε_high = 0.28);
- loss aggregation "grpo" (token mean per sequence, then mean over sequences), "dapo" (token mean over the
  whole batch, DAPO §3.3) or "drgrpo" (token sum / (batch × max_len), Dr. GRPO: no length bias);
- dynamic sampling (DAPO §3.2): groups whose rewards are all equal have zero advantage and give no
  gradient, so they are dropped and more prompts are sampled;
- the importance ratio per token (PPO, GRPO) or per sequence (GSPO, arXiv 2507.18071 §4.1: the geometric mean
  of the token ratios, clipped as one number per sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nanoseek.errors import UserError

SCALINGS = ("group", "batch", "none")
AGGREGATIONS = ("grpo", "dapo", "drgrpo")
RATIO_LEVELS = ("token", "sequence")


@dataclass
class GRPOConfig:
    """GRPO's own knobs, the `[grpo]` section; the clipped objective, group size, μ and dynamic sampling that
    PPO shares are in `[rl]` (nanoseek.rl.algorithms.RLCommonConfig)."""
    scaling: str = "group"          # advantage scaling: "group" | "batch" | "none" (Dr. GRPO)
    adv_eps: float = 1e-4           # ε in (r - mean) / (std + ε)

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise UserError(f"grpo.scaling={self.scaling!r}; choose one of {', '.join(SCALINGS)}")


def group_advantages(rewards: Tensor, group_size: int, scaling: str = "group", eps: float = 1e-4) -> Tensor:
    """Per-sample advantage Â_i (DeepSeekMath eq. 3 with outcome supervision).

    rewards [N] holds N = n_groups × G rewards, the G samples of a prompt contiguous. Returns [N]:
      "group": (r_i - mean_g) / (std_g + eps)      std_g: the group's sample std (Bessel, as torch.std)
      "batch": (r_i - mean_g) / (std_all + eps)    std_all: sample std of all N rewards
      "none":   r_i - mean_g                        (Dr. GRPO)
    """
    r = rewards.reshape(-1, group_size)                              # [n_groups, G]
    centered = r - r.mean(dim=1, keepdim=True)
    if scaling == "group":
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    elif scaling == "batch":
        centered = centered / (rewards.std() + eps)
    elif scaling != "none":
        raise ValueError(f"unknown advantage scaling {scaling!r}")
    return centered.reshape(-1)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[n_groups] bool: True where every sample of the group got the same reward (no learning signal)."""
    r = rewards.reshape(-1, group_size)
    return (r == r[:, :1]).all(dim=1)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π_θ || π_ref) (Schulman 2020; DeepSeekMath eq. 4): unbiased, >= 0.

    KL_t = exp(ref - logp) - (ref - logp) - 1, where logp, ref_logp are log-probs of the sampled tokens.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token: Tensor, mask: Tensor, mode: str, max_len: int | None = None,
              n_seqs: int | None = None, n_tokens: float | None = None) -> Tensor:
    """Reduce a per-token loss [B, T] with mask [B, T] (1 = response token) to a scalar.

      "grpo":   mean_b ( sum_t ℓ_bt m_bt / sum_t m_bt )     per-sequence token mean, then mean
      "dapo":   sum_bt ℓ_bt m_bt / sum_bt m_bt              token mean over the batch
      "drgrpo": sum_bt ℓ_bt m_bt / (B × max_len)            constant normaliser (Dr. GRPO)

    Micro-batching: pass the FULL batch's `n_seqs` (B) and, for "dapo", `n_tokens` (sum of its mask) so
    the micro-batch losses add up to the full-batch loss. `max_len` defaults to T; the trainer passes the
    generation budget (max_new_tokens) so the normaliser is the same for every batch.
    """
    m = mask.to(per_token.dtype)
    per_token = torch.where(m != 0, per_token, 0.0)     # an inf/NaN in a padded slot times 0 would be NaN
    B, T = per_token.shape
    n_seqs = B if n_seqs is None else n_seqs
    if mode == "grpo":
        per_seq = (per_token * m).sum(1) / m.sum(1).clamp(min=1)
        return per_seq.sum() / n_seqs
    if mode == "dapo":
        n_tokens = m.sum().clamp(min=1) if n_tokens is None else max(float(n_tokens), 1.0)
        return (per_token * m).sum() / n_tokens
    if mode == "drgrpo":
        return (per_token * m).sum() / (n_seqs * (T if max_len is None else max_len))
    raise ValueError(f"unknown aggregation {mode!r}")


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
                ref_logp: Tensor | None = None, aggregation: str = "grpo", max_len: int | None = None,
                n_seqs: int | None = None, n_tokens: float | None = None,
                weight: Tensor | None = None, level: str = "token") -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate loss with an optional k3 KL penalty (DeepSeekMath eq. 3, negated).

    logp, old_logp, ref_logp, mask: [B, T] (log-probs of the sampled response tokens under π_θ, π_old,
    π_ref). advantages: [B] (GRPO, broadcast over tokens) or [B, T] (PPO/GAE). Per token:
        ρ = exp(logp - old_logp)
        ℓ = -w · min(ρ Â, clip(ρ, 1 - eps_low, 1 + eps_high) Â) + β KL_k3(π_θ, π_ref)
    reduced with `aggregate`. level="sequence" replaces ρ by GSPO's sequence ratio (arXiv 2507.18071 §4.1)
        s_i = (π_θ(y_i|x) / π_old(y_i|x))^(1/|y_i|) = exp(mean_t (logp_it - old_logp_it))
    shared by every token of sequence i and clipped as one number; with aggregation "grpo" the loss is GSPO's
    objective (§4.1), whose gradient weights each token's ∇log π by s_i Â_i / |y_i| (its gradient analysis).
    weight: w [B, T], a detached per-token factor on the policy-gradient term only (the truncated importance
    weight of `nanoseek.rl.tis`; the KL term is not weighted, as in TRL); None = 1.
    Returns (loss, stats) with detached stats: "clip_frac" (share of response
    tokens where the clipped term is the active one), "clip_low" / "clip_high" (its tokens with ρ below /
    above 1), "kl" (mean k3 KL per token, when ref_logp is given),
    "ratio" (mean ρ).
    """
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages      # [B, 1] or [B, T]
    live = mask != 0                                                            # [B, T]
    # Padded slots hold arbitrary log-probs; exp of a > 88-nat gap is inf in fp32 and inf·0 = NaN (also in
    # the gradient), so they are set to 0 BEFORE any exp, not multiplied by the mask after it.
    log_ratio = torch.where(live, logp - old_logp, 0.0)                         # [B, T]
    if level == "sequence":                                                     # GSPO: one ratio per sequence
        log_ratio = log_ratio.sum(1, keepdim=True) / live.sum(1, keepdim=True).clamp(min=1)      # [B, 1]
    elif level != "token":
        raise ValueError(f"unknown importance sampling level {level!r}")
    ratio = torch.exp(log_ratio).expand_as(logp)                                # [B, T]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if weight is not None:
        per_token = per_token * weight
    m = mask.to(logp.dtype)
    denom = m.sum().clamp(min=1)
    active = clipped < unclipped                        # the clipped term is the one min() keeps
    stats = {
        "clip_frac": ((active.to(logp.dtype) * m).sum() / denom).detach(),
        # split by side: ρ < 1 - eps_low (with Â < 0) vs ρ > 1 + eps_high (with Â > 0, the side DAPO's
        # clip-higher widens); the two add up to clip_frac
        "clip_low": (((active & (ratio < 1)).to(logp.dtype) * m).sum() / denom).detach(),
        "clip_high": (((active & (ratio > 1)).to(logp.dtype) * m).sum() / denom).detach(),
        "ratio": ((ratio * m).sum() / denom).detach(),
    }
    if ref_logp is not None:
        kl = kl_k3(logp, torch.where(live, ref_logp, logp))                    # 0 at padded slots
        stats["kl"] = ((kl * m).sum() / denom).detach()
        if beta:
            per_token = per_token + beta * kl
    return aggregate(per_token, mask, aggregation, max_len, n_seqs, n_tokens), stats
