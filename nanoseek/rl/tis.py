"""Sampler-vs-trainer log-prob agreement and the truncated importance-sampling (TIS) correction.

The rollout engine samples with its own kernels (a CUDA-graph decode step over a latent cache, bf16), the
trainer recomputes log π_θ with a training forward; the two are the same policy but not the same numbers.
The gap is logged (mean |log π_train − log π_sampler| over response tokens), and, as an option, each token's
policy-gradient term is weighted by w = min(π_train / π_sampler, C), detached: the truncated importance
weight of Yao et al. 2025 ("Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"), which
corrects the expectation for the sampler's distribution while C bounds the variance. TRL's and verl's
`vllm_importance_sampling_correction` / `tis_imp_ratio_cap` are this weight.
"""

from __future__ import annotations

from torch import Tensor


def logprob_gap(train_logp: Tensor, sample_logp: Tensor, mask: Tensor) -> Tensor:
    """Mean |train − sample| over the tokens where mask is set ([N, T] each); 0 when there are none."""
    m = mask.to(train_logp.dtype)
    return ((train_logp - sample_logp.to(train_logp.dtype)).abs() * m).sum() / m.sum().clamp_min(1)


def tis_weights(train_logp: Tensor, sample_logp: Tensor, cap: float) -> Tensor:
    """Per-token truncated importance weights min(exp(train − sample), cap), no gradient: [N, T]."""
    if cap <= 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    return (train_logp.detach() - sample_logp.to(train_logp.dtype)).exp().clamp(max=cap)
